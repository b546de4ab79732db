"""A prompt's causal attention in compiled C (kernels/csrc/prompt_attention.c) on torch's own OpenMP threads.

The cpu backend's prefill runs torch's MKL GEMMs between its attentions. torch's SDPA is the twin here; the
compiled form reads the keys once transposed and keeps 16 query rows x 64 keys of scores in registers, and runs
on the same OpenMP threads as the GEMMs around it: the source is part of the native library (`native.py`), built
with -fopenmp and linked to libgomp.so.1, which the loader resolves to the copy torch loaded
(`native.openmp_is_torchs`). Where it would bind to another runtime, a second pool would spin against torch's,
so then this path is off; also without AVX-512, without a C compiler that takes -fopenmp, or with
PARALLAMA_NATIVE=0.
"""

from __future__ import annotations

import functools
import os
from typing import Any

import torch

from kernels import native


@functools.cache
def library() -> Any:
    """The native library where this path is on, else None (see the module docstring)."""
    if os.environ.get("PARALLAMA_NATIVE", "1") == "0":
        return None
    if not native.on_torchs_openmp():  # a second pool would fight torch's for the cores
        return None
    lib = native.library()
    probe = lib.pl_causal_attention(None, None, None, None, 0, 0, 1, 1, 16)  # 2: no AVX-512 or OpenMP form
    return lib if probe == 0 else None


def causal_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor | None:
    """softmax(q kᵀ / √hd + causal) v for a prompt's rows: q (M, H, hd), k and v (L, H_kv, hd), contiguous fp32,
    query row i at position L - M + i. None where the path is off or the shape is not one it takes (hd a
    multiple of 16 up to 256, M ≤ L, H a multiple of H_kv): the caller keeps SDPA."""
    lib = library()
    M, H, hd = q.shape
    L, Hkv, _ = k.shape
    for name, t, want in (("q", q, (M, H, hd)), ("k", k, (L, Hkv, hd)), ("v", v, (L, Hkv, hd))):
        if tuple(t.shape) != want or t.dtype != torch.float32 or t.device.type != "cpu" or not t.is_contiguous():
            raise ValueError(
                f"causal_attention: {name} must be contiguous fp32 on CPU of shape {want}, got {t.dtype} "
                f"{tuple(t.shape)} strides {t.stride()} on {t.device}"
            )
    if lib is None or hd % 16 or not 16 <= hd <= 256 or M > L or H % Hkv:
        return None
    kt = torch.empty(Hkv, hd, L, dtype=torch.float32)  # the keys by dimension: 16 keys are one vector
    lib.pl_transpose_k(k.data_ptr(), kt.data_ptr(), L, Hkv, hd)
    out = torch.empty_like(q)
    done = lib.pl_causal_attention(q.data_ptr(), kt.data_ptr(), v.data_ptr(), out.data_ptr(), M, L, H, Hkv, hd)
    return out if done == 0 else None
