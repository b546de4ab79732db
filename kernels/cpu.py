"""CPU fast path for inference: the projections on the fastest CPU BLAS at hand, and fewer, larger torch ops.

A GEMM (a prefill: more than `GEMV_ROWS` rows) runs on torch's own BLAS (MKL in the x86 wheels), on torch's
OpenMP threads, over each weight packed once into MKL's layout (`mkl_gemm`) where torch has MKL; a few rows
(a decode step the compiled layers do not take) run as GEMVs on the compiled layers' thread pool
(`native.linear`), which streams weights at the machine's bandwidth where torch's GEMV does not. numpy's
OpenBLAS is left out wherever that library builds: its idle workers spin for ~10^8 cycles after each call, and
measured on a 2-core Xeon they slowed every torch op of a prefill and the first decode step after it
(bench/results/decode_cpu.md). One pool per forward owns the cores: `scope(decode=True)` leaves torch one
intra-op thread while the compiled layers run.

The small ops are rewritten for fewer dispatches per layer: after a GEMV has streamed megabytes of weights every
small op runs with cold caches (measured: 2-4x its warm cost), so each one saved counts. The residual add and
RMSNorm are one C pass per row (`native.add_rms_norm`; torch's `F.rms_norm` without the library), and so are RoPE
of Q and K with the KV write (`native.rope_write_kv`; without the library one complex multiply and `index_copy_`),
the SwiGLU and scale epilogues in place on the BLAS output, gate and up one GEMM over the stacked w1 | w3.
Attention reads a lone sequence's K/V in place when its blocks are consecutive (`StepBatch.contiguous_kv`, decided
once per step, not per layer; else one `index_select`) and runs a GQA-folded SDPA instead of the reference's padded
query grid and general mask; a prefill of whole prompts runs one causal SDPA per prompt.

Only inference takes this path: a GEMM whose inputs need gradients, or that is not fp32 on CPU, runs the
PyTorch twin (`reference.py`), so results agree with the twin up to fp32 summation order.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F

from kernels import mkl_gemm, native, native_attention, reference

GEMV_ROWS = native.MAX_ROWS  # up to this many rows a projection runs as GEMVs (the model's few-row steps)
GEMV_CHUNK_BYTES = 4 << 20  # weight rows per chunk of those GEMVs (2-8 MiB measured alike; 512 KiB slower)
PACK_MIN_NUMEL = 1 << 16  # smaller weights (LoRA's A and B) are cheap to pack per call: no second copy kept
_MAX_RUNS = 64  # more runs of rows than this (rows in no particular order): one gathered multiply instead
_EXACT = (torch.float32, torch.float64)  # dtypes where the rewrites below match the twin's rounding


def _blas_ok(x: torch.Tensor, w: torch.Tensor) -> bool:
    return (
        x.device.type == "cpu"
        and x.dtype == torch.float32
        and w.dtype == torch.float32
        and not (torch.is_grad_enabled() and (x.requires_grad or w.requires_grad))
    )


def _packed_ok(w: torch.Tensor) -> bool:
    """Whether a GEMM on w takes its packed form: a contiguous weight that is not an inference tensor (those
    have no version counter to tell an in-place write) and big enough that packing it again per call costs."""
    return w.numel() >= PACK_MIN_NUMEL and w.is_contiguous() and not w.is_inference() and mkl_gemm.available()


def _array(t: torch.Tensor) -> np.ndarray:
    """An activation's numpy view (detached only when it needs it: each call is dispatcher time)."""
    return t.detach().numpy() if t.requires_grad else t.numpy()


def _weight_array(w: torch.Tensor) -> np.ndarray:
    """A weight's numpy view, made once per tensor object (weights are used every step) and remade when the
    tensor's storage moved (`p.data = ...`)."""
    hit = getattr(w, "_numpy_view", None)
    if hit is not None and hit[0] == w.data_ptr():
        return hit[1]
    arr = w.detach().numpy()
    w._numpy_view = (w.data_ptr(), arr)
    return arr


def blas_linear(x: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
    """x @ wᵀ for x (..., K), w (N, K) (the name is historical): a GEMM of more than `GEMV_ROWS` rows on torch's
    own BLAS, a few rows as GEMVs on the compiled layer's threads (`native.linear`), numpy's BLAS where that
    library did not build. No path leaves another thread pool spinning after it (see the module docstring)."""
    if not _blas_ok(x, w):
        return F.linear(x, w)
    lead = x.shape[:-1]
    x2 = x if x.dim() == 2 else x.reshape(-1, x.shape[-1])
    M, N = x2.shape[0], w.shape[0]
    if M > GEMV_ROWS and _packed_ok(w):
        y = mkl_gemm.linear(x2 if x2.is_contiguous() else x2.contiguous(), w)
        return y if x.dim() == 2 else y.view(*lead, N)
    if M > GEMV_ROWS or M == 0:
        return F.linear(x, w)
    if not x2.is_contiguous():
        x2 = x2.contiguous()
    if native.available() and w.is_contiguous():
        y = native.linear(x2, w)
    else:
        wn, xn = _weight_array(w), _array(x2)  # wn (N, K) row-major: W @ x is BLAS's fast "N" GEMV
        # one GEMV per row (OpenBLAS's sgemm is slow for a few rows), over row chunks of the weight small
        # enough to stay in cache: a chunk comes from DRAM once and from cache for the other rows
        out = np.empty((M, N), dtype=np.float32)
        step = N if M == 1 else max(1, GEMV_CHUNK_BYTES // (wn.shape[1] * wn.itemsize))
        for c in range(0, N, step):
            for m in range(M):
                np.matmul(wn[c : c + step], xn[m], out=out[m, c : c + step])
        y = torch.from_numpy(out)
    return y if x.dim() == 2 else y.view(*lead, N)


def linear_scale(
    x: torch.Tensor, w: torch.Tensor, scale: torch.Tensor | None = None, row_to_seq: torch.Tensor | None = None
) -> torch.Tensor:
    """`reference.linear_scale` with the GEMM on BLAS (the scale applied in place on its fresh output)."""
    if scale is None or not _blas_ok(x, w):
        return reference.apply_scale(blas_linear(x, w), scale, row_to_seq)
    return _scale_(blas_linear(x, w), scale, row_to_seq)


def _scale_(y: torch.Tensor, scale: torch.Tensor, row_to_seq: torch.Tensor | None) -> torch.Tensor:
    """y *= scale[row_to_seq] in place. A prefill's rows come in runs, one per sequence: each run is
    multiplied by its sequence's row, so the per-row (M, N) scale is never gathered (for 16 prompts of
    ~56 tokens over SmolLM2's 30 layers: ~4 ms instead of ~18 ms)."""
    if row_to_seq is not None and y.dim() == 2 and scale.dtype == y.dtype:
        seqs, counts = torch.unique_consecutive(row_to_seq, return_counts=True)
        if len(seqs) <= _MAX_RUNS:
            start = 0
            for j, n in zip(seqs.tolist(), counts.tolist()):
                y[start : start + n].mul_(scale[j])
                start += n
            return y
    return y.mul_(reference.broadcast_scale(scale, y, row_to_seq))


def gated_up(
    x: torch.Tensor,
    w_gate: torch.Tensor,
    w_up: torch.Tensor,
    scale_u: torch.Tensor | None = None,
    row_to_seq: torch.Tensor | None = None,
) -> torch.Tensor:
    """`reference.gated_up` with the GEMMs on BLAS: one GEMM when the weights are adjacent row blocks of
    one tensor (the model stores w1 | w3 stacked), and the SwiGLU epilogue in place on its output."""
    stacked = _stacked(w_gate, w_up)
    if stacked is None or not _blas_ok(x, stacked):
        return reference.gated_up(x, w_gate, w_up, scale_u, row_to_seq, matmul=blas_linear)
    g13 = blas_linear(x, stacked)  # (..., 2N), fresh
    gate, up = g13.split(w_gate.shape[0], dim=-1)  # views
    if scale_u is not None:
        up = _scale_(up, scale_u, row_to_seq)
    if g13.dim() == 2 and native.available():  # one C pass (None without its AVX-512 form)
        out = native.silu_mul(g13)
        if out is not None:
            return out
    return F.silu(gate).mul_(up)


def _stacked(w_gate: torch.Tensor, w_up: torch.Tensor) -> torch.Tensor | None:
    """w_gate and w_up as one (2N, K) tensor when they are views of one tensor and w_up's rows directly
    follow w_gate's, else None."""
    if (
        w_gate.dim() != 2
        or w_gate.shape != w_up.shape
        or w_gate.dtype != w_up.dtype
        or w_gate._base is None  # views of one tensor (a cheap check: this runs in every layer's decode)
        or w_gate._base is not w_up._base
        or not (w_gate.is_contiguous() and w_up.is_contiguous())
        or w_up.storage_offset() != w_gate.storage_offset() + w_gate.numel()
    ):
        return None
    n, k = w_gate.shape
    base = w_gate._base
    if base.shape == (2 * n, k) and base.is_contiguous() and base.storage_offset() == w_gate.storage_offset():
        return base  # the stacked tensor itself (the model's w13): its numpy view is made once
    return w_gate.as_strided((2 * n, k), (k, 1))


def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    """`reference.rms_norm` as one op (fp32/fp64, where the twin's cast round-trip is a no-op): fp32 in one C
    pass per row (`native.add_rms_norm`), else torch's one-call `F.rms_norm`."""
    if x.dtype not in _EXACT or weight.dtype != x.dtype:
        return reference.rms_norm(x, weight, eps)
    if _native_norm_ok(x, weight):
        return native.add_rms_norm(x, None, weight, eps)[0]
    return F.rms_norm(x, (x.shape[-1],), weight, eps)


def add_rms_norm(
    x: torch.Tensor, residual: torch.Tensor, weight: torch.Tensor, eps: float
) -> tuple[torch.Tensor, torch.Tensor]:
    """`reference.add_rms_norm`: fp32 as one C pass per row (torch's add and RMSNorm are six passes over a
    prefill's rows, with their temporaries), else the add and this backend's RMSNorm."""
    if _native_norm_ok(x, weight) and residual.shape == x.shape and _native_norm_ok(residual, weight):
        return native.add_rms_norm(x, residual, weight, eps)
    h = x + residual
    return rms_norm(h, weight, eps), h


def _native_norm_ok(x: torch.Tensor, weight: torch.Tensor) -> bool:
    return (
        _blas_ok(x, weight)
        and x.is_contiguous()
        and weight.is_contiguous()
        and weight.shape == x.shape[-1:]
        and x.numel() > 0
        and native.available()
    )


def write_kv(
    k_cache: torch.Tensor, v_cache: torch.Tensor, slots: torch.Tensor, k: torch.Tensor, v: torch.Tensor
) -> None:
    """`reference.write_kv` with `index_copy_` (half the cost of an indexed assignment for a decode row)."""
    if k.dtype != k_cache.dtype or v.dtype != v_cache.dtype:
        return reference.write_kv(k_cache, v_cache, slots, k, v)
    k_cache.view(-1, *k_cache.shape[2:]).index_copy_(0, slots, k)
    v_cache.view(-1, *v_cache.shape[2:]).index_copy_(0, slots, v)


def rope_write_kv(
    qkv: torch.Tensor,
    cos_sin: torch.Tensor,
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    slots: torch.Tensor,
    n_heads: int,
    n_kv_heads: int,
) -> torch.Tensor:
    """`reference.rope_write_kv`: fp32 as one C pass per row (`native.rope_write_kv`), else this backend's RoPE
    and KV write."""
    tensors = (qkv, cos_sin, k_cache, v_cache)
    if (
        native.available()
        and all(t.dtype == torch.float32 and t.is_contiguous() and t.device.type == "cpu" for t in tensors)
        and slots.dtype == torch.int64
        and slots.is_contiguous()
        and qkv.dim() == 2
        and cos_sin.shape == (qkv.shape[0], k_cache.shape[-1] // 2, 2)
        and qkv.shape[1] == (n_heads + 2 * n_kv_heads) * k_cache.shape[-1]
        and not (torch.is_grad_enabled() and qkv.requires_grad)
    ):
        return native.rope_write_kv(qkv, cos_sin, k_cache, v_cache, slots, n_heads, n_kv_heads)
    return reference.rope_write_kv(qkv, cos_sin, k_cache, v_cache, slots, n_heads, n_kv_heads, rope, write_kv)


def rope(x: torch.Tensor, cos_sin: torch.Tensor) -> torch.Tensor:
    """`reference.rope` as one complex multiply: (x0 + i·x1)(cos + i·sin) rotates each interleaved pair."""
    if x.dtype != torch.float32 or cos_sin.dtype != torch.float32 or x.stride(-1) != 1 or x.storage_offset() % 2:
        return reference.rope(x, cos_sin)
    if any(s % 2 for s in x.stride()[:-1]):
        x = x.contiguous()
    xc = torch.view_as_complex(x.unflatten(-1, (-1, 2)))  # (..., H, hd/2), a view
    cs = torch.view_as_complex(cos_sin.contiguous()).unsqueeze(-2)  # (..., 1, hd/2)
    return torch.view_as_real(xc * cs).flatten(-2)


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
    """`reference.paged_attention`; decode steps (one row per sequence, in order, at seq_len - 1) and
    prefills of whole prompts take direct forms without the padded query grid and general mask, and a
    lone sequence with consecutive blocks (`contiguous_kv` = (first block, context)) is read in place."""
    S, nb = block_tables.shape
    M, H, hd = q.shape
    _, bs, n_kv, _ = k_cache.shape
    g = H // n_kv
    if S == 1:
        L = contiguous_kv[1] if contiguous_kv is not None else int(seq_lens[0])
        if M in (1, L):  # its newest token (decode) or its whole prompt from position 0 (prefill)
            if contiguous_kv is not None:  # consecutive blocks: the K/V are a slice of the pool, no copy
                first = contiguous_kv[0]
                k = k_cache[first : first + nb].flatten(0, 1)[None, :L]  # (1, L, H_kv, hd)
                v = v_cache[first : first + nb].flatten(0, 1)[None, :L]
            else:  # scattered blocks (e.g. beams sharing a prefix): one gather
                k = k_cache.index_select(0, block_tables[0]).flatten(0, 1)[None, :L]
                v = v_cache.index_select(0, block_tables[0]).flatten(0, 1)[None, :L]
            if M == L:
                return _prompt_attention(q, k, v)
            out = F.scaled_dot_product_attention(q.view(1, n_kv, g, hd), k.transpose(1, 2), v.transpose(1, 2))
            return out.reshape(M, H, hd)
    elif max_rows == 1 and M == S:  # decode: row s is sequence s's newest token, its K/V already written
        flat = block_tables.reshape(-1)
        k = k_cache.index_select(0, flat).view(S, nb * bs, n_kv, hd)  # (S, L, H_kv, hd), padded to the longest
        v = v_cache.index_select(0, flat).view(S, nb * bs, n_kv, hd)
        mask = (torch.arange(nb * bs, device=q.device) < seq_lens[:, None])[:, None, None]  # (S, 1, 1, L)
        # the g query heads of each KV head are g query rows against that head's K/V: no GQA expansion
        out = F.scaled_dot_product_attention(
            q.view(S, n_kv, g, hd), k.transpose(1, 2), v.transpose(1, 2), attn_mask=mask
        )
        return out.reshape(M, H, hd)
    elif _whole_prompts_in_order(positions, row_to_seq, row_index, seq_lens):
        # a prefill of several prompts, each from position 0: one causal SDPA per sequence over its own
        # rows instead of the twin's query grid padded to the longest prompt and its general mask
        out, start = [], 0
        for s, n in enumerate(seq_lens.tolist()):
            k = k_cache.index_select(0, block_tables[s]).flatten(0, 1)[None, :n]  # (1, n, H_kv, hd)
            v = v_cache.index_select(0, block_tables[s]).flatten(0, 1)[None, :n]
            out.append(_prompt_attention(q[start : start + n], k, v))
            start += n
        return torch.cat(out)
    return reference.paged_attention(
        q, k_cache, v_cache, block_tables, seq_lens, positions, row_to_seq, row_index, max_rows
    )


def _prompt_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    """Causal attention of one whole prompt, q (n, H, hd) over its K/V (1, n, H_kv, hd): the compiled flash
    kernel on torch's OpenMP threads for fp32 (`native_attention`), else the twin's SDPA."""
    if q.dtype == torch.float32 and k.dtype == torch.float32 and not (torch.is_grad_enabled() and q.requires_grad):
        out = native_attention.causal_attention(q.contiguous(), k[0].contiguous(), v[0].contiguous())
        if out is not None:
            return out
    return reference.attention(q[None], k, v, causal=True)[0]


def _whole_prompts_in_order(
    positions: torch.Tensor, row_to_seq: torch.Tensor, row_index: torch.Tensor, seq_lens: torch.Tensor
) -> bool:
    """Rows packed sequence after sequence (as `PagedKVCache.prepare_step` packs them), sequence s's
    rows its tokens 0 .. seq_lens[s] - 1: then it owns rows [sum(seq_lens[:s]), sum(seq_lens[:s+1]))."""
    return bool(
        torch.equal(torch.bincount(row_to_seq, minlength=len(seq_lens)), seq_lens)
        and (positions == row_index).all()
        and (row_to_seq[1:] >= row_to_seq[:-1]).all()
    )


def decode_layer(*args: Any, **kwargs: Any) -> tuple[torch.Tensor, torch.Tensor]:
    """A whole decode layer in one compiled call: `native.decode_layer` (its docstring has the arguments)."""
    return native.decode_layer(*args, **kwargs)


def decode_layers(stack: native.DecodeStack, *args: Any) -> tuple[torch.Tensor, torch.Tensor]:
    """Every layer of a decode step in one compiled call: `stack(*args)` (`native.DecodeStack.__call__`)."""
    return stack(*args)


def decode_linear(x: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
    """A decode step's output projection x @ wᵀ through the same BLAS as the compiled layers: `native.linear`."""
    return native.linear(x, w)


@contextmanager
def scope(decode: bool = False) -> Iterator[None]:
    """Around a forward: a step whose layers run compiled (`decode`) leaves torch one intra-op thread for the
    duration (restored after), so no OpenMP worker wakes for a small op and spins against the layers' pool;
    any other forward keeps every thread for torch's GEMMs and elementwise ops."""
    n = torch.get_num_threads()
    if not decode or n == 1:
        yield
        return
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(n)
