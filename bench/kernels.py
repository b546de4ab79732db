"""Per-kernel microbenchmarks: each Triton kernel in kernels/ against its PyTorch twin (kernels/reference.py).

    python bench/kernels.py [--models smollm2 llama2-7b llama3-8b] [--dtype float16] [--rows 1 8 32 256]
                            [--context 1024] [--json out.json]

Kernels: linear_scale (the fused QKV projection with PARA's per-sequence column scale), gated_up (SwiGLU
with PARA's l_u), rms_norm, rope (q rows of a decode step) and paged_attention_decode (one query row per
sequence over a paged KV pool, `--context` tokens each, 16-token blocks in shuffled order). Each is timed
with triton.testing.do_bench (median ms), next to its twin on the same inputs, with the minimum bytes the
op must move (inputs read once + output written) over the time as GB/s, and the largest difference from
the twin as a sanity check. Needs CUDA: on a machine without it this prints a line and exits 0.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import sys
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

SKIP = "CUDA not available; bench/kernels.py measures GPU kernels — skipping"
# (dim, n_heads, n_kv_heads, head_dim, ffn_dim) of a few LLaMA-family shapes
MODELS: dict[str, tuple[int, int, int, int, int]] = {
    "smollm2": (576, 9, 3, 64, 1536),
    "llama2-7b": (4096, 32, 32, 128, 11008),
    "llama3-8b": (4096, 32, 8, 128, 14336),
}
DTYPES = {"float16": torch.float16, "bfloat16": torch.bfloat16, "float32": torch.float32}


def nbytes(*tensors: torch.Tensor) -> int:
    return sum(t.numel() * t.element_size() for t in tensors)


def cases(
    model: str, rows: int, dtype: torch.dtype, context: int, device: str = "cuda", seed: int = 0
) -> list[tuple[str, Callable[[], torch.Tensor], Callable[[], torch.Tensor], int]]:
    """(kernel name, kernel call, twin call, minimum bytes moved) for one model shape and row count."""
    from kernels import reference as ref
    from kernels.gated_up import fused_gated_up
    from kernels.linear_scale import fused_linear_scale
    from kernels.paged_attention import paged_attention_decode, reference_decode
    from kernels.rms_norm import fused_rms_norm
    from kernels.rope import fused_rope

    dim, H, H_kv, hd, ffn = MODELS[model]
    g = torch.Generator(device=device).manual_seed(seed)

    def rand(*shape: int, scale: float = 1.0, dt: torch.dtype = dtype) -> torch.Tensor:
        return (torch.randn(*shape, generator=g, device=device) * scale).to(dt)

    out = []
    # the engine's decode: one row per sequence, so each row has its own scale row (row_to_seq = arange)
    r2s = torch.arange(rows, device=device)
    x = rand(rows, dim)

    n_qkv = (H + 2 * H_kv) * hd
    w = rand(n_qkv, dim, scale=dim**-0.5)
    s = rand(rows, n_qkv, scale=0.1) + 1
    moved = nbytes(x, w, s) + rows * n_qkv * x.element_size()
    out.append(
        ("linear_scale", lambda: fused_linear_scale(x, w, s, r2s), lambda: ref.linear_scale(x, w, s, r2s), moved)
    )

    wg, wu = rand(ffn, dim, scale=dim**-0.5), rand(ffn, dim, scale=dim**-0.5)
    su = rand(rows, ffn, scale=0.1) + 1
    moved = nbytes(x, wg, wu, su) + rows * ffn * x.element_size()
    out.append(
        ("gated_up", lambda: fused_gated_up(x, wg, wu, su, r2s), lambda: ref.gated_up(x, wg, wu, su, r2s), moved)
    )

    nw = rand(dim, scale=0.1) + 1
    moved = 2 * nbytes(x) + nbytes(nw)
    out.append(("rms_norm", lambda: fused_rms_norm(x, nw, 1e-5), lambda: ref.rms_norm(x, nw, 1e-5), moved))

    q = rand(rows, H, hd)
    inv = ref.rope_frequencies(hd, 10000.0).to(device)
    cos_sin = ref.rope_table(inv, context + 1)[torch.randint(0, context, (rows,))].to(device)  # (rows, hd/2, 2)
    moved = 2 * nbytes(q) + nbytes(cos_sin)
    out.append(("rope", lambda: fused_rope(q, cos_sin), lambda: ref.rope(q, cos_sin), moved))

    page = 16
    per_seq = math.ceil(context / page)
    n_blocks = rows * per_seq
    k_cache, v_cache = rand(n_blocks, page, H_kv, hd), rand(n_blocks, page, H_kv, hd)
    tables = torch.randperm(n_blocks, device=device).view(rows, per_seq).to(torch.int32)
    lens = torch.full((rows,), context, device=device, dtype=torch.int32)
    moved = 2 * nbytes(q) + 2 * rows * context * H_kv * hd * q.element_size() + nbytes(tables, lens)
    out.append(
        (
            "paged_attention_decode",
            lambda: paged_attention_decode(q, k_cache, v_cache, tables, lens),
            lambda: reference_decode(q, k_cache, v_cache, tables, lens),
            moved,
        )
    )
    return out


def bench(models: Sequence[str], rows: Sequence[int], dtype: torch.dtype, context: int) -> list[dict[str, Any]]:
    from triton.testing import do_bench

    results = []
    for model in models:
        for m in rows:
            for name, kernel, twin, moved in cases(model, m, dtype, context):
                print(f"{model} {name} rows={m} ...", file=sys.stderr, flush=True)
                diff = (kernel().float() - twin().float()).abs().max().item()
                t_kernel = do_bench(kernel, return_mode="median")  # ms
                t_twin = do_bench(twin, return_mode="median")
                results.append(
                    {
                        "model": model,
                        "kernel": name,
                        "rows": m,
                        "dtype": str(dtype).removeprefix("torch."),
                        "context": context if name == "paged_attention_decode" else None,
                        "kernel_ms": t_kernel,
                        "twin_ms": t_twin,
                        "speedup": t_twin / t_kernel,
                        "bytes": moved,
                        "kernel_gbs": moved / t_kernel / 1e6,
                        "twin_gbs": moved / t_twin / 1e6,
                        "max_abs_diff": diff,
                    }
                )
    return results


def format_table(results: Sequence[dict[str, Any]]) -> str:
    lines = [
        "| model | kernel | rows | kernel µs | twin µs | speedup | kernel GB/s | twin GB/s | max abs diff |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for r in results:
        lines.append(
            f"| {r['model']} | {r['kernel']} | {r['rows']} | {r['kernel_ms'] * 1e3:.1f} | {r['twin_ms'] * 1e3:.1f} "
            f"| {r['speedup']:.2f}x | {r['kernel_gbs']:.0f} | {r['twin_gbs']:.0f} | {r['max_abs_diff']:.2e} |"
        )
    return "\n".join(lines)


def copy_bandwidth_gbs(nbytes: int = 2**30) -> float:
    """The device's copy bandwidth (bytes read + written per second, best of 5): the roof for the GB/s columns."""
    from triton.testing import do_bench

    src = torch.ones(nbytes // 4, device="cuda")
    dst = torch.empty_like(src)
    ms = do_bench(lambda: dst.copy_(src), return_mode="min")
    return 2 * nbytes / ms / 1e6


def main(argv: Sequence[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--models", nargs="+", default=["smollm2", "llama2-7b", "llama3-8b"], choices=list(MODELS))
    ap.add_argument("--dtype", default="float16", choices=list(DTYPES))
    ap.add_argument("--rows", type=int, nargs="+", default=[1, 8, 32, 256], help="decode rows (= sequences)")
    ap.add_argument("--context", type=int, default=1024, help="tokens per sequence for paged attention")
    ap.add_argument("--json", type=Path)
    a = ap.parse_args(argv)
    if not torch.cuda.is_available():
        print(SKIP)
        return 0
    if os.environ.get("TRITON_INTERPRET") == "1":
        print("TRITON_INTERPRET=1 is set: the kernels would run in Triton's interpreter; unset it to benchmark")
        return 2
    try:
        import triton
    except ImportError:
        print("triton is not installed; bench/kernels.py needs it")
        return 2
    torch.backends.cuda.matmul.allow_tf32 = False  # the kernels' fp32 dots are IEEE: compare like with like
    results = bench(a.models, a.rows, DTYPES[a.dtype], a.context)
    peak = copy_bandwidth_gbs()
    print(
        f"\n{torch.cuda.get_device_name()}, {a.dtype}, triton {triton.__version__}, torch {torch.__version__}; "
        f"device copy bandwidth {peak:.0f} GB/s (read + written)\n"
    )
    print(format_table(results))
    if a.json:
        info = {"gpu": torch.cuda.get_device_name(), "torch": torch.__version__, "triton": triton.__version__}
        a.json.write_text(json.dumps({"machine": info, "copy_bandwidth_gbs": peak, "results": results}, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
