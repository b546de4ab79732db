"""Decode with the compiled layer's GEMVs on its own thread pool against numpy's OpenBLAS `cblas_sgemv`
(kernels/native.py, PARALLAMA_GEMV=pool | blas), in alternating processes.

    python -m bench.gemv_ab --rounds 6 --json bench/results/gemv_ab.json

Both pools spin while idle, so they cannot take turns in one process without slowing each other: each round
starts one process per choice, in turn; a process loads the model, warms up, and times `--reps` pairs of a
1-token and a (1 + N)-token greedy generation of the same prompt; its decode step is the median of their
difference / N. Each process also checks the greedy tokens, which must be the same for both choices. The
speed-up is the median of the per-round ratios.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

CHOICES = ("blas", "pool")


def child(a: argparse.Namespace) -> int:
    """One process: print {"step_ms", "tokens"} for the GEMV choice in PARALLAMA_GEMV."""
    from infer.engine import Engine, SamplingParams
    from model import Llama

    engine = Engine(Llama.from_pretrained(a.model, backend="cpu"))
    ids = [1000 + i % 20000 for i in range(a.prompt_len)]

    def run(n: int) -> tuple[float, list[int]]:
        t0 = time.perf_counter()
        out = engine.generate([ids], SamplingParams(max_new_tokens=n, temperature=0))
        return time.perf_counter() - t0, list(out[0].token_ids)

    run(4)
    steps, tokens = [], []
    for _ in range(a.reps):
        one, _ = run(1)
        many, tokens = run(1 + a.new_tokens)
        steps.append((many - one) / a.new_tokens * 1e3)
    print(json.dumps({"step_ms": statistics.median(steps), "tokens": tokens}))
    return 0


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m bench.gemv_ab", description=__doc__.splitlines()[0])
    p.add_argument("--model", default="default")
    p.add_argument("--prompt-len", type=int, default=274)
    p.add_argument("--new-tokens", type=int, default=32)
    p.add_argument("--rounds", type=int, default=6)
    p.add_argument("--reps", type=int, default=3, help="timed generations per process")
    p.add_argument("--json", help="write the results here")
    p.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    a = p.parse_args(argv)
    if a.child:
        return child(a)
    from weights.io import atomic_write

    args = [f"--model={a.model}", f"--prompt-len={a.prompt_len}", f"--new-tokens={a.new_tokens}", f"--reps={a.reps}"]
    steps: dict[str, list[float]] = {k: [] for k in CHOICES}
    tokens: dict[str, list[int]] = {}
    for r in range(a.rounds):
        for k in CHOICES if r % 2 == 0 else CHOICES[::-1]:
            env = {**os.environ, "PARALLAMA_GEMV": k}
            done = subprocess.run(
                [sys.executable, "-m", "bench.gemv_ab", "--child", *args], env=env, capture_output=True, text=True
            )
            if done.returncode != 0:
                print(f"gemv_ab: the {k} process failed: {done.stderr.strip()[-500:]}", file=sys.stderr)
                return 1
            result = json.loads(done.stdout.strip().splitlines()[-1])
            steps[k].append(result["step_ms"])
            tokens.setdefault(k, result["tokens"])
    if tokens["pool"] != tokens["blas"]:
        print("gemv_ab: the two GEMVs generated different tokens", file=sys.stderr)
        return 1
    ms = {k: statistics.median(v) for k, v in steps.items()}
    ratio = statistics.median(b / p for b, p in zip(steps["blas"], steps["pool"]))
    for k, v in steps.items():
        print(f"{k}: decode step {ms[k]:.2f} ms (median of {len(v)}; rounds {', '.join(f'{x:.1f}' for x in v)})")
    print(f"pool / blas decode speed-up: {ratio:.3f}x (median of per-round ratios); greedy tokens identical")
    if a.json:
        out = {"args": vars(a), "step_ms": steps, "median_ms": ms, "speedup": ratio, "tokens_identical": True}
        atomic_write(Path(a.json), json.dumps(out, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
