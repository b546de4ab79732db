"""Learning-rate sweep of PARA (normalised pool and the paper's raw pool), LoRA and (IA)³ at a fixed budget.

    python -m bench.lr_sweep --out bench/results/lr_sweep_cpu --work /tmp/lr_sweep    # run (resumable)
    python -m bench.lr_sweep --out bench/results/lr_sweep_cpu --report                # table.md from the JSONs

Every (variant, task, lr) is one `train.finetune` run on the same model, loaded once: `--n-train` examples of
a train/tasks generator (96), `--steps` optimizer steps of `--batch-size` (30 x 8), dev loss on `--n-dev`
examples every `--eval-every` steps (10), no test generation. Each finished run writes
`OUT/runs/VARIANT/TASK/lrLR.json` (result, dev-loss and train-loss curves, wall and CPU seconds) and is skipped
next time; the fine-tuning directories (adapters, resume checkpoints) live under `--work`, so an interrupted
run resumes from its last evaluation. `OUT/sweep.json` (every run + the picked learning rates) and
`OUT/table.md` are rewritten atomically after each run.

A run counts as diverged when train.finetune stopped it as diverged (a non-finite loss, or the dev loss above
its step-0 value for 2 evaluations in a row) or its last dev loss is above the step-0 one, and as spiked when a
train loss rose above 1.5x the first step's (then recovered). `pick_lrs` states the rule for each method's
default learning rate.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import math
import os
import platform
import statistics
import sys
import time
from pathlib import Path
from typing import Any

import torch

from weights.io import atomic_write

LRS = (1e-4, 3e-4, 1e-3, 3e-3, 1e-2)
TASK_NAMES = ("hsm", "q2sql")
# variant -> (method, extra FinetuneConfig fields)
VARIANTS: dict[str, tuple[str, dict[str, Any]]] = {
    "para": ("para", {}),
    "para_paper": ("para", {"pool_norm": False}),
    "para_downlr": ("para", {"down_lr_rsqrt": True}),
    "lora": ("lora", {}),
    "ia3": ("ia3", {}),
}
LABELS = {
    "para": "PARA (pool norm)",
    "para_paper": "PARA (paper form)",
    "para_downlr": "PARA (pool norm, W_down lr/√d)",
    "lora": "LoRA r=8",
    "ia3": "(IA)³",
}
PRIORITY = (1e-3, 3e-3, 1e-2, 3e-4, 1e-4)  # the run order
TIE = 0.02  # relative: scores within 2% of the best count as a tie
SPIKE = 1.5  # a train loss above 1.5x the first step's marks a transient blow-up


def lr_key(lr: float) -> str:
    return f"{lr:.0e}".replace("e-0", "e-")


def run_path(out: Path, variant: str, task: str, lr: float) -> Path:
    return out / "runs" / variant / task / f"lr{lr_key(lr)}.json"


def is_diverged(run: dict[str, Any]) -> bool:
    """Stopped as diverged by train.finetune, or ended above its step-0 dev loss."""
    r = run["result"]
    last = run["dev_curve"][-1][1] if run["dev_curve"] else math.nan
    return bool(r["diverged"]) or not math.isfinite(last) or last > r["initial_dev_loss"]


def is_spiked(run: dict[str, Any]) -> bool:
    """A transient blow-up: some later step's train loss above SPIKE x the first step's (batch-to-batch noise
    stays under 1.25x in this sweep; the runs it flags reach 2.5x and more)."""
    losses = [loss for _, loss in run["train_curve"]]
    return len(losses) > 1 and max(losses[1:]) > SPIKE * losses[0]


def score(run: dict[str, Any]) -> float:
    """Best dev loss relative to the step-0 one (lower is better; 1.0: no improvement)."""
    r = run["result"]
    return r["best_dev_loss"] / r["initial_dev_loss"]


def pick_lrs(runs: list[dict[str, Any]]) -> dict[str, dict[str, Any]]:
    """Each variant's default lr. Rule: among the stable lrs (on every task: not diverged, improved on step 0,
    no train-loss spike), the one with the lowest median over tasks of best/step-0 dev loss; scores within TIE
    (2%) of that lowest count as a tie, and a tie goes to the larger lr (it keeps learning past a 30-step
    budget); None when no lr qualifies."""
    picks: dict[str, dict[str, Any]] = {}
    for variant in dict.fromkeys(r["variant"] for r in runs):
        by_lr: dict[float, list[dict[str, Any]]] = {}
        for r in runs:
            if r["variant"] == variant:
                by_lr.setdefault(r["lr"], []).append(r)
        tasks = {r["task"] for r in runs if r["variant"] == variant}
        stable = {
            lr: statistics.median(score(r) for r in rs)
            for lr, rs in by_lr.items()
            if {r["task"] for r in rs} == tasks
            and not any(is_diverged(r) or is_spiked(r) for r in rs)
            and all(r["result"]["improved"] for r in rs)
        }
        if not stable:
            picks[variant] = {"lr": None, "median_ratio": None, "stable": []}
            continue
        best = min(stable.values())
        lr = max(lr for lr, s in stable.items() if s <= best * (1 + TIE))
        picks[variant] = {"lr": lr, "median_ratio": stable[lr], "stable": sorted(stable)}
    return picks


def format_table(runs: list[dict[str, Any]]) -> str:
    """Best dev loss per variant x task (rows) and lr (columns); † = diverged, ‡ = never beat step 0."""
    lrs = sorted(set(LRS) | {r["lr"] for r in runs})
    tasks = list(dict.fromkeys(r["task"] for r in runs))
    variants = [v for v in VARIANTS if any(r["variant"] == v for r in runs)]
    variants += [v for v in dict.fromkeys(r["variant"] for r in runs) if v not in variants]
    cell = {(r["variant"], r["task"], r["lr"]): r for r in runs}
    head = "| method | task | step 0 | " + " | ".join(f"lr {lr:g}" for lr in lrs) + " |"
    lines = [head, "|" + "---|" * (3 + len(lrs))]
    for v in variants:
        for t in tasks:
            row, init = [], ""
            for lr in lrs:
                r = cell.get((v, t, lr))
                if r is None:
                    row.append("–")
                    continue
                init = f"{r['result']['initial_dev_loss']:.3f}"
                mark = "†" if is_diverged(r) else "*" if is_spiked(r) else "" if r["result"]["improved"] else "‡"
                row.append(f"{r['result']['best_dev_loss']:.3f}{mark}")
            lines.append(f"| {LABELS.get(v, v)} | {t} | {init} | " + " | ".join(row) + " |")
    picks = pick_lrs(runs)
    lines += ["", "Picked (rule in bench/lr_sweep.py `pick_lrs`):"]
    for v, p in picks.items():
        lr = "none" if p["lr"] is None else f"{p['lr']:g}"
        stable = ", ".join(f"{x:g}" for x in p["stable"]) or "none"
        ratio = "" if p["median_ratio"] is None else f", median best/step-0 {p['median_ratio']:.3f}"
        lines.append(f"- {LABELS.get(v, v)}: lr {lr}{ratio} (stable: {stable})")
    lines += ["", "Best dev loss (response tokens); † diverged (stopped as diverged, or ended above step 0);"]
    lines += [f"* spiked (a train loss above {SPIKE:g}x the first step's, then recovered); ‡ never beat step 0."]
    return "\n".join(lines) + "\n"


def collect(out: Path) -> list[dict[str, Any]]:
    runs = [json.loads(p.read_text()) for p in sorted((out / "runs").glob("*/*/*.json"))]
    return sorted(
        runs, key=lambda r: (list(VARIANTS).index(r["variant"]) if r["variant"] in VARIANTS else 99, r["task"], r["lr"])
    )


def write_summary(out: Path, meta: dict[str, Any]) -> list[dict[str, Any]]:
    runs = collect(out)
    summary = meta | {"lrs": sorted({r["lr"] for r in runs}), "picks": pick_lrs(runs), "runs": runs}
    atomic_write(out / "sweep.json", json.dumps(summary, indent=2) + "\n")
    atomic_write(out / "table.md", format_table(runs))
    return runs


def prepare_data(work: Path, a: argparse.Namespace) -> dict[str, dict[str, Path]]:
    from train.tasks import TASKS

    paths = {}
    for t in a.tasks:
        d = work / "data" / t
        split = {s: d / f"{s}.jsonl" for s in ("train", "dev", "test")}
        if not all(p.exists() for p in split.values()):
            split = TASKS[t].generate(d, a.data_seed, a.n_train, a.n_dev, 1)
        paths[t] = split
    return paths


def one_run(model: Any, a: argparse.Namespace, variant: str, task: str, lr: float, data: dict[str, Path]) -> dict:
    from train.config import FinetuneConfig
    from train.finetune import finetune

    method, extra = VARIANTS[variant]
    fdir = Path(a.work) / "runs" / variant / task / f"lr{lr_key(lr)}"
    resume = (fdir / "last").exists()
    if fdir.exists() and not resume:  # died before its first checkpoint: start over
        import shutil

        shutil.rmtree(fdir)
    cfg = FinetuneConfig(
        train=str(data["train"]),
        dev=str(data["dev"]),
        out=str(fdir),
        method=method,
        chat=a.chat,
        lr=lr,
        batch_size=a.batch_size,
        max_steps=a.steps,
        eval_every=a.eval_every,
        log_every=1,
        patience=100,  # a fixed budget: no early stopping
        seed=a.seed,
        resume=resume,
        progress=False,
        **extra,
    )
    wall, cpu = time.perf_counter(), time.process_time()
    result = finetune(cfg, model=model)
    wall, cpu = time.perf_counter() - wall, time.process_time() - cpu
    log = [json.loads(s) for s in (fdir / "metrics.jsonl").read_text().splitlines() if s.strip()]
    return {
        "variant": variant,
        "method": method,
        "extra": extra,
        "task": task,
        "lr": lr,
        "resumed": resume,
        "wall_seconds": wall,
        "cpu_seconds": cpu,
        "result": dataclasses.asdict(result),
        "dev_curve": [[e["step"], e["dev_loss"]] for e in log if e["event"] == "eval"],
        "train_curve": [[e["step"], e["train_loss"]] for e in log if e["event"] == "train"],
    }


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m bench.lr_sweep", description=__doc__.splitlines()[0])
    a = p.add_argument
    a("--out", default="bench/results/lr_sweep_cpu", help="JSON results, sweep.json, table.md")
    a("--work", default="/tmp/lr_sweep", help="fine-tuning directories and generated data (large)")
    a("--model", default="default")
    a("--variants", default=",".join(VARIANTS), help=f"comma-separated: {','.join(VARIANTS)}")
    a("--tasks", default=",".join(TASK_NAMES))
    a("--lrs", default=",".join(f"{x:g}" for x in LRS))
    a("--n-train", type=int, default=96)
    a("--n-dev", type=int, default=16)
    a("--steps", type=int, default=30)
    a("--batch-size", type=int, default=8)
    a("--eval-every", type=int, default=10)
    a("--seed", type=int, default=0)
    a("--data-seed", type=int, default=0)
    a("--chat", action=argparse.BooleanOptionalAction, default=False, help="chat template (default: plain)")
    a("--threads", type=int, help="torch intra-op threads (default: torch's)")
    a("--report", action="store_true", help="only rewrite sweep.json and table.md from the run JSONs")
    args = p.parse_args(argv)
    args.variants = [v for v in args.variants.split(",") if v]
    args.tasks = [t for t in args.tasks.split(",") if t]
    lrs = [float(x) for x in args.lrs.split(",") if x]
    bad = [v for v in args.variants if v not in VARIANTS]
    if bad:
        p.error(f"--variants: unknown {bad}")
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    if args.threads:
        torch.set_num_threads(args.threads)
    settings = {k: getattr(args, k) for k in ("model", "n_train", "n_dev", "steps", "batch_size", "eval_every")}
    settings |= {"seed": args.seed, "data_seed": args.data_seed, "chat": args.chat}
    meta = {
        "settings": settings,
        "machine": {
            "platform": platform.platform(),
            "cpus": os.cpu_count(),
            "torch": torch.__version__,
            "threads": torch.get_num_threads(),
        },
    }
    if args.report:
        if (out / "sweep.json").exists():  # keep what the running invocation recorded
            old = json.loads((out / "sweep.json").read_text())
            meta = {k: old.get(k, v) for k, v in meta.items()}
        write_summary(out, meta)
        print((out / "table.md").read_text())
        return 0
    from model import Llama

    work = Path(args.work)
    data = prepare_data(work, args)
    model = Llama.from_pretrained(args.model)
    # lr-major, most telling lrs first: a cut-short sweep has every variant at the lrs it did reach
    order = [lr for lr in PRIORITY if lr in lrs] + [lr for lr in lrs if lr not in PRIORITY]
    for lr in order:
        for variant in args.variants:
            for task in args.tasks:
                path = run_path(out, variant, task, lr)
                if path.exists():
                    continue
                print(f"run {variant} {task} lr {lr:g}", file=sys.stderr, flush=True)
                run = one_run(model, args, variant, task, lr, data[task])
                run["settings"] = settings
                path.parent.mkdir(parents=True, exist_ok=True)
                atomic_write(path, json.dumps(run, indent=2) + "\n")
                r = run["result"]
                print(
                    f"  best {r['best_dev_loss']:.4f} (step 0 {r['initial_dev_loss']:.4f}) diverged={is_diverged(run)} "
                    f"wall {run['wall_seconds']:.0f}s cpu {run['cpu_seconds']:.0f}s",
                    file=sys.stderr,
                    flush=True,
                )
                write_summary(out, meta)
    write_summary(out, meta)
    print((out / "table.md").read_text())
    return 0


if __name__ == "__main__":
    sys.exit(main())
