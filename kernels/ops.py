"""The one place that decides which implementation of each op the model runs.

`get_ops("torch")` is the reference: every op is the readable PyTorch twin in `reference.py`.
`get_ops("triton")` swaps in the fused Triton kernels where one exists (rms_norm, rope, the
scale-epilogue projections, the gated FFN, decode-time paged attention) and keeps the twins for the
rest (prefill attention, KV writes, LoRA updates). `get_ops("cpu")` is the reference with the
projections' GEMMs on numpy's BLAS (`cpu.py`: twice torch's GEMV bandwidth on CPU) and a decode step's
layers each one compiled C call (`native.py`). A model picks its
`Ops` once, at construction — nothing is patched at run time. `resolve_backend("auto", device)` =
triton on CUDA, cpu elsewhere; the environment variable PARALLAMA_BACKEND overrides the argument.
"""

from __future__ import annotations

import os
from collections.abc import Callable
from contextlib import AbstractContextManager, nullcontext
from functools import cache
from typing import Protocol

import torch
from torch import Tensor

from kernels import cpu, native, reference

BACKENDS = ("auto", "torch", "triton", "cpu")


class Ops(Protocol):
    """Every op the model calls, one signature each. A backend binds each to a function (table in
    kernels/README.md); `reference.py` holds the twins, whose docstrings give the shapes."""

    backend: str

    def rms_norm(self, x: Tensor, weight: Tensor, eps: float) -> Tensor: ...

    def add_rms_norm(self, x: Tensor, residual: Tensor, weight: Tensor, eps: float) -> tuple[Tensor, Tensor]:
        """(rms_norm(x + residual), x + residual): a sub-layer's residual add fused with the next norm."""
        ...

    def rope(self, x: Tensor, cos_sin: Tensor) -> Tensor: ...

    def linear_scale(
        self, x: Tensor, w: Tensor, scale: Tensor | None = None, row_to_seq: Tensor | None = None
    ) -> Tensor: ...

    def gated_up(
        self,
        x: Tensor,
        w_gate: Tensor,
        w_up: Tensor,
        scale_u: Tensor | None = None,
        row_to_seq: Tensor | None = None,
    ) -> Tensor: ...

    def lora_add(
        self,
        y: Tensor,
        x: Tensor,
        a: Tensor,
        b: Tensor,
        scaling: float,
        rows: Tensor | None = None,
        dropout: float = 0.0,
    ) -> Tensor: ...

    def attention(self, q: Tensor, k: Tensor, v: Tensor, causal: bool = True) -> Tensor: ...

    def write_kv(self, k_cache: Tensor, v_cache: Tensor, slots: Tensor, k: Tensor, v: Tensor) -> None: ...

    def rope_write_kv(
        self,
        qkv: Tensor,
        cos_sin: Tensor,
        k_cache: Tensor,
        v_cache: Tensor,
        slots: Tensor,
        n_heads: int,
        n_kv_heads: int,
    ) -> Tensor:
        """RoPE of the fused projection's Q and K heads, K and V written to the paged cache; returns Q."""
        ...

    def paged_attention(
        self,
        q: Tensor,
        k_cache: Tensor,
        v_cache: Tensor,
        block_tables: Tensor,
        seq_lens: Tensor,
        positions: Tensor,
        row_to_seq: Tensor,
        row_index: Tensor,
        max_rows: int,
        contiguous_kv: tuple[int, int] | None = None,
    ) -> Tensor: ...

    def scope(self, decode: bool = False) -> AbstractContextManager[None]:
        """Entered around every forward; `decode`: a step of a few rows, whose layers run as `decode_layers` /
        `decode_layer` calls or GEMVs on their pool (the cpu backend then pins torch to one thread: that pool owns
        the cores)."""
        ...

    # A whole decode layer in one call (`kernels.native.decode_layer`'s signature), or None: the model then
    # runs the ops above one by one, which are this op's twin; with it, the step's output projection
    # (`native.linear`, twin `linear_scale` without a scale).
    decode_layer: Callable[..., tuple[Tensor, Tensor]] | None
    decode_linear: Callable[[Tensor, Tensor], Tensor] | None
    # all layers of such a step in one call: `decode_stack` builds a `native.DecodeStack` once per model and KV
    # pool, `decode_layers(stack, x, cos_sin, slots, block_tables, seq_lens, scales)` runs it (same twin)
    decode_stack: Callable[..., Callable[..., tuple[Tensor, Tensor]]] | None
    decode_layers: Callable[..., tuple[Tensor, Tensor]] | None


def resolve_backend(backend: str = "auto", device: torch.device | str = "cpu") -> str:
    """ "torch", "triton" or "cpu" for a requested backend on `device`; PARALLAMA_BACKEND wins over the argument."""
    backend = os.environ.get("PARALLAMA_BACKEND") or backend
    if backend not in BACKENDS:
        raise ValueError(f"backend={backend!r} is not one of {', '.join(BACKENDS)} (argument or PARALLAMA_BACKEND)")
    on_cuda = torch.device(device).type == "cuda"
    if backend == "auto":
        return "triton" if on_cuda and _triton_available() else "torch" if on_cuda else "cpu"
    if backend == "triton" and not on_cuda and os.environ.get("TRITON_INTERPRET") != "1":
        raise ValueError("backend='triton' needs a CUDA device (or TRITON_INTERPRET=1 for the CPU interpreter)")
    if backend == "cpu" and on_cuda:
        raise ValueError("backend='cpu' runs on CPU tensors only; use 'triton' or 'torch' on CUDA")
    return backend


def _triton_available() -> bool:
    try:
        import triton  # noqa: F401
    except ImportError:
        return False
    return True


@cache
def get_ops(backend: str = "torch") -> Ops:
    if backend == "torch":
        return TORCH_OPS
    if backend == "triton":
        return _triton_ops()
    if backend == "cpu":
        return CpuOps()  # once (cached): its construction looks for the compiled decode layer
    raise ValueError(f"backend={backend!r}: expected 'torch', 'triton' or 'cpu' (resolve 'auto' with resolve_backend)")


class TorchOps:
    """The reference: every op is its PyTorch twin."""

    backend = "torch"
    rms_norm = staticmethod(reference.rms_norm)
    add_rms_norm = staticmethod(reference.add_rms_norm)
    rope = staticmethod(reference.rope)
    linear_scale = staticmethod(reference.linear_scale)
    gated_up = staticmethod(reference.gated_up)
    lora_add = staticmethod(reference.lora_add)
    attention = staticmethod(reference.attention)
    write_kv = staticmethod(reference.write_kv)
    rope_write_kv = staticmethod(reference.rope_write_kv)
    paged_attention = staticmethod(reference.paged_attention)
    scope = staticmethod(lambda decode=False: nullcontext())
    decode_layer = None
    decode_linear = None
    decode_stack = None
    decode_layers = None


class CpuOps(TorchOps):
    """The twins, with the projections' GEMMs on numpy's BLAS and a few ops rewritten for decode rows."""

    backend = "cpu"
    rms_norm = staticmethod(cpu.rms_norm)
    add_rms_norm = staticmethod(cpu.add_rms_norm)
    rope = staticmethod(cpu.rope)
    linear_scale = staticmethod(cpu.linear_scale)
    gated_up = staticmethod(cpu.gated_up)
    write_kv = staticmethod(cpu.write_kv)
    rope_write_kv = staticmethod(cpu.rope_write_kv)
    paged_attention = staticmethod(cpu.paged_attention)
    scope = staticmethod(cpu.scope)

    def __init__(self) -> None:
        # the compiled decode layer and its output projection where the library builds here (the first
        # construction compiles it, once per machine), else None: the per-op path
        ok = native.available()
        self.decode_layer = cpu.decode_layer if ok else None
        self.decode_linear = cpu.decode_linear if ok else None
        self.decode_stack = native.DecodeStack if ok else None
        self.decode_layers = cpu.decode_layers if ok else None


TORCH_OPS: Ops = TorchOps()


def _forward_only(
    kernel: Callable[..., torch.Tensor], twin: Callable[..., torch.Tensor]
) -> Callable[..., torch.Tensor]:
    """The kernels have no backward: when autograd must record the op (training), the twin runs."""

    def op(*args, **kwargs):
        if torch.is_grad_enabled() and any(isinstance(a, torch.Tensor) and a.requires_grad for a in args):
            return twin(*args, **kwargs)
        return kernel(*args, **kwargs)

    op.__name__ = getattr(kernel, "__name__", "op")
    return op


def _triton_ops() -> Ops:  # imported only when asked for: triton is heavy and CUDA-minded
    from kernels.gated_up import fused_gated_up
    from kernels.linear_scale import fused_linear_scale
    from kernels.paged_attention import paged_attention_decode
    from kernels.rms_norm import fused_rms_norm
    from kernels.rope import fused_rope
    from kernels.rope_kv import fused_rope_write_kv

    def paged_decode_or_twin(
        q, k_cache, v_cache, block_tables, seq_lens, positions, row_to_seq, row_index, max_rows, contiguous_kv=None
    ):
        # decode (one row per sequence, rows in sequence order as PagedKVCache.prepare_step packs them,
        # each at position seq_len - 1): the Triton kernel; prefill chunks: the twin
        if max_rows == 1 and q.shape[0] == block_tables.shape[0]:
            return paged_attention_decode(q, k_cache, v_cache, block_tables, seq_lens)
        return reference.paged_attention(
            q, k_cache, v_cache, block_tables, seq_lens, positions, row_to_seq, row_index, max_rows
        )

    def fused_add_rms_norm(x, residual, weight, eps):
        return fused_rms_norm(x, weight, eps, residual=residual)

    class TritonOps(TorchOps):
        """The fused kernels where one exists (forward-only: under autograd the twin runs); twins elsewhere."""

        backend = "triton"
        rms_norm = staticmethod(_forward_only(fused_rms_norm, reference.rms_norm))
        add_rms_norm = staticmethod(_forward_only(fused_add_rms_norm, reference.add_rms_norm))
        rope = staticmethod(_forward_only(fused_rope, reference.rope))
        rope_write_kv = staticmethod(_forward_only(fused_rope_write_kv, reference.rope_write_kv))
        linear_scale = staticmethod(_forward_only(fused_linear_scale, reference.linear_scale))
        gated_up = staticmethod(_forward_only(fused_gated_up, reference.gated_up))
        paged_attention = staticmethod(paged_decode_or_twin)

    return TritonOps()
