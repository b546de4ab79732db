"""Decode attention over a paged KV cache with grouped-query heads (one query row per sequence).

Shapes
    q: (S, H, hd) this step's query row of each of S sequences
    k_cache, v_cache: (N_blocks, block_size, H_kv, hd) the paged pool (already holding this step's K/V)
    block_tables: (S, max_blocks) int32/int64 physical block of each logical block of each sequence
    seq_lens: (S,) context length of each sequence (the query sits at position seq_lens − 1)
    → out: (S, H, hd) in q's dtype

Math, for query head h of sequence s, with kv head c = h // g (g = H / H_kv) and scale = 1/√hd unless given
    K_s[j] = k_cache[block_tables[s, j // bs], j % bs, c], likewise V_s, for j < seq_lens[s]
    out[s, h] = softmax(scale · q[s, h] K_sᵀ) V_s

One program per (sequence, kv head) handles all g query heads of that group as the rows of one tile
(padded to 16 for tl.dot), so each K/V block is read once per group, never once per query head; it walks
the sequence BLOCK_N keys at a time through the block table with an online softmax (running max m,
running sum l, rescaled fp32 accumulator). P is cast to V's dtype for the second product, as flash
attention does.

Twin: `kernels.reference.paged_attention(q, k_cache, v_cache, block_tables, seq_lens,
positions=seq_lens − 1, row_to_seq=arange(S), row_index=0, max_rows=1)` (see `reference_decode`).
"""

from __future__ import annotations

import math

import torch
import triton
import triton.language as tl

from . import reference
from ._triton import launch

CONFIGS = [
    triton.Config({"BLOCK_N": 32}, num_warps=4, num_stages=2),
    triton.Config({"BLOCK_N": 64}, num_warps=4, num_stages=2),
    triton.Config({"BLOCK_N": 128}, num_warps=8, num_stages=2),
]


@triton.jit
def paged_attention_decode_kernel(
    q_ptr,
    k_ptr,
    v_ptr,
    bt_ptr,
    sl_ptr,
    o_ptr,
    qk_scale,  # scale · log2(e): the softmax runs in base 2
    G,
    HD,
    stride_qs,
    stride_qh,
    stride_kb,
    stride_kt,
    stride_kh,
    stride_vb,
    stride_vt,
    stride_vh,
    stride_bts,
    stride_os,
    stride_oh,
    PAGE_SIZE: tl.constexpr,
    BLOCK_G: tl.constexpr,
    BLOCK_D: tl.constexpr,
    DOT_PRECISION: tl.constexpr,
    BLOCK_N: tl.constexpr,
):
    s = tl.program_id(0).to(tl.int64)
    kvh = tl.program_id(1).to(tl.int64)
    seq_len = tl.load(sl_ptr + s).to(tl.int32)
    offs_g = tl.arange(0, BLOCK_G)
    offs_d = tl.arange(0, BLOCK_D)
    offs_n = tl.arange(0, BLOCK_N)
    mask_g = offs_g < G
    mask_d = offs_d < HD
    heads = kvh * G + offs_g
    q_mask = mask_g[:, None] & mask_d[None, :]
    q = tl.load(q_ptr + s * stride_qs + heads[:, None] * stride_qh + offs_d[None, :], mask=q_mask, other=0.0)
    m_i = tl.full((BLOCK_G,), float("-inf"), dtype=tl.float32)
    l_i = tl.zeros((BLOCK_G,), dtype=tl.float32)
    acc = tl.zeros((BLOCK_G, BLOCK_D), dtype=tl.float32)
    bt_row = bt_ptr + s * stride_bts
    for start in range(0, seq_len, BLOCK_N):
        tok = start + offs_n
        mask_n = tok < seq_len
        page = tl.load(bt_row + tok // PAGE_SIZE, mask=mask_n, other=0).to(tl.int64)
        slot = tok % PAGE_SIZE
        k_ptrs = k_ptr + page[None, :] * stride_kb + slot[None, :] * stride_kt + kvh * stride_kh + offs_d[:, None]
        k = tl.load(k_ptrs, mask=mask_d[:, None] & mask_n[None, :], other=0.0)  # (BLOCK_D, BLOCK_N) = Kᵀ tile
        qk = tl.dot(q, k, input_precision=DOT_PRECISION) * qk_scale
        qk = tl.where(mask_n[None, :], qk, float("-inf"))
        m_new = tl.maximum(m_i, tl.max(qk, axis=1))
        alpha = tl.exp2(m_i - m_new)
        p = tl.exp2(qk - m_new[:, None])
        l_i = l_i * alpha + tl.sum(p, axis=1)
        v_ptrs = v_ptr + page[:, None] * stride_vb + slot[:, None] * stride_vt + kvh * stride_vh + offs_d[None, :]
        v = tl.load(v_ptrs, mask=mask_n[:, None] & mask_d[None, :], other=0.0)  # (BLOCK_N, BLOCK_D)
        acc = acc * alpha[:, None] + tl.dot(p.to(v.dtype), v, input_precision=DOT_PRECISION)
        m_i = m_new
    l_i = tl.where(l_i > 0.0, l_i, 1.0)  # an empty sequence gives zeros, not NaN
    out = acc / l_i[:, None]
    o_ptrs = o_ptr + s * stride_os + heads[:, None] * stride_oh + offs_d[None, :]
    tl.store(o_ptrs, out.to(o_ptr.dtype.element_ty), mask=q_mask)


paged_attention_decode_tuned = triton.autotune(CONFIGS, key=["G", "HD", "PAGE_SIZE"])(paged_attention_decode_kernel)


def paged_attention_decode(
    q: torch.Tensor,
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    block_tables: torch.Tensor,
    seq_lens: torch.Tensor,
    scale: float | None = None,
    *,
    config: triton.Config | dict | None = None,
) -> torch.Tensor:
    """softmax(scale · q Kᵀ) V per sequence over its paged K/V, GQA-grouped (shapes: module docstring).

    `config` pins BLOCK_N (and num_warps/num_stages with a triton.Config); default: autotuned on CUDA,
    BLOCK_N = 32 under the interpreter.
    """
    S, H, hd = q.shape
    n_blocks, page, n_kv, hd_k = k_cache.shape
    assert v_cache.shape == k_cache.shape and hd_k == hd, "k_cache/v_cache must be (N, bs, H_kv, hd)"
    assert H % n_kv == 0, f"{H} query heads are not a multiple of {n_kv} kv heads"
    assert block_tables.shape[0] == S and seq_lens.shape == (S,)
    assert k_cache.stride(-1) == 1 and v_cache.stride(-1) == 1, "caches need a contiguous head dim"
    if q.stride(-1) != 1:
        q = q.contiguous()
    g = H // n_kv
    out = torch.empty_like(q, memory_format=torch.contiguous_format)
    if S == 0:
        return out
    scale = 1.0 / math.sqrt(hd) if scale is None else float(scale)
    if config is None and q.device.type != "cuda":
        config = {"BLOCK_N": 32}
    args = (
        q,
        k_cache,
        v_cache,
        block_tables,
        seq_lens,
        out,
        scale * math.log2(math.e),
        g,
        hd,
        q.stride(0),
        q.stride(1),
        *k_cache.stride()[:3],
        *v_cache.stride()[:3],
        block_tables.stride(0),
        out.stride(0),
        out.stride(1),
    )
    constexprs = {
        "PAGE_SIZE": page,
        "BLOCK_G": max(16, triton.next_power_of_2(g)),
        "BLOCK_D": max(16, triton.next_power_of_2(hd)),
        "DOT_PRECISION": "ieee",
    }
    launch(paged_attention_decode_kernel, paged_attention_decode_tuned, (S, n_kv), args, constexprs, config, q)
    return out


def reference_decode(
    q: torch.Tensor,
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    block_tables: torch.Tensor,
    seq_lens: torch.Tensor,
    scale: float | None = None,
) -> torch.Tensor:
    """The PyTorch twin: `reference.paged_attention` with one row per sequence at position seq_len − 1."""
    S = q.shape[0]
    if scale is not None and scale != 1.0 / math.sqrt(q.shape[-1]):
        # the reference uses SDPA's default scale; fold any other scale into q (exact in fp32 up to rounding)
        q = q * (scale * math.sqrt(q.shape[-1]))
    ar = torch.arange(S, device=q.device)
    return reference.paged_attention(
        q, k_cache, v_cache, block_tables, seq_lens.long(), seq_lens.long() - 1, ar, torch.zeros_like(ar), 1
    )
