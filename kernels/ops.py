"""The one place that decides which implementation of each op the model runs.

`get_ops("torch")` is the reference: every op is the readable PyTorch twin in `reference.py`.
`get_ops("triton")` swaps in the fused Triton kernels where one exists (rms_norm, rope, the
scale-epilogue projections, the gated FFN, decode-time paged attention) and keeps the twins for the
rest (prefill attention, KV writes, LoRA updates). `get_ops("cpu")` is the reference with the
projections' GEMMs on numpy's BLAS (`cpu.py`: twice torch's GEMV bandwidth on CPU). A model picks its
`Ops` once, at construction — nothing is patched at run time. `resolve_backend("auto", device)` =
triton on CUDA, cpu elsewhere; the environment variable PARALLAMA_BACKEND overrides the argument.
"""

from __future__ import annotations

import dataclasses
import os
from collections.abc import Callable
from contextlib import AbstractContextManager, nullcontext
from dataclasses import dataclass
from functools import cache

import torch

from kernels import cpu, reference

BACKENDS = ("auto", "torch", "triton", "cpu")


@dataclass(frozen=True)
class Ops:
    backend: str
    rms_norm: Callable[..., torch.Tensor]
    rope: Callable[..., torch.Tensor]
    linear_scale: Callable[..., torch.Tensor]
    gated_up: Callable[..., torch.Tensor]
    lora_add: Callable[..., torch.Tensor]
    attention: Callable[..., torch.Tensor]
    write_kv: Callable[..., None]
    paged_attention: Callable[..., torch.Tensor]
    scope: Callable[[], AbstractContextManager] = nullcontext  # entered around every forward


def resolve_backend(backend: str = "auto", device: torch.device | str = "cpu") -> str:
    """ "torch" or "triton" for a requested backend on `device`; PARALLAMA_BACKEND wins over the argument."""
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
        return CPU_OPS
    raise ValueError(f"backend={backend!r}: expected 'torch', 'triton' or 'cpu' (resolve 'auto' with resolve_backend)")


TORCH_OPS = Ops(
    backend="torch",
    rms_norm=reference.rms_norm,
    rope=reference.rope,
    linear_scale=reference.linear_scale,
    gated_up=reference.gated_up,
    lora_add=reference.lora_add,
    attention=reference.attention,
    write_kv=reference.write_kv,
    paged_attention=reference.paged_attention,
)


CPU_OPS = dataclasses.replace(
    TORCH_OPS,
    backend="cpu",
    rms_norm=cpu.rms_norm,
    rope=cpu.rope,
    write_kv=cpu.write_kv,
    paged_attention=cpu.paged_attention,
    linear_scale=cpu.linear_scale,
    gated_up=cpu.gated_up,
    scope=cpu.single_torch_thread,
)


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


def _triton_ops() -> Ops:
    from kernels.gated_up import fused_gated_up
    from kernels.linear_scale import fused_linear_scale
    from kernels.paged_attention import paged_attention_decode
    from kernels.rms_norm import fused_rms_norm
    from kernels.rope import fused_rope

    def paged_attention(
        q, k_cache, v_cache, block_tables, seq_lens, positions, row_to_seq, row_index, max_rows, contiguous_kv=None
    ):
        # decode (one row per sequence, rows in sequence order as PagedKVCache.prepare_step packs them,
        # each at position seq_len - 1): the Triton kernel; prefill chunks: the twin
        if max_rows == 1 and q.shape[0] == block_tables.shape[0]:
            return paged_attention_decode(q, k_cache, v_cache, block_tables, seq_lens)
        return reference.paged_attention(
            q, k_cache, v_cache, block_tables, seq_lens, positions, row_to_seq, row_index, max_rows
        )

    return Ops(
        backend="triton",
        rms_norm=_forward_only(fused_rms_norm, reference.rms_norm),
        rope=_forward_only(fused_rope, reference.rope),
        linear_scale=_forward_only(fused_linear_scale, reference.linear_scale),
        gated_up=_forward_only(fused_gated_up, reference.gated_up),
        lora_add=reference.lora_add,
        attention=reference.attention,
        write_kv=reference.write_kv,
        paged_attention=paged_attention,
    )
