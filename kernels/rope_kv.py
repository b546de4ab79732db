"""RoPE of Q and K and the paged-cache write of K and V, one kernel for a cached step's packed rows.

Shapes
    qkv: (M, (H + 2 H_kv) hd) the fused Q | K | V projection's rows (heads contiguous, Q then K then V)
    cos_sin: (M, hd/2, 2) fp32, each row's table entry ([..., 0] = cos, [..., 1] = sin)
    k_cache, v_cache: (N_blocks, block_size, H_kv, hd) one layer's paged pool
    slots: (M,) flat slot (block · block_size + offset) of each row's new K/V
    → q: (M, H, hd) rotated, in qkv's dtype; K (rotated) and V land in the caches at `slots`

Math: `kernels.rope` on the Q and K heads (fp32, rounded once to qkv's dtype, then to the cache's), V
copied as is. One program per row and block of heads (Q, K and V heads in one range); each head's
destination is chosen by masked stores, so the three outputs need no branch. Without it a decode layer
launches RoPE and two indexed writes; fused, Q|K RoPE and the KV write are one launch.
Twin: `kernels.reference.rope_write_kv`.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from ._triton import launch

CONFIGS = [triton.Config({"BLOCK_H": 4}, num_warps=1), triton.Config({"BLOCK_H": 16}, num_warps=4)]


@triton.jit
def rope_write_kv_kernel(
    x_ptr,
    cs_ptr,
    slot_ptr,
    q_ptr,
    k_ptr,
    v_ptr,
    H,
    H_KV,
    HALF,
    stride_xm,
    stride_cm,
    stride_qm,
    stride_qh,
    stride_ks,
    stride_kh,
    stride_vs,
    stride_vh,
    BLOCK_H: tl.constexpr,
    BLOCK_HALF: tl.constexpr,
):
    row = tl.program_id(0).to(tl.int64)
    heads = tl.program_id(1) * BLOCK_H + tl.arange(0, BLOCK_H)  # over H + 2 H_kv: Q, then K, then V heads
    offs_i = tl.arange(0, BLOCK_HALF)
    mask_i = offs_i < HALF
    cs = cs_ptr + row * stride_cm + 2 * offs_i
    cos = tl.load(cs, mask=mask_i, other=1.0).to(tl.float32)[None, :]
    sin = tl.load(cs + 1, mask=mask_i, other=0.0).to(tl.float32)[None, :]
    n_all = H + 2 * H_KV
    mask = (heads[:, None] < n_all) & mask_i[None, :]
    xp = x_ptr + row * stride_xm + heads[:, None] * (2 * HALF) + 2 * offs_i[None, :]
    x0 = tl.load(xp, mask=mask, other=0.0)
    x1 = tl.load(xp + 1, mask=mask, other=0.0)
    x_ty = x0.dtype
    rotate = (heads < H + H_KV)[:, None]  # Q and K heads turn; V heads pass through
    f0 = x0.to(tl.float32)
    f1 = x1.to(tl.float32)
    y0 = tl.where(rotate, (f0 * cos - f1 * sin).to(x_ty), x0)
    y1 = tl.where(rotate, (f0 * sin + f1 * cos).to(x_ty), x1)
    pair = 2 * offs_i[None, :]
    is_q = mask & (heads[:, None] < H)
    qp = q_ptr + row * stride_qm + heads[:, None] * stride_qh + pair
    tl.store(qp, y0, mask=is_q)
    tl.store(qp + 1, y1, mask=is_q)
    slot = tl.load(slot_ptr + row).to(tl.int64)
    is_k = mask & rotate & (heads[:, None] >= H)
    kp = k_ptr + slot * stride_ks + (heads[:, None] - H) * stride_kh + pair
    tl.store(kp, y0.to(k_ptr.dtype.element_ty), mask=is_k)
    tl.store(kp + 1, y1.to(k_ptr.dtype.element_ty), mask=is_k)
    is_v = mask & (heads[:, None] >= H + H_KV)
    vp = v_ptr + slot * stride_vs + (heads[:, None] - H - H_KV) * stride_vh + pair
    tl.store(vp, y0.to(v_ptr.dtype.element_ty), mask=is_v)
    tl.store(vp + 1, y1.to(v_ptr.dtype.element_ty), mask=is_v)


def fused_rope_write_kv(
    qkv: torch.Tensor,
    cos_sin: torch.Tensor,
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    slots: torch.Tensor,
    n_heads: int,
    n_kv_heads: int,
    *,
    config: triton.Config | dict | None = None,
) -> torch.Tensor:
    """Rotated Q (M, H, hd); rotated K and V written into the caches at `slots` (shapes: module docstring)."""
    M, width = qkv.shape
    _, _, n_kv, hd = k_cache.shape
    n_all = n_heads + 2 * n_kv_heads
    assert n_kv == n_kv_heads and width == n_all * hd, f"qkv must be (M, {n_all} x {hd}) for this cache"
    assert hd % 2 == 0 and cos_sin.shape == (M, hd // 2, 2), f"cos_sin must be ({M}, {hd // 2}, 2)"
    assert slots.shape == (M,) and v_cache.shape == k_cache.shape
    for c in (k_cache, v_cache):  # slot-major: a flat slot s sits at s · stride(1)
        assert c.is_contiguous(), "k_cache and v_cache must be contiguous (N, block_size, H_kv, hd)"
    if qkv.stride(-1) != 1:
        qkv = qkv.contiguous()
    cos_sin = cos_sin.contiguous()
    q = torch.empty((M, n_heads, hd), dtype=qkv.dtype, device=qkv.device)
    if M == 0:
        return q
    if config is None:
        config = CONFIGS[1] if n_all >= 16 else CONFIGS[0]
    if qkv.device.type != "cuda" and not isinstance(config, triton.Config):
        config = {"BLOCK_H": triton.next_power_of_2(n_all)}  # interpreter: all heads in one program
    bh = config.kwargs["BLOCK_H"] if isinstance(config, triton.Config) else config["BLOCK_H"]
    # a flat slot indexes (N · block_size) rows of (H_kv, hd): stride over slots = the block row stride
    args = (
        qkv,
        cos_sin,
        slots,
        q,
        k_cache,
        v_cache,
        n_heads,
        n_kv_heads,
        hd // 2,
        qkv.stride(0),
        cos_sin.stride(0),
        q.stride(0),
        q.stride(1),
        k_cache.stride(1),
        k_cache.stride(2),
        v_cache.stride(1),
        v_cache.stride(2),
    )
    grid = (M, triton.cdiv(n_all, bh))
    launch(rope_write_kv_kernel, None, grid, args, {"BLOCK_HALF": triton.next_power_of_2(hd // 2)}, config, qkv)
    return q
