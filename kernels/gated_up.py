"""Fused SwiGLU input with the PARA up-scale: h = silu(x @ w_gateᵀ) * ((x @ w_upᵀ) * scale_u[row_to_seq]).

Both GEMMs share every x tile in one kernel and the SiLU, the gate·up product and the per-sequence
l_u multiply happen in the epilogue, so neither (rows × d_ffn) intermediate reaches memory.

Shapes
    x: (M, K) or (B, T, K) (leading dims flattened); w_gate, w_up: (N, K) (Meta's w1 and w3)
    scale_u: None or (S, N); row_to_seq: (M,) or None with the broadcast rules of
        `kernels.reference.linear_scale`
    → h: x.shape[:-1] + (N,) in x's dtype

Math (fp32 accumulation; the twin's roundings to x's dtype are mirrored)
    g = round(x wgᵀ), u = round(round(x wuᵀ) · round(scale_u[row_to_seq]))
    h = round(round(g · σ(g)) · u)

Twin: `kernels.reference.gated_up`.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from ._triton import bucket, launch, scale_args

CONFIGS = [
    triton.Config({"BLOCK_M": 16, "BLOCK_N": 64, "BLOCK_K": 128}, num_warps=4, num_stages=3),  # decode
    triton.Config({"BLOCK_M": 64, "BLOCK_N": 64, "BLOCK_K": 64}, num_warps=4, num_stages=3),
    triton.Config({"BLOCK_M": 128, "BLOCK_N": 64, "BLOCK_K": 32}, num_warps=8, num_stages=3),
]


@triton.jit
def gated_up_kernel(
    x_ptr,
    wg_ptr,
    wu_ptr,
    s_ptr,
    r2s_ptr,
    y_ptr,
    M,
    N,
    K,
    stride_xm,
    stride_xk,
    stride_wgn,
    stride_wgk,
    stride_wun,
    stride_wuk,
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
    pid_m = tl.program_id(0)
    pid_n = tl.program_id(1)
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    offs_k = tl.arange(0, BLOCK_K)
    mask_m = offs_m < M
    mask_n = offs_n < N
    x_ptrs = x_ptr + offs_m[:, None] * stride_xm + offs_k[None, :] * stride_xk
    wg_ptrs = wg_ptr + offs_n[None, :] * stride_wgn + offs_k[:, None] * stride_wgk
    wu_ptrs = wu_ptr + offs_n[None, :] * stride_wun + offs_k[:, None] * stride_wuk
    acc_g = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    acc_u = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    for k in range(0, tl.cdiv(K, BLOCK_K)):
        k_left = K - k * BLOCK_K
        a = tl.load(x_ptrs, mask=mask_m[:, None] & (offs_k[None, :] < k_left), other=0.0)
        wmask = mask_n[None, :] & (offs_k[:, None] < k_left)
        bg = tl.load(wg_ptrs, mask=wmask, other=0.0)
        bu = tl.load(wu_ptrs, mask=wmask, other=0.0)
        acc_g = tl.dot(a, bg, acc_g, input_precision=DOT_PRECISION)
        acc_u = tl.dot(a, bu, acc_u, input_precision=DOT_PRECISION)
        x_ptrs += BLOCK_K * stride_xk
        wg_ptrs += BLOCK_K * stride_wgk
        wu_ptrs += BLOCK_K * stride_wuk
    out_ty = y_ptr.dtype.element_ty
    mask = mask_m[:, None] & mask_n[None, :]
    g = acc_g.to(out_ty).to(tl.float32)
    act = (g / (1.0 + tl.exp(-g))).to(out_ty).to(tl.float32)  # silu, rounded like F.silu
    u = acc_u.to(out_ty).to(tl.float32)
    if HAS_SCALE:
        if HAS_ROW_TO_SEQ:
            seq = tl.load(r2s_ptr + offs_m, mask=mask_m, other=0)
        else:
            seq = offs_m // rows_per_seq
        s = tl.load(s_ptr + seq[:, None] * stride_ss + offs_n[None, :] * stride_sn, mask=mask, other=0.0)
        u = (u * s.to(out_ty).to(tl.float32)).to(out_ty).to(tl.float32)
    y_ptrs = y_ptr + offs_m[:, None] * stride_ym + offs_n[None, :] * stride_yn
    tl.store(y_ptrs, (act * u).to(out_ty), mask=mask)


gated_up_tuned = triton.autotune(CONFIGS, key=["M_BUCKET", "N", "K"])(gated_up_kernel)


def interpreter_config(M: int, N: int, K: int) -> dict:
    """Big tiles for the CPU interpreter, where every program and loop step costs Python time."""
    bm = min(max(triton.next_power_of_2(M), 16), 128)
    return {"BLOCK_M": bm, "BLOCK_N": min(max(triton.next_power_of_2(N), 16), 256), "BLOCK_K": 128}


def fused_gated_up(
    x: torch.Tensor,
    w_gate: torch.Tensor,
    w_up: torch.Tensor,
    scale_u: torch.Tensor | None = None,
    row_to_seq: torch.Tensor | None = None,
    *,
    config: triton.Config | dict | None = None,
) -> torch.Tensor:
    """silu(x @ w_gateᵀ) * ((x @ w_upᵀ) * scale_u[row_to_seq]) in one kernel (shapes: module docstring).

    `config` pins BLOCK_M/N/K (and num_warps/num_stages with a triton.Config); default: autotuned on
    CUDA, large interpreter tiles on CPU.
    """
    K = x.shape[-1]
    N = w_gate.shape[0]
    assert w_gate.shape == (N, K) and w_up.shape == (N, K), "w_gate and w_up must both be (N, K)"
    lead = x.shape[:-1]
    x2 = x.reshape(-1, K)
    M = x2.shape[0]
    y = torch.empty((M, N), dtype=x.dtype, device=x.device)
    s_arg, r_arg, stride_ss, stride_sn, rows_per_seq = scale_args(scale_u, row_to_seq, lead, M, N, y, "scale_u")
    if M == 0:
        return y.view(*lead, N)
    if config is None and x.device.type != "cuda":
        config = interpreter_config(M, N, K)
    args = (
        x2,
        w_gate,
        w_up,
        s_arg,
        r_arg,
        y,
        M,
        N,
        K,
        *x2.stride(),
        *w_gate.stride(),
        *w_up.stride(),
        stride_ss,
        stride_sn,
        *y.stride(),
        rows_per_seq,
        bucket(M),
    )
    constexprs = {"HAS_SCALE": scale_u is not None, "HAS_ROW_TO_SEQ": row_to_seq is not None, "DOT_PRECISION": "ieee"}

    def grid(meta):
        return (triton.cdiv(M, meta["BLOCK_M"]), triton.cdiv(N, meta["BLOCK_N"]))

    launch(gated_up_kernel, gated_up_tuned, grid, args, constexprs, config, x)
    return y.view(*lead, N)
