"""`torchrun --nproc_per_node 2 -m train.finetune` (gloo, CPU) against one process with the same global batch."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from tests.test_train import make_tiny_dir, write_toy
from train.finetune import FinetuneConfig, finetune

ROOT = Path(__file__).resolve().parents[1]


def test_two_gloo_processes_equal_one(tmp_path):
    tiny, toy = make_tiny_dir(tmp_path / "tiny"), write_toy(tmp_path / "data")
    # 64 examples in micro-batches of 7: ranks get 4 + 3 examples, and the last micro-batch (1 example)
    # leaves rank 1 with nothing; 2 micro-batches per step, 5 steps, evals at 0, 2, 4, 5
    flags = dict(method="para", lr=3e-2, batch_size=7, grad_accum=2, epochs=1, eval_every=2, log_every=1)
    argv = [f"--{k.replace('_', '-')}={v}" for k, v in flags.items()]
    argv += [f"--model={tiny}", f"--train={toy['train']}", f"--dev={toy['dev']}", f"--test={toy['test']}"]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT)}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2", "-m", "train.finetune"]
    proc = subprocess.run(
        cmd + argv + [f"--out={tmp_path / 'ddp'}", "--no-progress"],
        cwd=ROOT, env=env, capture_output=True, text=True, timeout=240,
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr[-12000:]
    ddp = json.loads(proc.stdout.strip().splitlines()[-1])  # rank 0 prints the result
    assert ddp["world_size"] == 2 and ddp["steps"] == 5

    n = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        cfg = FinetuneConfig(
            **flags, model=str(tiny), train=str(toy["train"]), dev=str(toy["dev"]), test=str(toy["test"]),
            out=str(tmp_path / "one"), progress=False,
        )  # fmt: skip
        one = finetune(cfg)
    finally:
        torch.set_num_threads(n)
    assert one.world_size == 1 and one.steps == 5

    def rows(run: str) -> list[dict]:
        return [json.loads(s) for s in (tmp_path / run / "metrics.jsonl").read_text().splitlines()]

    a, b = rows("ddp"), rows("one")
    assert [(r["event"], r["step"]) for r in a] == [(r["event"], r["step"]) for r in b]
    assert sum(r["event"] == "train" for r in a) == 5 and sum(r["event"] == "eval" for r in a) == 4
    for ra, rb in zip(a, b):
        for key in ("train_loss", "dev_loss", "lr", "score"):
            if key in ra:
                assert ra[key] == pytest.approx(rb[key], rel=1e-5, abs=1e-6), (ra, rb)
    assert ddp["best_dev_loss"] == pytest.approx(one.best_dev_loss, rel=1e-5)
    assert ddp["best_dev_loss"] < 0.97 * ddp["initial_dev_loss"]  # it trained
    for sub in ("best", "last"):
        ta = load_file(tmp_path / "ddp" / sub / "adapter_model.safetensors")
        tb = load_file(tmp_path / "one" / sub / "adapter_model.safetensors")
        assert ta.keys() == tb.keys()
        for k in ta:
            torch.testing.assert_close(ta[k], tb[k], rtol=0, atol=1e-5)
    preds = [(tmp_path / r / "test_predictions.jsonl").read_text() for r in ("ddp", "one")]
    assert preds[0] == preds[1]  # the ranks' halves of the test set, gathered in order
