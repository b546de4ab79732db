"""Decode with the weights on huge pages against the same weights on 4 KiB pages, in one process, rounds
alternating (weights/hugepages.py; what `Llama.from_pretrained` does on CPU).

    python -m bench.hugepages_ab --rounds 6 --json bench/results/hugepages_ab.json

Two copies of the model, one left where torch's allocator put it, one moved by `to_huge_pages`; each round
times, for each copy in turn, a 1-token and a (1 + N)-token greedy generation of the same prompt through its own
engine; the decode step is their difference / N. Medians over the rounds after the first (warm-up); the speed-up is
the median of the per-round ratios.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time
from pathlib import Path


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m bench.hugepages_ab", description=__doc__.splitlines()[0])
    p.add_argument("--model", default="default")
    p.add_argument("--backend", default="auto")
    p.add_argument("--prompt-len", type=int, default=274)
    p.add_argument("--new-tokens", type=int, default=32)
    p.add_argument("--rounds", type=int, default=6)
    p.add_argument("--json", help="write the results here")
    a = p.parse_args(argv)
    os.environ["PARALLAMA_HUGEPAGES"] = "0"  # both copies load on 4 KiB pages; one is moved below
    from infer.engine import Engine, SamplingParams
    from model import Llama
    from weights.hugepages import to_huge_pages
    from weights.io import atomic_write

    models = {"4 KiB pages": Llama.from_pretrained(a.model, backend=a.backend)}
    models["huge pages"] = Llama.from_pretrained(a.model, backend=a.backend)
    os.environ["PARALLAMA_HUGEPAGES"] = "1"
    if to_huge_pages(models["huge pages"]) == 0:
        print("hugepages_ab: no weights moved (THP unsupported here?): nothing to compare", file=sys.stderr)
        return 1
    engines = {k: Engine(m) for k, m in models.items()}
    ids = [1000 + i % 20000 for i in range(a.prompt_len)]

    def run(engine: Engine, n: int) -> float:
        t0 = time.perf_counter()
        engine.generate([ids], SamplingParams(max_new_tokens=n, temperature=0))
        return time.perf_counter() - t0

    steps: dict[str, list[float]] = {k: [] for k in engines}
    for r in range(a.rounds):
        for k, engine in engines.items():
            one, many = run(engine, 1), run(engine, 1 + a.new_tokens)
            if r:
                steps[k].append((many - one) / a.new_tokens * 1e3)
    ms = {k: statistics.median(v) for k, v in steps.items()}
    # the machine's bandwidth drifts between rounds: the median of per-round ratios cancels what a round shares
    ratio = statistics.median(x / y for x, y in zip(steps["4 KiB pages"], steps["huge pages"]))
    for k, v in steps.items():
        print(f"{k}: decode step {ms[k]:.2f} ms (median of {len(v)}; rounds {', '.join(f'{x:.1f}' for x in v)})")
    print(f"huge pages decode speed-up: {ratio:.3f}x (median of per-round ratios)")
    if a.json:
        out = {"args": vars(a), "step_ms": steps, "median_ms": ms, "speedup": ratio}
        atomic_write(Path(a.json), json.dumps(out, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
