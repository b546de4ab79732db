"""The task-suite comparison (the paper's Table 2 in miniature): every (method, task, seed) fine-tuned and
scored on the test split, plus the base model zero-shot, with matched tunable-parameter budgets.

    python -m train.suite --methods para,lora,ia3 --tasks all --seeds 3 --out DIR [--model default] \
        [--max-steps N --batch-size B --lr LR --eval-every N --epochs E ...]

The model is loaded once. OUT holds `data/TASK/` (the generated splits, reused while their settings match),
`runs/TASK/METHOD/seedS/` (one `train.finetune` output directory each), `zero_shot/TASK/`, and the summary:
`suite.json`, `table.md` and `suite.png` (when matplotlib is importable). Resumable: a run whose
`result.json` exists is skipped, a run with a `last/` checkpoint continues from it. `settings.json` records the
settings that shape results; a later invocation with other ones is refused (tasks, methods, seeds may be added).

Budgets: PARA at `--para-r` (12); LoRA (on `--lora-targets`, default q_proj,v_proj) gets the rank whose count is
closest to PARA's (`--lora-r` overrides); (IA)³ has no rank and is far smaller. The counts are printed.
Learning rates: --lr for every run when given; otherwise each method's DEFAULT_LR (train/config.py, from the lr
sweep), and SHORT_ANSWER_LR on tasks whose answers are a word or two (BoolQ).
Steps: --max-steps (else --epochs) times the task's `budget_scale` (COPA: 3; the others 1), for every method.
Zero-shot (train/zero_shot.py): the base model, beam search (width `--beams`), no adapter, up to the longest test
response + 8 tokens (room for a preamble), the first non-empty line of the output scored by the task's metric.
Prompts go through the model's chat template when its tokenizer has one (`--chat` / `--no-chat` force it), for the
fine-tuned runs and the zero-shot row alike. Each cell is the mean ± std over seeds of the test score, in percent;
with PARA and LoRA both run, a last row gives their per-seed difference (same seed, same data) and on how many
seeds PARA ≥ LoRA.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import platform
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from infer.cli import ArgumentParser
from train.config import DEFAULT_LR, DEFAULT_RANK, METHODS, SHORT_ANSWER_LR, FinetuneConfig, FinetuneResult
from train.finetune import finetune
from train.suite_report import LABELS, cell_stats, format_table, paired, para_wins, plot
from train.tasks import TASKS
from train.zero_shot import zero_shot
from weights.io import atomic_write, read_json

PARA_ONLY = ("pool_norm", "down_lr_rsqrt")  # finetune settings that only PARA runs take
FINETUNE_KEYS = {f.name for f in dataclasses.fields(FinetuneConfig)} - {
    "train",
    "dev",
    "test",
    "out",
    "model",
    "method",
    "chat",
    "r",
    "seed",
    "beams",
    "resume",
    "stop_after",
    "progress",
}


class SuiteError(ValueError):
    """A bad suite setting; the one-line message names it."""


@dataclass
class SuiteConfig:
    out: str
    methods: tuple[str, ...] = METHODS
    tasks: tuple[str, ...] = tuple(TASKS)
    seeds: int = 3  # training seeds 0 .. seeds-1
    model: str = "default"
    chat: bool | None = None  # None: the chat template when the tokenizer has one
    data_seed: int = 0
    n_train: int = 1000
    n_dev: int = 100
    n_test: int = 100
    para_r: int = DEFAULT_RANK["para"]
    lora_r: int | None = None  # None: matched to PARA's count
    beams: int = 3
    zero_shot: bool = True
    progress: bool = True
    report_only: bool = False  # summarise the runs OUT holds (a suite spread over sessions); train nothing
    finetune: dict[str, Any] = field(default_factory=dict)  # other FinetuneConfig fields: max_steps, lr, ...

    def check(self) -> None:
        unknown = [m for m in self.methods if m not in METHODS]
        if unknown or not self.methods:
            raise SuiteError(f"--methods: unknown {unknown or 'none given'} (choose from {', '.join(METHODS)})")
        unknown = [t for t in self.tasks if t not in TASKS]
        if unknown or not self.tasks:
            raise SuiteError(f"--tasks: unknown {unknown or 'none given'} (choose from all, {', '.join(TASKS)})")
        bad = sorted(set(self.finetune) - FINETUNE_KEYS)
        if bad:
            raise SuiteError(f"finetune settings not allowed here: {', '.join(bad)}")
        for name in ("seeds", "n_train", "n_dev", "n_test", "para_r", "beams"):
            if getattr(self, name) < 1:
                raise SuiteError(f"--{name.replace('_', '-')} must be positive, got {getattr(self, name)}")
        if self.lora_r is not None and self.lora_r < 1:
            raise SuiteError(f"--lora-r must be positive, got {self.lora_r}")


# ---- data -----------------------------------------------------------------------------------------------
def prepare_data(config: SuiteConfig) -> dict[str, dict[str, Path]]:
    """{task: {split: path}} under OUT/data, generated unless the same settings already wrote them."""
    out = Path(config.out)
    paths = {}
    for name in config.tasks:
        d = out / "data" / name
        meta = {
            "task": name,
            "seed": config.data_seed,
            "n_train": config.n_train,
            "n_dev": config.n_dev,
            "n_test": config.n_test,
        }
        split_paths = {s: d / f"{s}.jsonl" for s in ("train", "dev", "test")}
        meta_path = d / "meta.json"
        if (
            meta_path.exists()
            and read_json(meta_path, SuiteError) == meta
            and all(p.exists() for p in split_paths.values())
        ):
            paths[name] = split_paths
            continue
        if (out / "runs" / name).exists() or (out / "zero_shot" / name).exists():
            raise SuiteError(f"--out {out}: {name} has results on other data settings; choose another --out")
        paths[name] = TASKS[name].generate(d, config.data_seed, config.n_train, config.n_dev, config.n_test)
        atomic_write(meta_path, json.dumps(meta) + "\n")
    return paths


# settings that shape a run's result: finished runs in OUT are only reused under the same ones
NEUTRAL = ("device", "eval_batch_size", "log_every")


def check_settings(config: SuiteConfig) -> None:
    """Record the result-shaping settings in OUT/settings.json on the first invocation; refuse other ones later."""
    path = Path(config.out) / "settings.json"
    finetune_args = {k: v for k, v in sorted(config.finetune.items()) if k not in NEUTRAL}
    settings = {
        "model": config.model,
        "chat": config.chat,
        "beams": config.beams,
        "para_r": config.para_r,
        "lora_r": config.lora_r,
        "finetune": finetune_args,
        "default_lr": DEFAULT_LR,
        "short_answer_lr": SHORT_ANSWER_LR,
        "budget_scale": {t.name: t.budget_scale for t in TASKS.values() if t.budget_scale != 1},
    }
    settings = json.loads(json.dumps(settings))  # tuples as lists, as read back
    if not path.exists():
        atomic_write(path, json.dumps(settings, indent=2) + "\n")
        return
    saved = read_json(path, SuiteError)
    if saved != settings:
        diff = ", ".join(
            f"{k}: {saved.get(k)!r} -> {settings.get(k)!r}" for k in settings if saved.get(k) != settings.get(k)
        )
        raise SuiteError(f"--out {config.out} holds runs made with other settings ({diff}); choose another --out")


# ---- budgets --------------------------------------------------------------------------------------------
def parameter_budgets(model: Any, config: SuiteConfig) -> dict[str, dict[str, Any]]:
    """{method: {"r": rank or None, "params": tunable count}}; LoRA's rank matched to PARA unless given."""
    from model.peft import IA3Config, LoRAConfig, PARAConfig, create_adapter

    targets = tuple(config.finetune.get("lora_targets", FinetuneConfig("", "", "").lora_targets))
    para = create_adapter(model, PARAConfig(r=config.para_r)).num_trainable()
    per_rank = create_adapter(model, LoRAConfig(r=1, lora_alpha=1, target_modules=targets)).num_trainable()
    lora_r = config.lora_r or max(1, round(para / per_rank))
    ia3 = create_adapter(model, IA3Config()).num_trainable()
    return {
        "para": {"r": config.para_r, "params": para},
        "lora": {"r": lora_r, "params": lora_r * per_rank, "targets": list(targets)},
        "ia3": {"r": None, "params": ia3},
    }


def describe_budgets(budgets: dict[str, dict[str, Any]]) -> str:
    para = budgets["para"]["params"]
    lines = []
    for method in METHODS:
        b = budgets[method]
        rank = f" r={b['r']}" if b["r"] is not None else ""
        lines.append(f"{LABELS[method]}{rank}: {b['params']:,} tunable parameters ({b['params'] / para:.1%} of PARA)")
    return "\n".join(lines)


# ---- runs -----------------------------------------------------------------------------------------------
def run_dir(config: SuiteConfig, task: str, method: str, seed: int) -> Path:
    return Path(config.out) / "runs" / task / method / f"seed{seed}"


def run_lr(config: SuiteConfig, task: str, method: str) -> float:
    """The run's learning rate: --lr when given, else SHORT_ANSWER_LR for a short-answer task, else DEFAULT_LR."""
    if "lr" in config.finetune:
        return float(config.finetune["lr"])
    return (SHORT_ANSWER_LR if TASKS[task].short_answer else DEFAULT_LR)[method]


def run_budget(config: SuiteConfig, task: str) -> dict[str, int]:
    """The run's length: --max-steps (else --epochs) times the task's `budget_scale`, the same for every method."""
    scale = TASKS[task].budget_scale
    if config.finetune.get("max_steps") is not None:
        return {"max_steps": int(config.finetune["max_steps"]) * scale}
    return {"epochs": int(config.finetune.get("epochs", FinetuneConfig.epochs)) * scale}


def train_one(
    model: Any, config: SuiteConfig, task: str, method: str, seed: int, paths: dict[str, Path], rank: int | None
) -> dict[str, Any]:
    """Fine-tune and test one cell's seed (skipped when its result.json exists); the result as a dict."""
    out = run_dir(config, task, method, seed)
    done = out / "result.json"
    if done.exists():
        print(f"skip {task}/{method}/seed{seed}: {done} exists", file=sys.stderr)
        result = read_json(done, SuiteError)
        wall = out / "wall.json"
        result["wall_seconds"] = read_json(wall, SuiteError)["seconds"] if wall.exists() else None
        return result | {"skipped": True}
    print(f"run {task}/{method}/seed{seed} -> {out}", file=sys.stderr)
    fc = FinetuneConfig(
        train=str(paths["train"]),
        dev=str(paths["dev"]),
        test=str(paths["test"]),
        out=str(out),
        model=config.model,
        method=method,
        chat=config.chat,
        r=rank,
        seed=seed,
        beams=config.beams,
        resume=(out / "last").exists(),
        progress=config.progress,
        lr=run_lr(config, task, method),
        **run_budget(config, task),
        **{
            k: v
            for k, v in config.finetune.items()
            if k not in ("lr", "max_steps", "epochs") and (method == "para" or k not in PARA_ONLY)
        },
    )
    t0 = time.perf_counter()
    result: FinetuneResult = finetune(fc, model=model, metric=TASKS[task].metric)
    wall = time.perf_counter() - t0
    atomic_write(out / "wall.json", json.dumps({"seconds": wall}) + "\n")
    return dataclasses.asdict(result) | {"wall_seconds": wall, "skipped": False}


def zero_shot_cached(model: Any, config: SuiteConfig, task: str, paths: dict[str, Path]) -> float:
    out = Path(config.out) / "zero_shot" / task
    done = out / "result.json"
    if done.exists():
        print(f"skip zero-shot {task}: {done} exists", file=sys.stderr)
        return float(read_json(done, SuiteError)["test_score"])
    print(f"zero-shot {task}", file=sys.stderr)
    batch = config.finetune.get("eval_batch_size") or config.finetune.get("batch_size") or 16
    t0 = time.perf_counter()
    score = zero_shot(
        model, TASKS[task], paths["test"], chat=config.chat, beams=config.beams, batch_size=batch, out=out
    )
    result = {"test_score": score, "metric": TASKS[task].metric.__name__, "wall_seconds": time.perf_counter() - t0}
    atomic_write(done, json.dumps(result, indent=2) + "\n")
    return score


# ---- the suite ------------------------------------------------------------------------------------------
def run_suite(config: SuiteConfig, model: Any = None, command: str | None = None) -> dict[str, Any]:
    """Run (or resume) the whole suite; writes and returns the summary (also OUT/suite.json, OUT/table.md)."""
    config.check()
    out = Path(config.out)
    out.mkdir(parents=True, exist_ok=True)
    check_settings(config)
    paths = prepare_data(config)
    if model is None:
        from model import Llama

        device = config.finetune.get("device") or ("cuda" if torch.cuda.is_available() else "cpu")
        model = Llama.from_pretrained(config.model, device=device)
    if config.chat is None:
        has_template = getattr(model.tokenizer, "chat_template", None) is not None
        config = dataclasses.replace(config, chat=has_template)
    print(f"prompts: {'the chat template' if config.chat else 'plain text'}", file=sys.stderr)
    budgets = parameter_budgets(model, config)
    print(describe_budgets(budgets), file=sys.stderr)
    para, lora = budgets["para"]["params"], budgets["lora"]["params"]
    if abs(lora - para) > 0.15 * para:
        print(f"warning: LoRA's budget is {lora / para:.0%} of PARA's (outside ±15%)", file=sys.stderr)

    zero, zero_wall = {}, 0.0
    for t in config.tasks if config.zero_shot else ():
        done = Path(config.out) / "zero_shot" / t / "result.json"
        if not config.report_only or done.exists():
            zero[t] = zero_shot_cached(model, config, t, paths[t])
            zero_wall += read_json(done, SuiteError).get("wall_seconds") or 0.0
    runs = []
    for seed in range(config.seeds):  # seed-major: after the first pass every cell has a value
        for task in config.tasks:
            for method in config.methods:
                if config.report_only and not (run_dir(config, task, method, seed) / "result.json").exists():
                    continue
                r = train_one(model, config, task, method, seed, paths[task], budgets[method]["r"])
                runs.append({"task": task, "method": method, "seed": seed} | r)

    cells = cell_stats(runs)
    summary = {
        "command": command,
        "machine": {
            "platform": platform.platform(),
            "processor": platform.processor(),
            "cpus": os.cpu_count(),
            "torch": torch.__version__,
            "threads": torch.get_num_threads(),
            "cuda": torch.cuda.get_device_name(0) if torch.cuda.is_available() else None,
        },
        "config": dataclasses.asdict(config),
        "methods": list(config.methods),
        "tasks": list(config.tasks),
        "seeds": config.seeds,
        "budgets": budgets,
        "zero_shot": zero,
        "cells": cells,
        "runs": runs,
        "finished": f"{len(runs)}/{config.seeds * len(config.tasks) * len(config.methods)} runs",
        # wall time of the finished runs and zero-shot rows, each as first run (a resumed run: its last part)
        "wall_seconds": sum(r.get("wall_seconds") or 0.0 for r in runs) + zero_wall,
        "paired": paired(runs) if {"para", "lora"} <= set(config.methods) else {},
        "para_wins": para_wins(cells, list(config.tasks)),
    }
    summary["table"] = format_table(summary)
    atomic_write(out / "suite.json", json.dumps(summary, indent=2, default=str) + "\n")
    atomic_write(out / "table.md", summary["table"])
    summary["plot"] = str(out / "suite.png") if plot(summary, out / "suite.png") else None
    return summary


# ---- command line ---------------------------------------------------------------------------------------
def build_parser() -> argparse.ArgumentParser:
    d = SuiteConfig("")
    p = ArgumentParser(prog="python -m train.suite", description=__doc__.splitlines()[0])
    a = p.add_argument
    a("--methods", default=",".join(METHODS), help="comma-separated: para,lora,ia3")
    a("--tasks", default="all", help=f"'all' or comma-separated: {','.join(TASKS)}")
    a("--seeds", type=int, default=d.seeds, help="training seeds 0..N-1 per (method, task)")
    a("--out", required=True, help="output directory (resumable)")
    a("--model", default=d.model, help="'default' (SmolLM2-135M-Instruct), a .gguf file, a Meta or an HF directory")
    a(
        "--chat",
        action=argparse.BooleanOptionalAction,
        help="wrap prompts in the chat template (default: when the tokenizer has one)",
    )
    a("--data-seed", type=int, default=d.data_seed)
    a("--n-train", type=int, default=d.n_train)
    a("--n-dev", type=int, default=d.n_dev)
    a("--n-test", type=int, default=d.n_test)
    a("--para-r", type=int, default=d.para_r)
    a("--lora-r", type=int, help="default: the rank whose count is closest to PARA's")
    a("--beams", type=int, default=d.beams, help="beam width for test decoding (zero-shot too)")
    a("--no-zero-shot", dest="zero_shot", action="store_false", help="skip the base-model row")
    a("--no-progress", dest="progress", action="store_false")
    a("--report-only", action="store_true", help="summarise the finished runs in OUT, train nothing")
    ft = p.add_argument_group("fine-tuning (passed to train.finetune)")
    for flag, kind in (
        ("max-steps", int),
        ("epochs", int),
        ("batch-size", int),
        ("grad-accum", int),
        ("lr", float),
        ("eval-every", int),
        ("patience", int),
        ("eval-batch-size", int),
        ("max-len", int),
        ("max-new-tokens", int),
        ("lora-alpha", float),
        ("lora-dropout", float),
        ("weight-decay", float),
        ("warmup-ratio", float),
        ("device", str),
    ):
        ft.add_argument(f"--{flag}", type=kind)
    ft.add_argument("--lora-targets", help="comma-separated projections (default q_proj,v_proj)")
    ft.add_argument(
        "--no-pool-norm", dest="pool_norm", action="store_const", const=False, help="PARA in the paper's exact form"
    )
    return p


def config_from_args(a: dict[str, Any]) -> SuiteConfig:
    finetune_args = {k: a.pop(k) for k in list(a) if k in FINETUNE_KEYS}
    finetune_args = {k: v for k, v in finetune_args.items() if v is not None}
    if "lora_targets" in finetune_args:
        finetune_args["lora_targets"] = tuple(t.strip() for t in finetune_args["lora_targets"].split(",") if t.strip())
    methods = tuple(m.strip() for m in a.pop("methods").split(",") if m.strip())
    tasks = a.pop("tasks")
    tasks = tuple(TASKS) if tasks == "all" else tuple(t.strip() for t in tasks.split(",") if t.strip())
    return SuiteConfig(methods=methods, tasks=tasks, finetune=finetune_args, **a)


def main(argv: list[str] | None = None) -> int:
    try:
        args = vars(build_parser().parse_args(argv))
    except SystemExit as e:
        return int(e.code or 0)
    try:
        config = config_from_args(args)
        command = "python -m train.suite " + " ".join(sys.argv[1:] if argv is None else argv)
        summary = run_suite(config, command=command)
    except (ValueError, OSError) as e:  # SuiteError, TrainError, DataError, CheckpointError are ValueErrors
        print(f"error: {e}", file=sys.stderr)
        return 2
    print(summary["table"])
    print(f"finished: {summary['finished']}, wall time {summary['wall_seconds'] / 3600:.2f} h")
    wins = summary["para_wins"]
    print(f"PARA >= the other methods on {len(wins)}/{len(summary['tasks'])} tasks: {', '.join(wins) or 'none'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
