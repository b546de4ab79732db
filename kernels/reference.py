"""PyTorch reference ops: the readable, exact twins that every Triton kernel is tested against.

The model reaches its numerics only through `kernels.ops`, whose "torch" backend binds exactly these; the
"triton" and "cpu" backends replace some of them with faster functions that are tested against them.
"""

from __future__ import annotations

import math
from collections.abc import Callable

import torch
import torch.nn.functional as F


def rms_norm(x: torch.Tensor, weight: torch.Tensor | None, eps: float) -> torch.Tensor:
    """y = x / sqrt(mean(x²) + eps) * weight, reduced in fp32 and cast back (Meta and HF agree); weight None:
    no gain (PARA's normalised pool)."""
    xf = x.float()
    y = (xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + eps)).to(x.dtype)
    return y if weight is None else y * weight


def add_rms_norm(
    x: torch.Tensor, residual: torch.Tensor, weight: torch.Tensor, eps: float
) -> tuple[torch.Tensor, torch.Tensor]:
    """(rms_norm(h), h) with h = x + residual: a sub-layer's output joining the residual stream, normed for
    the next sub-layer. x, residual: (..., D) in one dtype."""
    h = x + residual
    return rms_norm(h, weight, eps), h


def rope_frequencies(
    head_dim: int,
    theta: float,
    *,
    scaled: bool = False,
    scale_factor: float = 8.0,
    low_freq_factor: float = 1.0,
    high_freq_factor: float = 4.0,
    original_max_seq_len: int = 8192,
) -> torch.Tensor:
    """Inverse frequencies (head_dim/2,) in fp32, with Llama 3.1/3.2 scaling when `scaled`.

    Llama 3 scaling keeps high frequencies (wavelength < orig/high_freq_factor), divides low ones
    (wavelength > orig/low_freq_factor) by `scale_factor`, and interpolates smoothly in between.
    """
    inv_freq = 1.0 / (theta ** (torch.arange(0, head_dim, 2, dtype=torch.int64).float() / head_dim))
    if not scaled:
        return inv_freq
    wavelen = 2 * math.pi / inv_freq
    low_wavelen = original_max_seq_len / low_freq_factor
    high_wavelen = original_max_seq_len / high_freq_factor
    smooth = (original_max_seq_len / wavelen - low_freq_factor) / (high_freq_factor - low_freq_factor)
    mid = (1 - smooth) * inv_freq / scale_factor + smooth * inv_freq
    out = torch.where(wavelen > low_wavelen, inv_freq / scale_factor, mid)
    return torch.where(wavelen < high_wavelen, inv_freq, out)


def rope_table(inv_freq: torch.Tensor, max_seq_len: int) -> torch.Tensor:
    """cos/sin for every position: (max_seq_len, head_dim/2, 2) fp32, [..., 0] = cos, [..., 1] = sin."""
    angles = torch.outer(torch.arange(max_seq_len, dtype=torch.float32), inv_freq)
    return torch.stack((angles.cos(), angles.sin()), dim=-1)


def rope(x: torch.Tensor, cos_sin: torch.Tensor) -> torch.Tensor:
    """Rotate interleaved pairs (x[2i], x[2i+1]) — Meta's convention, not HF's rotate-half.

    x: (B, T, H, hd); cos_sin: (B, T, hd/2, 2) or (T, hd/2, 2) for the positions of x.
    """
    xf = x.float().unflatten(-1, (-1, 2))  # (B, T, H, hd/2, 2)
    cs = cos_sin.unsqueeze(-3)  # broadcast over heads
    cos, sin = cs[..., 0], cs[..., 1]
    x0, x1 = xf[..., 0], xf[..., 1]
    out = torch.stack((x0 * cos - x1 * sin, x0 * sin + x1 * cos), dim=-1)
    return out.flatten(-2).to(x.dtype)


def linear_scale(
    x: torch.Tensor,
    w: torch.Tensor,
    scale: torch.Tensor | None = None,
    row_to_seq: torch.Tensor | None = None,
) -> torch.Tensor:
    """y = (x @ wᵀ) * scale[row_to_seq]: a projection with a per-sequence column scale.

    x: (M, K) or (B, T, K); w: (N, K); scale: (S, N) one row per sequence; row_to_seq: (M,) maps
    each row of x to its sequence (None: scale has one row per leading index of x, broadcast).
    """
    return apply_scale(F.linear(x, w), scale, row_to_seq)


def apply_scale(y: torch.Tensor, scale: torch.Tensor | None, row_to_seq: torch.Tensor | None = None) -> torch.Tensor:
    """y * scale[row_to_seq] (see `linear_scale` for the broadcast rules); y unchanged when scale is None."""
    if scale is None:
        return y
    return y * broadcast_scale(scale, y, row_to_seq)


def broadcast_scale(scale: torch.Tensor, y: torch.Tensor, row_to_seq: torch.Tensor | None = None) -> torch.Tensor:
    """scale (S, N) in y's dtype, shaped to multiply y: gathered per row (`row_to_seq`), else one row per
    leading index of y (or 1 for all) viewed to broadcast against y (S, ..., N)."""
    if row_to_seq is not None:
        scale = scale[row_to_seq]
    elif y.dim() > 2:
        scale = scale.view(scale.shape[0], *([1] * (y.dim() - 2)), -1)
    return scale if scale.dtype == y.dtype else scale.to(y.dtype)  # decode calls this per layer: no no-op calls


def lora_add(
    y: torch.Tensor,
    x: torch.Tensor,
    a: torch.Tensor,
    b: torch.Tensor,
    scaling: float,
    rows: torch.Tensor | None = None,
    dropout: float = 0.0,
) -> torch.Tensor:
    """y + dropout(x) @ aᵀ @ bᵀ · scaling on `rows` of y (None: all): an unmerged LoRA update, in peft's order.

    y: (..., N); x: (..., K); a: (r, K); b: (N, r); rows: (n,) indices into the leading dim of x and y.
    Returns a new tensor (autograd-safe); rows outside `rows` are unchanged.
    """
    if rows is None:
        return y + F.linear(F.linear(F.dropout(x, dropout) if dropout else x, a), b) * scaling
    xr = x[rows]
    delta = F.linear(F.linear(F.dropout(xr, dropout) if dropout else xr, a), b) * scaling
    return y.index_add(0, rows, delta.to(y.dtype))


def gated_up(
    x: torch.Tensor,
    w_gate: torch.Tensor,
    w_up: torch.Tensor,
    scale_u: torch.Tensor | None = None,
    row_to_seq: torch.Tensor | None = None,
    matmul: Callable[[torch.Tensor, torch.Tensor], torch.Tensor] = F.linear,
) -> torch.Tensor:
    """SwiGLU input of the down projection: silu(x @ w_gateᵀ) * ((x @ w_upᵀ) * scale_u[row_to_seq]).
    `matmul(x, w)` = x @ wᵀ (the cpu backend passes its BLAS GEMM)."""
    return F.silu(matmul(x, w_gate)) * apply_scale(matmul(x, w_up), scale_u, row_to_seq)


def attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, causal: bool = True) -> torch.Tensor:
    """softmax(q kᵀ / sqrt(hd)) v with GQA by head grouping (no repeated K/V is materialised).

    q: (B, T, H, hd); k, v: (B, S, H_kv, hd) → (B, T, H, hd).
    """
    out = F.scaled_dot_product_attention(
        q.transpose(1, 2),
        k.transpose(1, 2),
        v.transpose(1, 2),
        is_causal=causal,
        enable_gqa=q.shape[2] != k.shape[2],
    )
    return out.transpose(1, 2)


def write_kv(
    k_cache: torch.Tensor, v_cache: torch.Tensor, slots: torch.Tensor, k: torch.Tensor, v: torch.Tensor
) -> None:
    """Scatter new K/V rows into the paged pool. caches: (N, bs, H_kv, hd); slots, k, v: (M,), (M, H_kv, hd)."""
    k_cache.view(-1, *k_cache.shape[2:])[slots] = k.to(k_cache.dtype)
    v_cache.view(-1, *v_cache.shape[2:])[slots] = v.to(v_cache.dtype)


def rope_write_kv(
    qkv: torch.Tensor,
    cos_sin: torch.Tensor,
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    slots: torch.Tensor,
    n_heads: int,
    n_kv_heads: int,
    rope_fn: Callable[[torch.Tensor, torch.Tensor], torch.Tensor] | None = None,
    write_fn: Callable[..., None] | None = None,
) -> torch.Tensor:
    """RoPE of packed rows' Q and K heads; K and V written to the paged cache at `slots`; returns Q (M, H, hd).

    qkv: (M, (H + 2 H_kv) hd) the fused projection's rows; cos_sin: (M, hd/2, 2); caches (N, bs, H_kv, hd).
    `rope_fn` / `write_fn` replace this module's `rope` / `write_kv` (a backend's faster forms)."""
    heads = qkv.unflatten(-1, (n_heads + 2 * n_kv_heads, -1))  # (M, H + 2 H_kv, hd), a view
    qk = (rope_fn or rope)(heads[:, : n_heads + n_kv_heads], cos_sin)  # Q and K side by side: one call
    q, k = qk.split([n_heads, n_kv_heads], dim=1)
    (write_fn or write_kv)(k_cache, v_cache, slots, k, heads[:, n_heads + n_kv_heads :])
    return q


def paged_attention(
    q: torch.Tensor,
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    block_tables: torch.Tensor,
    seq_lens: torch.Tensor,
    positions: torch.Tensor,
    row_to_seq: torch.Tensor,
    row_index: torch.Tensor,
    max_rows: int,
    contiguous_kv: tuple[int, int] | None = None,
) -> torch.Tensor:
    """Causal attention of packed query rows over each sequence's paged K/V.

    q: (M, H, hd) rows of S sequences (row m is token `row_index[m]` of this step for sequence
    `row_to_seq[m]`, at absolute position `positions[m]`); caches (N, bs, H_kv, hd) already hold
    this step's K/V; block_tables (S, nb); seq_lens (S,) context length per sequence.
    Query heads are grouped per KV head, so GQA never materialises repeated K/V. contiguous_kv
    (`StepBatch.contiguous_kv`) is a hint for faster backends; the reference gathers regardless.
    """
    M, H, hd = q.shape
    S = block_tables.shape[0]
    n_kv = k_cache.shape[2]
    g = H // n_kv
    k = k_cache[block_tables].flatten(1, 2)  # (S, L, H_kv, hd)
    v = v_cache[block_tables].flatten(1, 2)
    L = k.shape[1]
    qp = q.new_zeros(S, max_rows, H, hd)
    qp[row_to_seq, row_index] = q
    qpos = torch.full((S, max_rows), -1, dtype=torch.long, device=q.device)
    qpos[row_to_seq, row_index] = positions
    key = torch.arange(L, device=q.device)
    mask = (key <= qpos[:, :, None]) & (key < seq_lens[:, None, None])  # (S, Tq, L)
    qg = qp.view(S, max_rows, n_kv, g, hd).permute(0, 2, 3, 1, 4).reshape(S, n_kv, g * max_rows, hd)
    mask = mask[:, None, None].expand(S, 1, g, max_rows, L).reshape(S, 1, g * max_rows, L)
    out = F.scaled_dot_product_attention(qg, k.transpose(1, 2), v.transpose(1, 2), attn_mask=mask)
    out = out.view(S, n_kv, g, max_rows, hd).permute(0, 3, 1, 2, 4).reshape(S, max_rows, H, hd)
    return out[row_to_seq, row_index]  # padded rows (all keys masked) are dropped here
