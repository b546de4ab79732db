"""train/suite: matched budgets (counts computed by hand for the tiny shape), the table and medians, and a
tiny end-to-end run (2 methods × 1 task × 1 seed × 2 steps) that a second invocation skips."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from model import Llama
from tests.helpers import random_meta_state_dict, train_sentencepiece, write_meta_dir
from train import suite
from train.config import DEFAULT_LR, SHORT_ANSWER_LR, FinetuneConfig
from train.suite import (
    SuiteConfig,
    cell_stats,
    format_table,
    main,
    paired,
    para_wins,
    parameter_budgets,
    run_budget,
    run_lr,
)
from train.tasks import TASKS

# the finetune tests' tiny shape, with room for the tasks' prompts under a 400-piece tokenizer
PARAMS = {"dim": 64, "n_layers": 2, "n_heads": 4, "n_kv_heads": 2, "multiple_of": 32, "max_seq_len": 512}


pytestmark = pytest.mark.usefixtures("one_torch_thread")


@pytest.fixture(scope="module")
def tiny_dir(tmp_path_factory) -> Path:
    d = tmp_path_factory.mktemp("tiny_suite")
    train_sentencepiece(d / "tokenizer.model", 400)
    sd = random_meta_state_dict(64, 2, 4, 2, 400, 192, seed=0)
    return write_meta_dir(d, {**PARAMS, "vocab_size": 400, "norm_eps": 1e-5}, [sd])


def test_budgets_by_hand(tiny_dir):
    budgets = parameter_budgets(Llama.from_pretrained(tiny_dir), SuiteConfig("unused"))
    # PARA r=12 per layer: down 64*12, up 12*(64 + 32 + 192) + bias 288 (q, v, FFN up widths) -> 4512, 2 layers
    assert budgets["para"] == {"r": 12, "params": 9024}
    # LoRA q_proj + v_proj per rank and layer: (64 + 64) + (64 + 32) = 224 -> 448 per rank; 9024 / 448 = 20.1
    assert budgets["lora"]["r"] == 20 and budgets["lora"]["params"] == 8960
    assert abs(8960 - 9024) / 9024 < 0.15
    # (IA)³: k (32) + v (32) + down_proj input (192) per layer
    assert budgets["ia3"] == {"r": None, "params": 512}
    assert parameter_budgets(Llama.from_pretrained(tiny_dir), SuiteConfig("unused", lora_r=4))["lora"]["r"] == 4


def test_cell_stats_paired_table_and_wins():
    """Mean, sample std and the paired per-seed difference, by hand: para boolq (0.2, 0.5, 0.4) has mean 11/30 and
    std sqrt(((−1/6)² + (2/15)² + (1/30)²) / 2) = 0.1528; against lora's (0.3, 0.9) on the seeds both finished (0, 1)
    the differences are −0.1 and −0.4."""
    runs = (
        [{"method": "para", "task": "boolq", "seed": i, "test_score": s} for i, s in enumerate((0.2, 0.5, 0.4))]
        + [{"method": "lora", "task": "boolq", "seed": i, "test_score": s} for i, s in enumerate((0.3, 0.9))]
        + [
            {"method": "para", "task": "copa", "seed": 0, "test_score": 0.5},
            {"method": "lora", "task": "copa", "seed": 0, "test_score": 0.6},
            {"method": "lora", "task": "hsm", "seed": 0, "test_score": None},  # interrupted: no score
        ]
    )
    cells = cell_stats(runs)
    assert cells["para"]["boolq"]["mean"] == pytest.approx(11 / 30)
    assert cells["para"]["boolq"]["std"] == pytest.approx(0.152753, abs=1e-6)
    assert cells["para"]["boolq"]["median"] == 0.4 and cells["lora"]["boolq"]["mean"] == pytest.approx(0.6)
    assert cells["para"]["copa"]["std"] == 0.0 and "hsm" not in cells["lora"]
    diff = paired(runs)
    assert diff["boolq"]["scores"] == pytest.approx([-0.1, -0.4]) and diff["boolq"]["seeds"] == [0, 1]
    assert diff["boolq"]["mean"] == pytest.approx(-0.25) and diff["boolq"]["std"] == pytest.approx(0.212132, abs=1e-6)
    assert diff["boolq"]["wins"] == 0 and diff["copa"]["n"] == 1 and "hsm" not in diff
    assert para_wins(cells, ["boolq", "copa"]) == []
    assert para_wins({"para": {"copa": {"mean": 0.7}}, "lora": {"copa": {"mean": 0.7}}}, ["copa"]) == ["copa"]
    # the mean decides, not the median: para (0, 1, 1) mean 0.67 median 1 vs lora (0.8,) 0.8
    wins = cell_stats([{"method": "para", "task": "t", "test_score": s} for s in (0.0, 1.0, 1.0)])
    wins |= cell_stats([{"method": "lora", "task": "t", "test_score": 0.8}])
    assert para_wins(wins, ["t"]) == []
    summary = {
        "tasks": ["boolq", "copa"],
        "seeds": 3,
        "methods": ["para", "lora"],
        "cells": cells,
        "paired": diff,
        "zero_shot": {"boolq": 0.25, "copa": 0.5},
        "budgets": {"para": {"r": 12, "params": 1105920}, "lora": {"r": 19, "params": 1094400}},
    }
    table = format_table(summary).splitlines()
    assert table[0] == "| Method | #Params | BoolQ | COPA |"
    assert table[2] == "| base (zero-shot) | 0 | 25.0 | 50.0 |"
    assert table[3] == "| LoRA (r=19) | 1.09M | 60.0 ± 42.4 (2/3) | 60.0 (1/3) |"
    assert table[4] == "| PARA (r=12) | 1.11M | 36.7 ± 15.3 | 50.0 (1/3) |"
    assert table[5] == "| PARA − LoRA, per seed | | -25.0 ± 21.2 (0/2) | -10.0 (0/1) |"


def test_end_to_end_and_resume(tiny_dir, tmp_path, capsys):
    out = tmp_path / "suite"
    argv = [
        "--model",
        str(tiny_dir),
        "--methods",
        "para,ia3",
        "--tasks",
        "boolq",
        "--seeds",
        "1",
        "--out",
        str(out),
        "--n-train",
        "12",
        "--n-dev",
        "4",
        "--n-test",
        "3",
        "--max-steps",
        "2",
        "--batch-size",
        "4",
        "--eval-every",
        "1",
        "--no-progress",
    ]
    assert main(argv) == 0
    first = capsys.readouterr()
    summary = json.loads((out / "suite.json").read_text())
    assert summary["methods"] == ["para", "ia3"] and summary["tasks"] == ["boolq"] and summary["seeds"] == 1
    assert summary["config"]["chat"] is False and "prompts: plain text" in first.err  # no chat template: auto is off
    assert summary["budgets"]["para"]["params"] == 9024 and summary["budgets"]["ia3"]["params"] == 512
    assert "PARA r=12: 9,024" in first.err and "(IA)³: 512" in first.err
    runs = {r["method"]: r for r in summary["runs"]}
    for method in ("para", "ia3"):
        result = out / "runs" / "boolq" / method / "seed0" / "result.json"
        done = json.loads(result.read_text())
        assert done["steps"] == 2 and done["lr"] == SHORT_ANSWER_LR[method]  # boolq: a one-word answer
        assert runs[method]["skipped"] is False and 0.0 <= runs[method]["test_score"] <= 1.0
        assert summary["cells"][method]["boolq"]["n"] == 1
    assert 0.0 <= summary["zero_shot"]["boolq"] <= 1.0
    assert len((out / "zero_shot" / "boolq" / "predictions.jsonl").read_text().splitlines()) == 3
    table = (out / "table.md").read_text()
    assert table.startswith("| Method | #Params | BoolQ |") and "| PARA (r=12) | 9.0K |" in table
    assert "| (IA)³ | 0.5K |" in table and "| base (zero-shot) | 0 |" in table and "LoRA" not in table
    assert table in first.out and "PARA >= the other methods on" in first.out

    stamps = {p: p.stat().st_mtime_ns for p in (out / "runs").rglob("result.json")}
    assert main(argv) == 0  # everything is done: nothing is trained again
    second = capsys.readouterr()
    assert "skip boolq/para/seed0" in second.err and "skip boolq/ia3/seed0" in second.err
    assert "skip zero-shot boolq" in second.err and "run boolq" not in second.err
    assert {p: p.stat().st_mtime_ns for p in stamps} == stamps
    again = json.loads((out / "suite.json").read_text())
    assert again["cells"] == summary["cells"] and all(r["skipped"] for r in again["runs"])

    # a run cut short (its last/ checkpoint but no result.json) continues from its checkpoint
    (out / "runs" / "boolq" / "para" / "seed0" / "result.json").unlink()
    assert main(argv) == 0
    third = capsys.readouterr()
    assert "run boolq/para/seed0" in third.err and "resuming" in third.err and "skip boolq/ia3/seed0" in third.err
    resumed = json.loads((out / "suite.json").read_text())
    assert resumed["cells"] == summary["cells"]

    # --report-only over more seeds than finished: the finished ones summarised, nothing trained
    assert main([*argv[:7], "2", *argv[8:], "--report-only"]) == 0
    fourth = capsys.readouterr()
    assert "run boolq" not in fourth.err and "finished: 2/4 runs" in fourth.out
    partial = json.loads((out / "suite.json").read_text())
    assert partial["finished"] == "2/4 runs" and partial["cells"] == summary["cells"]
    assert "(1/2)" in partial["table"] and partial["wall_seconds"] > 0
    assert not (out / "runs" / "boolq" / "para" / "seed1").exists()

    # other result-shaping settings on the same OUT are refused before anything runs
    assert main([*argv, "--lr", "0.01"]) == 2
    assert "other settings (finetune:" in capsys.readouterr().err


def test_run_lr_per_task_kind():
    """--lr wins; otherwise BoolQ (one-word answers) gets SHORT_ANSWER_LR and the generation tasks DEFAULT_LR."""
    config = SuiteConfig("unused")
    assert run_lr(config, "boolq", "lora") == SHORT_ANSWER_LR["lora"] != DEFAULT_LR["lora"]
    assert run_lr(config, "hsm", "lora") == DEFAULT_LR["lora"] and run_lr(config, "copa", "para") == DEFAULT_LR["para"]
    assert run_lr(SuiteConfig("unused", finetune={"lr": 5e-4}), "boolq", "para") == 5e-4


def test_run_budget_per_task(tmp_path, monkeypatch):
    """COPA (budget_scale 3) trains three times --max-steps (else --epochs); the other tasks exactly that, and
    train_one hands that length to finetune."""
    config = SuiteConfig(str(tmp_path), finetune={"max_steps": 64, "batch_size": 8})
    assert TASKS["copa"].budget_scale == 3
    assert run_budget(config, "copa") == {"max_steps": 192} and run_budget(config, "hsm") == {"max_steps": 64}
    assert run_budget(SuiteConfig("unused"), "copa") == {"epochs": 3 * FinetuneConfig.epochs}
    assert run_budget(SuiteConfig("unused", finetune={"epochs": 2}), "squad") == {"epochs": 2}

    seen = []

    def fake_finetune(fc, model, metric):
        seen.append((fc.max_steps, fc.epochs, fc.batch_size))
        raise RuntimeError("stop here")

    monkeypatch.setattr(suite, "finetune", fake_finetune)
    paths = {s: tmp_path / f"{s}.jsonl" for s in ("train", "dev", "test")}
    for task in ("copa", "q2sql"):
        with pytest.raises(RuntimeError, match="stop here"):
            suite.train_one(None, config, task, "para", 0, paths, None)
    assert seen == [(192, FinetuneConfig.epochs, 8), (64, FinetuneConfig.epochs, 8)]


def test_bad_arguments(tmp_path, capsys):
    assert main(["--methods", "para,bitfit", "--out", str(tmp_path / "x")]) == 2
    assert "bitfit" in capsys.readouterr().err
    assert main(["--tasks", "boolq,mnli", "--out", str(tmp_path / "x")]) == 2
    assert "mnli" in capsys.readouterr().err
    assert main(["--seeds", "0", "--out", str(tmp_path / "x")]) == 2
