"""RMSNorm, optionally fused with the residual add that precedes it.

Shapes
    x: (..., D); weight: (D,); residual: None or x's shape and dtype
    → normed: (..., D) in promote(x.dtype, weight.dtype) (as `x.to(x.dtype) * weight` gives in torch);
      with residual, also h = x + residual in x's dtype (the new residual stream)

Math (one program per row; the reduction is fp32 and the twin's roundings are mirrored)
    h = round(x + residual)                       (h = x without residual)
    r = 1 / sqrt(mean(h²) + eps)                  (fp32)
    normed = round_out(round_x(h · r) · weight)

Twin: `kernels.reference.rms_norm` (applied to x + residual when a residual is given).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from ._triton import launch

# One program holds a whole row; more warps for wider rows (chosen on the host, not autotuned).
CONFIGS = [triton.Config({}, num_warps=4), triton.Config({}, num_warps=8)]


@triton.jit
def rms_norm_kernel(
    x_ptr,
    r_ptr,
    w_ptr,
    y_ptr,
    h_ptr,
    D,
    stride_x,
    stride_r,
    stride_y,
    stride_h,
    eps,
    HAS_RESIDUAL: tl.constexpr,
    BLOCK_D: tl.constexpr,
):
    row = tl.program_id(0).to(tl.int64)
    offs = tl.arange(0, BLOCK_D)
    mask = offs < D
    x = tl.load(x_ptr + row * stride_x + offs, mask=mask, other=0.0)
    in_ty = x.dtype
    h = x.to(tl.float32)
    if HAS_RESIDUAL:
        r = tl.load(r_ptr + row * stride_r + offs, mask=mask, other=0.0)
        hr = (h + r.to(tl.float32)).to(in_ty)
        tl.store(h_ptr + row * stride_h + offs, hr, mask=mask)
        h = hr.to(tl.float32)
    ms = tl.sum(h * h, axis=0) / D
    rstd = 1.0 / tl.sqrt(ms + eps)
    w = tl.load(w_ptr + offs, mask=mask, other=0.0).to(tl.float32)
    y = (h * rstd).to(in_ty).to(tl.float32) * w
    tl.store(y_ptr + row * stride_y + offs, y.to(y_ptr.dtype.element_ty), mask=mask)


def fused_rms_norm(
    x: torch.Tensor,
    weight: torch.Tensor,
    eps: float,
    residual: torch.Tensor | None = None,
) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
    """RMSNorm of x (or of x + residual, then returning (normed, x + residual)); see the module docstring."""
    D = x.shape[-1]
    assert weight.shape == (D,), f"weight must be ({D},)"
    x2 = x.reshape(-1, D)
    if x2.stride(-1) != 1:
        x2 = x2.contiguous()
    M = x2.shape[0]
    y = torch.empty((M, D), dtype=torch.promote_types(x.dtype, weight.dtype), device=x.device)
    if residual is not None:
        assert residual.shape == x.shape and residual.dtype == x.dtype, "residual must match x"
        r2 = residual.reshape(-1, D)
        if r2.stride(-1) != 1:
            r2 = r2.contiguous()
        h = torch.empty((M, D), dtype=x.dtype, device=x.device)
    else:
        r2, h = x2, y  # dummies
    weight = weight.contiguous()
    if M > 0:
        block = triton.next_power_of_2(D)
        config = CONFIGS[1] if block >= 4096 else CONFIGS[0]
        args = (x2, r2, weight, y, h, D, x2.stride(0), r2.stride(0), y.stride(0), h.stride(0), eps)
        constexprs = {"HAS_RESIDUAL": residual is not None, "BLOCK_D": block}
        launch(rms_norm_kernel, None, (M,), args, constexprs, config, x)
    y = y.view(x.shape)
    return y if residual is None else (y, h.view(x.shape))
