"""Memory traffic of each fused kernel vs the unfused torch sequence (its twin run eagerly), per decode step.

    python -m kernels.traffic [--context 1024] [--batch 1,32]

Model: LLaMA-2-7B (dim 4096, 32 heads, 32 kv heads, head_dim 128, ffn 11008), fp16, one layer of one decode
step (one new token per sequence), PARA scales on. Every eager op reads its inputs and writes its output once
(no cache reuse between ops; broadcast operands counted once); views are free. The bandwidth-bound time is
bytes / 3.35 TB/s (H100 SXM HBM3). Prints the markdown table used in kernels/README.md.
"""

from __future__ import annotations

import argparse

DIM, HEADS, KV_HEADS, HD, FFN, LAYERS = 4096, 32, 32, 128, 11008, 32
H2, F4, IDX = 2, 4, 8  # bytes: fp16, fp32, int64 index
HBM = 3.35e12  # bytes/s


def ops_linear_scale(B: int):
    """QKV projection over wq|wk|wv (N = 3·dim) with per-sequence column scales (l_q | 1 | l_v)."""
    N = 3 * DIM
    x, w, y, s = B * DIM * H2, N * DIM * H2, B * N * H2, B * N * H2  # scale rows gathered: B of them
    unfused = [
        ("F.linear", x + w, y),
        ("scale[row_to_seq]", s + B * IDX, s),
        ("y * scale", 2 * y, y),
    ]
    fused = [("fused_linear_scale", x + w + s + B * IDX, y)]
    return unfused, fused


def ops_gated_up(B: int):
    x, w, y = B * DIM * H2, FFN * DIM * H2, B * FFN * H2
    unfused = [
        ("F.linear gate", x + w, y),
        ("F.silu", y, y),
        ("F.linear up", x + w, y),
        ("scale[row_to_seq]", y + B * IDX, y),
        ("up * scale", 2 * y, y),
        ("silu * up", 2 * y, y),
    ]
    fused = [("fused_gated_up", x + 2 * w + y + B * IDX, y)]
    return unfused, fused


def ops_rms_norm(B: int):
    """Residual add + RMSNorm, as reference.add_rms_norm runs it (twice per layer: before attention and FFN)."""
    e = B * DIM
    unfused = [
        ("x + residual", 2 * e * H2, e * H2),
        ("h.float()", e * H2, e * F4),
        ("pow(2)", e * F4, e * F4),
        ("mean(-1)", e * F4, B * F4),
        ("+ eps", B * F4, B * F4),
        ("rsqrt", B * F4, B * F4),
        ("xf * rsqrt", e * F4 + B * F4, e * F4),
        (".to(fp16)", e * F4, e * H2),
        ("* weight", e * H2 + DIM * H2, e * H2),
    ]
    fused = [("fused_rms_norm(residual=)", 2 * e * H2 + DIM * H2, 2 * e * H2)]
    return unfused, fused


def ops_rope(B: int):
    """RoPE of q (32 heads) and k (32 kv heads); cos/sin: one fp32 table row (hd/2 × 2) per sequence."""
    out = []
    fused = []
    for name, heads in (("q", HEADS), ("k", KV_HEADS)):
        e = B * heads * HD // 2  # pairs
        cs = B * HD // 2 * F4  # cos or sin rows, broadcast over heads
        out += [
            (f"{name}.float()", 2 * e * H2, 2 * e * F4),
            *[(f"{name}: {op}", e * F4 + cs, e * F4) for op in ("x0*cos", "x1*sin", "x0*sin", "x1*cos")],
            (f"{name}: sub", 2 * e * F4, e * F4),
            (f"{name}: add", 2 * e * F4, e * F4),
            (f"{name}: stack", 2 * e * F4, 2 * e * F4),
            (f"{name}: .to(fp16)", 2 * e * F4, 2 * e * H2),
        ]
        fused.append((f"fused_rope({name})", 2 * e * H2 + 2 * cs, 2 * e * H2))
    return out, fused


def ops_attention(B: int, L: int, bs: int = 16):
    """Decode attention over L cached tokens per sequence (block size bs, the table exactly ⌈L/bs⌉ wide)."""
    kv = B * L * KV_HEADS * HD * H2  # K (or V) of all sequences
    q = B * HEADS * HD * H2
    nb = -(-L // bs)
    table = B * nb * IDX
    unfused = [
        ("k_cache[block_tables]", kv + table, kv),
        ("v_cache[block_tables]", kv + table, kv),
        ("q zeros + scatter into (S, 1, H, hd)", q + B * IDX, 2 * q),
        ("positions scatter", 2 * B * IDX, 2 * B * IDX),
        ("key <= qpos", L * IDX + B * IDX, B * L),
        ("key < seq_lens", L * IDX + B * IDX, B * L),
        ("mask &", 2 * B * L, B * L),
        ("SDPA: bool mask -> additive fp16", B * L, B * L * H2),
        ("SDPA (mem-efficient, additive mask)", q + 2 * kv + B * L * H2, q),
        ("out[row_to_seq, row_index]", q + 2 * B * IDX, q),
    ]
    fused = [("paged_attention_decode", q + 2 * kv + B * nb * 4 + B * 4, q)]  # int32 table and lengths
    return unfused, fused


def total(ops) -> int:
    return sum(r + w for _, r, w in ops)


def rows(batches, L):
    kernels = [
        ("linear_scale (QKV + PARA l_q/l_v)", ops_linear_scale, 1),
        ("gated_up (SwiGLU + PARA l_u)", ops_gated_up, 1),
        ("rms_norm + residual (×2 per layer)", ops_rms_norm, 2),
        ("rope (q and k)", ops_rope, 1),
        (f"paged_attention_decode (context {L})", lambda B: ops_attention(B, L), 1),
    ]
    out = []
    for B in batches:
        layer_u = layer_f = n_u = n_f = 0
        for name, fn, times in kernels:
            unfused, fused = fn(B)
            u, f = total(unfused) * times, total(fused) * times
            layer_u, layer_f = layer_u + u, layer_f + f
            n_u, n_f = n_u + len(unfused) * times, n_f + len(fused) * times
            out.append((B, name, u, f, len(unfused) * times, len(fused) * times))
        out.append((B, f"**all of the above, one layer** (×{LAYERS} layers per step)", layer_u, layer_f, n_u, n_f))
    return out


def fmt_bytes(n: float) -> str:
    for unit, k in (("GB", 1e9), ("MB", 1e6), ("kB", 1e3)):
        if n >= k:
            return f"{n / k:.2f} {unit}"
    return f"{n:.0f} B"


def table(batches=(1, 32), L=1024) -> str:
    lines = [
        "| batch | kernel (per layer, per decode step) | ops unfused → fused | unfused | fused | saved "
        "| unfused @3.35 TB/s | fused @3.35 TB/s |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for B, name, u, f, n_u, n_f in rows(batches, L):
        lines.append(
            f"| {B} | {name} | {n_u} → {n_f} | {fmt_bytes(u)} | {fmt_bytes(f)} | "
            f"{fmt_bytes(u - f)} ({100 * (u - f) / u:.1f}%) | "
            f"{u / HBM * 1e6:.2f} µs | {f / HBM * 1e6:.2f} µs |"
        )
    return "\n".join(lines)


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--context", type=int, default=1024, help="cached tokens per sequence for attention")
    p.add_argument("--batch", default="1,32")
    a = p.parse_args(argv)
    print(table(tuple(int(b) for b in a.batch.split(",")), a.context))


if __name__ == "__main__":
    main()
