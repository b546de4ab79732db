"""`torchrun --nproc_per_node 2 -m train.finetune` (gloo, CPU) against one process with the same global batch."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import torch
from safetensors.torch import load_file

from model import Llama
from tests import tolerance
from tests.test_train import make_tiny_dir, write_toy
from train.data import load_dataset
from train.ddp import World
from train.evaluate import dev_loss
from train.finetune import FinetuneConfig, finetune
from weights.adapters import load_adapter

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
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=240,
    )
    assert proc.returncode == 0, proc.stderr[-12000:]
    ddp = json.loads(proc.stdout.strip().splitlines()[-1])  # rank 0 prints the result
    assert ddp["world_size"] == 2 and ddp["steps"] == 5

    n = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        cfg = FinetuneConfig(
            **flags,
            model=str(tiny),
            train=str(toy["train"]),
            dev=str(toy["dev"]),
            test=str(toy["test"]),
            out=str(tmp_path / "one"),
            progress=False,
        )
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
                assert ra[key] == tolerance.approx(rb[key], tolerance.TRAINED), (ra, rb)
    assert ddp["best_dev_loss"] == tolerance.approx(one.best_dev_loss, tolerance.TRAINED)
    assert ddp["best_dev_loss"] < 0.97 * ddp["initial_dev_loss"]  # it trained
    # The files, compared by what they do: Adam's first steps move a weight whose gradient is ~0 by +-lr on
    # the sign of rounding noise, so single weights of the two runs may differ (by up to 2.5e-3 of max|w| in
    # tests/measure_tolerance.py) while the models they make agree to TRAINED's bound.
    for sub in ("best", "last"):
        ta, tb = (load_file(tmp_path / r / sub / "adapter_model.safetensors") for r in ("ddp", "one"))
        assert {k: t.shape for k, t in ta.items()} == {k: t.shape for k, t in tb.items()}
        la, lb = file_dev_losses(tmp_path / "ddp" / sub, tmp_path / "one" / sub, model_dir=tiny, dev=toy["dev"])
        assert la == tolerance.approx(lb, tolerance.TRAINED), sub
        logged = ddp["best_dev_loss"] if sub == "best" else [r for r in a if r["event"] == "eval"][-1]["dev_loss"]
        assert la == tolerance.approx(logged, tolerance.TRAINED), sub  # the file is the state that was scored
    preds = [(tmp_path / r / "test_predictions.jsonl").read_text() for r in ("ddp", "one")]
    assert preds[0] == preds[1]  # the ranks' halves of the test set, gathered in order


def file_dev_losses(*adapters: Path, model_dir: Path, dev: Path) -> list[float]:
    """Each adapter directory's mean dev loss on the model in `model_dir` (one process)."""
    model = Llama.from_pretrained(model_dir)
    data = load_dataset(dev, model.tokenizer, chat=False, max_len=model.args.max_seq_len)
    with torch.no_grad():
        return [dev_loss(model, load_adapter(a, model), data, 16, World()) for a in adapters]
