"""A prefill's projection GEMMs two ways, on the model's own weights: torch's `F.linear` (MKL, which packs the
weight operand again in every call) against MKL with each weight packed once (`torch.ops.mkl`, the packed-GEMM
path inductor uses for frozen CPU graphs), in alternating rounds.

    python -m bench.gemm_ab --rounds 7 --rows 274 --json bench/results/gemm_ab.json

A round runs every layer's wqkv, wo, w13 and w2 on `--rows` activation rows, as one prefill does (each weight
comes from memory once per round), first one way and then the other; the speed-up is the median of the per-round
ratios. Each packed product is checked against `F.linear` first. torch's packed op only takes the row count a
weight was packed for (it falls back to the unpacked path for any other), so this measures what a prompt of
exactly `--rows` tokens gains with it; the cpu backend instead calls MKL's pack / compute functions directly
(`kernels/mkl_gemm.py`), whose packing serves any row count. Needs torch built with MKL (the x86 wheels).
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F

from weights.io import atomic_write


def available() -> bool:
    return bool(torch._C.has_mkl) and hasattr(torch.ops.mkl, "_mkl_linear")


def layer_weights(model: Any) -> list[list[torch.Tensor]]:
    """[layer][wqkv, wo, w13, w2]: the prefill's four projections of every layer."""
    out = []
    for block in model.layers:
        _, wqkv, wo, _, w13, w2 = block.decode_weights()
        out.append([w.detach() for w in (wqkv, wo, w13, w2)])
    return out


def measure(weights: list[list[torch.Tensor]], rows: int, rounds: int, seed: int = 0) -> dict[str, Any]:
    """{"unpacked_ms", "packed_ms", "speedup", "gflops", "max_rel_diff"}: medians over `rounds` alternating
    rounds of every weight's product with a (rows, K) activation."""
    gen = torch.Generator().manual_seed(seed)
    xs = {w.shape[1]: torch.randn(rows, w.shape[1], generator=gen) for layer in weights for w in layer}
    packed = [[torch.ops.mkl._mkl_reorder_linear_weight(w, rows) for w in layer] for layer in weights]
    diff = 0.0  # max |packed - F.linear| / max |F.linear| over the products
    for layer, players in zip(weights, packed):
        for w, p in zip(layer, players):
            want = F.linear(xs[w.shape[1]], w)
            got = torch.ops.mkl._mkl_linear(xs[w.shape[1]], p, w, None, rows)
            diff = max(diff, float((got - want).abs().max() / want.abs().max().clamp_min(1e-30)))

    def unpacked() -> float:
        t0 = time.perf_counter()
        for layer in weights:
            for w in layer:
                F.linear(xs[w.shape[1]], w)
        return time.perf_counter() - t0

    def packed_run() -> float:
        t0 = time.perf_counter()
        for layer, players in zip(weights, packed):
            for w, p in zip(layer, players):
                torch.ops.mkl._mkl_linear(xs[w.shape[1]], p, w, None, rows)
        return time.perf_counter() - t0

    unpacked(), packed_run()  # warm-up
    pairs = [(unpacked(), packed_run()) for _ in range(rounds)]
    flop = 2 * rows * sum(w.numel() for layer in weights for w in layer)
    u, p = (statistics.median(t[i] for t in pairs) for i in (0, 1))
    return {
        "rows": rows,
        "rounds": rounds,
        "unpacked_ms": 1e3 * u,
        "packed_ms": 1e3 * p,
        "speedup": statistics.median(a / b for a, b in pairs),
        "gflops": {"unpacked": flop / u / 1e9, "packed": flop / p / 1e9},
        "max_rel_diff": diff,
    }


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--model", default="default")
    ap.add_argument("--rows", type=int, default=274, help="activation rows: a prompt's tokens (the bench's 274)")
    ap.add_argument("--rounds", type=int, default=7)
    ap.add_argument("--json", type=Path, help="write the result here")
    a = ap.parse_args(argv)
    if a.rows < 1 or a.rounds < 1:
        print("gemm_ab: --rows and --rounds must be positive", file=sys.stderr)
        return 2
    if not available():
        print("gemm_ab: this torch has no MKL packed GEMM (torch.ops.mkl); nothing to compare", file=sys.stderr)
        return 1
    from model import Llama

    model = Llama.from_pretrained(a.model, backend="cpu")
    result = measure(layer_weights(model), a.rows, a.rounds) | {"model": a.model, "threads": torch.get_num_threads()}
    print(
        f"{result['rows']} rows, {len(model.layers)} layers: F.linear {result['unpacked_ms']:.1f} ms "
        f"({result['gflops']['unpacked']:.0f} GFLOP/s), packed once {result['packed_ms']:.1f} ms "
        f"({result['gflops']['packed']:.0f} GFLOP/s): {result['speedup']:.3f}x (median of {a.rounds} rounds); "
        f"max relative diff {result['max_rel_diff']:.2g}"
    )
    if a.json:
        atomic_write(a.json, json.dumps(result, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
