"""Rotary position embedding in Meta's interleaved convention: rotate pairs (x[2i], x[2i+1]).

Shapes
    x: (..., H, hd) with hd even, e.g. (B, T, H, hd) or packed rows (M, H, hd)
    cos_sin: (..., hd/2, 2) fp32 with [..., 0] = cos, [..., 1] = sin, broadcastable against x's leading
        dims x.shape[:-2] like the twin's `cos_sin.unsqueeze(-3)`: a positions table (T, hd/2, 2), a
        per-sequence (B, T, hd/2, 2), or one row per packed row (M, hd/2, 2). Llama 3.x frequency
        scaling lives in the table (`reference.rope_frequencies(..., scaled=True)`).
    → same shape and dtype as x (a new tensor)

Math (fp32, rounded once to x's dtype)
    out[2i]   = x[2i] cos_i − x[2i+1] sin_i
    out[2i+1] = x[2i] sin_i + x[2i+1] cos_i

One program per leading row (b, t) and block of heads; the row's cos/sin are loaded once for all heads.
Twin: `kernels.reference.rope`.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from ._triton import launch

CONFIGS = [triton.Config({"BLOCK_H": 4}, num_warps=1), triton.Config({"BLOCK_H": 16}, num_warps=4)]


@triton.jit
def rope_kernel(
    x_ptr,
    cs_ptr,
    y_ptr,
    T,
    H,
    HALF,
    stride_xb,
    stride_xt,
    stride_xh,
    stride_xd,
    stride_cb,
    stride_ct,
    stride_ci,
    stride_cc,
    stride_yb,
    stride_yt,
    stride_yh,
    BLOCK_H: tl.constexpr,
    BLOCK_HALF: tl.constexpr,
):
    row = tl.program_id(0)
    b = (row // T).to(tl.int64)
    t = (row % T).to(tl.int64)
    offs_h = tl.program_id(1) * BLOCK_H + tl.arange(0, BLOCK_H)
    offs_i = tl.arange(0, BLOCK_HALF)
    mask_i = offs_i < HALF
    cs = cs_ptr + b * stride_cb + t * stride_ct + offs_i * stride_ci
    cos = tl.load(cs, mask=mask_i, other=0.0).to(tl.float32)[None, :]
    sin = tl.load(cs + stride_cc, mask=mask_i, other=0.0).to(tl.float32)[None, :]
    mask = (offs_h[:, None] < H) & mask_i[None, :]
    xp = x_ptr + b * stride_xb + t * stride_xt + offs_h[:, None] * stride_xh + (2 * offs_i[None, :]) * stride_xd
    x0 = tl.load(xp, mask=mask, other=0.0)
    x1 = tl.load(xp + stride_xd, mask=mask, other=0.0)
    out_ty = x0.dtype
    x0 = x0.to(tl.float32)
    x1 = x1.to(tl.float32)
    yp = y_ptr + b * stride_yb + t * stride_yt + offs_h[:, None] * stride_yh + 2 * offs_i[None, :]
    tl.store(yp, (x0 * cos - x1 * sin).to(out_ty), mask=mask)
    tl.store(yp + 1, (x0 * sin + x1 * cos).to(out_ty), mask=mask)


def fused_rope(x: torch.Tensor, cos_sin: torch.Tensor, *, config: triton.Config | dict | None = None) -> torch.Tensor:
    """Meta-style RoPE of x with the cos/sin table rows for its positions (shapes: module docstring)."""
    *lead, H, hd = x.shape
    assert hd % 2 == 0 and cos_sin.shape[-2:] == (hd // 2, 2), f"cos_sin must end in ({hd // 2}, 2)"
    assert len(lead) >= 1, "x needs at least one leading dim before (H, hd)"
    cs = cos_sin.expand(*lead, hd // 2, 2)  # broadcast views, no copy
    T = lead[-1]
    # Fold all leading dims into (B, T); a view unless broadcasting made that impossible.
    x4 = x.reshape(-1, T, H, hd)
    cs4 = cs.reshape(-1, T, hd // 2, 2)
    B = x4.shape[0]
    y = torch.empty((B, T, H, hd), dtype=x.dtype, device=x.device)
    if y.numel() > 0:
        if config is None:
            config = CONFIGS[1] if H >= 16 else CONFIGS[0]
        if x.device.type != "cuda" and not isinstance(config, triton.Config):
            config = {"BLOCK_H": triton.next_power_of_2(H)}  # interpreter: all heads in one program

        bh = config.kwargs["BLOCK_H"] if isinstance(config, triton.Config) else config["BLOCK_H"]
        args = (x4, cs4, y, T, H, hd // 2, *x4.stride(), *cs4.stride(), *y.stride()[:3])
        launch(
            rope_kernel,
            None,
            (B * T, triton.cdiv(H, bh)),
            args,
            {"BLOCK_HALF": triton.next_power_of_2(hd // 2)},
            config,
            x,
        )
    return y.view(x.shape)
