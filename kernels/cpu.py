"""CPU fast path for inference: the projections' GEMMs through numpy's BLAS.

Measured on the 2-core CI machine (fp32, weights streamed from DRAM, out of cache): torch's CPU GEMV
(`F.linear` on a (N, K) weight) reads weights at ~16 GB/s, `x @ W` on a (K, N) copy at ~23 GB/s, while
numpy's threaded OpenBLAS `W @ x` reaches ~40 GB/s — the machine's streaming bandwidth (~44 GB/s) — with
no weight copy. Decode is a chain of GEMVs, so this roughly halves a decode step. The two libraries'
thread pools spin against each other, so `single_torch_thread` leaves torch one intra-op thread while a
forward runs (the GEMMs, the bulk of the work, still use every core through BLAS).

Only inference takes this path: a GEMM whose inputs need gradients, or that is not fp32 on CPU, runs the
PyTorch twin (`reference.py`), so results agree with the twin up to fp32 summation order.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager

import torch
import torch.nn.functional as F

from kernels import reference


def _blas_ok(x: torch.Tensor, w: torch.Tensor) -> bool:
    return (
        x.device.type == "cpu"
        and x.dtype == torch.float32
        and w.dtype == torch.float32
        and not (torch.is_grad_enabled() and (x.requires_grad or w.requires_grad))
    )


def blas_linear(x: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
    """x @ wᵀ for x (..., K), w (N, K); numpy's BLAS when `_blas_ok`, else F.linear."""
    if not _blas_ok(x, w):
        return F.linear(x, w)
    lead = x.shape[:-1]
    x2 = x.reshape(-1, x.shape[-1]).contiguous()
    wn = w.detach().numpy()  # (N, K) row-major: W @ xᵀ is BLAS's fast "N" GEMV/GEMM
    out = wn @ x2.detach().numpy()[0] if x2.shape[0] == 1 else x2.detach().numpy() @ wn.T
    return torch.from_numpy(out).view(*lead, w.shape[0])


def linear_scale(
    x: torch.Tensor, w: torch.Tensor, scale: torch.Tensor | None = None, row_to_seq: torch.Tensor | None = None
) -> torch.Tensor:
    """`reference.linear_scale` with the GEMM on BLAS."""
    return reference.apply_scale(blas_linear(x, w), scale, row_to_seq)


def gated_up(
    x: torch.Tensor,
    w_gate: torch.Tensor,
    w_up: torch.Tensor,
    scale_u: torch.Tensor | None = None,
    row_to_seq: torch.Tensor | None = None,
) -> torch.Tensor:
    """`reference.gated_up` with the GEMMs on BLAS."""
    return reference.gated_up(x, w_gate, w_up, scale_u, row_to_seq, matmul=blas_linear)


@contextmanager
def single_torch_thread() -> Iterator[None]:
    """torch on one intra-op thread for the duration (restored after): BLAS owns the cores."""
    n = torch.get_num_threads()
    if n == 1:
        yield
        return
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(n)
