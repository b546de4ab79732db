"""Fused projection with a per-sequence column scale: y = (x @ wᵀ) * scale[row_to_seq].

The Q/K/V projection of a PARA (or (IA)³) layer is one GEMM over the concatenated wq|wk|wv weight
whose epilogue multiplies each output column by the scale of the row's sequence (l_q on the Q
columns, l_v on the V columns, 1 on K), so the unscaled projection never reaches memory.

Shapes
    x: (M, K) or (B, T, K) (any leading dims; flattened to M rows); w: (N, K) (nn.Linear layout)
    scale: None, or (S, N), one row per sequence
    row_to_seq: (M,) int32/int64 sequence of every row; None: scale has one row per leading index of x
        (or a single row), broadcast over the rest — exactly `kernels.reference.linear_scale`
    → y: x.shape[:-1] + (N,) in x's dtype

Math (fp32 accumulation; the twin's roundings are mirrored: the product is rounded to x's dtype,
the scale cast to it, and their product rounded again)
    y[m, n] = round(round(Σ_k x[m, k] w[n, k]) · round(scale[row_to_seq[m], n]))

Twin: `kernels.reference.linear_scale`.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from ._triton import bucket, launch, scale_args

CONFIGS = [
    triton.Config({"BLOCK_M": 16, "BLOCK_N": 64, "BLOCK_K": 128}, num_warps=4, num_stages=4),  # decode
    triton.Config({"BLOCK_M": 64, "BLOCK_N": 128, "BLOCK_K": 64}, num_warps=4, num_stages=3),
    triton.Config({"BLOCK_M": 128, "BLOCK_N": 128, "BLOCK_K": 32}, num_warps=8, num_stages=3),
]


@triton.jit
def linear_scale_kernel(
    x_ptr,
    w_ptr,
    s_ptr,
    r2s_ptr,
    y_ptr,
    M,
    N,
    K,
    stride_xm,
    stride_xk,
    stride_wn,
    stride_wk,
    stride_ss,
    stride_sn,
    stride_ym,
    stride_yn,
    rows_per_seq,
    M_BUCKET,  # autotune key only
    HAS_SCALE: tl.constexpr,
    HAS_ROW_TO_SEQ: tl.constexpr,
    DOT_PRECISION: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_K: tl.constexpr,
):
    pid_m = tl.program_id(0)  # fastest: neighbouring programs share a weight tile
    pid_n = tl.program_id(1)
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    offs_k = tl.arange(0, BLOCK_K)
    mask_m = offs_m < M
    mask_n = offs_n < N
    x_ptrs = x_ptr + offs_m[:, None] * stride_xm + offs_k[None, :] * stride_xk
    w_ptrs = w_ptr + offs_n[None, :] * stride_wn + offs_k[:, None] * stride_wk  # (BLOCK_K, BLOCK_N) = wᵀ tile
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    for k in range(0, tl.cdiv(K, BLOCK_K)):
        k_left = K - k * BLOCK_K
        a = tl.load(x_ptrs, mask=mask_m[:, None] & (offs_k[None, :] < k_left), other=0.0)
        b = tl.load(w_ptrs, mask=mask_n[None, :] & (offs_k[:, None] < k_left), other=0.0)
        acc = tl.dot(a, b, acc, input_precision=DOT_PRECISION)
        x_ptrs += BLOCK_K * stride_xk
        w_ptrs += BLOCK_K * stride_wk
    out_ty = y_ptr.dtype.element_ty
    mask = mask_m[:, None] & mask_n[None, :]
    if HAS_SCALE:
        if HAS_ROW_TO_SEQ:
            seq = tl.load(r2s_ptr + offs_m, mask=mask_m, other=0)
        else:
            seq = offs_m // rows_per_seq
        s = tl.load(s_ptr + seq[:, None] * stride_ss + offs_n[None, :] * stride_sn, mask=mask, other=0.0)
        acc = acc.to(out_ty).to(tl.float32) * s.to(out_ty).to(tl.float32)
    y_ptrs = y_ptr + offs_m[:, None] * stride_ym + offs_n[None, :] * stride_yn
    tl.store(y_ptrs, acc.to(out_ty), mask=mask)


linear_scale_tuned = triton.autotune(CONFIGS, key=["M_BUCKET", "N", "K"])(linear_scale_kernel)


def interpreter_config(M: int, N: int, K: int) -> dict:
    """Big tiles for the CPU interpreter, where every program and loop step costs Python time."""
    bm = min(max(triton.next_power_of_2(M), 16), 128)
    return {"BLOCK_M": bm, "BLOCK_N": min(max(triton.next_power_of_2(N), 16), 256), "BLOCK_K": 128}


def fused_linear_scale(
    x: torch.Tensor,
    w: torch.Tensor,
    scale: torch.Tensor | None = None,
    row_to_seq: torch.Tensor | None = None,
    *,
    config: triton.Config | dict | None = None,
) -> torch.Tensor:
    """y = (x @ wᵀ) * scale[row_to_seq] in one kernel (see the module docstring for shapes).

    `config` pins BLOCK_M/N/K (and num_warps/num_stages with a triton.Config); default: autotuned on
    CUDA, large interpreter tiles on CPU.
    """
    K = x.shape[-1]
    N, Kw = w.shape
    assert Kw == K, f"x has K={K}, w has K={Kw}"
    lead = x.shape[:-1]
    x2 = x.reshape(-1, K)
    M = x2.shape[0]
    y = torch.empty((M, N), dtype=x.dtype, device=x.device)
    s_arg, r_arg, stride_ss, stride_sn, rows_per_seq = scale_args(scale, row_to_seq, lead, M, N, y, "scale")
    if M == 0:
        return y.view(*lead, N)
    if config is None and x.device.type != "cuda":
        config = interpreter_config(M, N, K)
    args = (
        x2,
        w,
        s_arg,
        r_arg,
        y,
        M,
        N,
        K,
        *x2.stride(),
        *w.stride(),
        stride_ss,
        stride_sn,
        *y.stride(),
        rows_per_seq,
        bucket(M),
    )
    constexprs = {
        "HAS_SCALE": scale is not None,
        "HAS_ROW_TO_SEQ": row_to_seq is not None,
        "DOT_PRECISION": "ieee",  # fp32 inputs stay fp32 (no TF32), like the twin
    }

    def grid(meta):
        return (triton.cdiv(M, meta["BLOCK_M"]), triton.cdiv(N, meta["BLOCK_N"]))

    launch(linear_scale_kernel, linear_scale_tuned, grid, args, constexprs, config, x)
    return y.view(*lead, N)
