"""The compiled prompt attention (kernels/native_attention.py, csrc/prompt_attention.c) against its twin, torch's
SDPA: ragged lengths across the 16-row and 64-key tiles, GQA and MQA, every head size it takes, queries that are
the prompt's tail (M < L); the shapes it refuses; and the premise it rests on, one OpenMP runtime (torch's)."""

from __future__ import annotations

import ctypes
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from kernels import native_attention, reference
from tests.tolerance import PATH, assert_close, assert_far

pytestmark = pytest.mark.skipif(
    native_attention.library() is None, reason="no compiled prompt attention here (AVX-512, OpenMP, a compiler)"
)


def twin(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, causal: bool = True) -> torch.Tensor:
    """SDPA with query row i at position L - M + i (reference.attention's mask is for M == L)."""
    M, L = q.shape[0], k.shape[0]
    if M == L:
        return reference.attention(q[None], k[None], v[None], causal=causal)[0]
    mask = torch.arange(L)[None] <= torch.arange(L - M, L)[:, None]  # (M, L)
    g = q.shape[1] // k.shape[1]
    kk, vv = (t.repeat_interleave(g, 1).transpose(0, 1) for t in (k, v))
    return F.scaled_dot_product_attention(q.transpose(0, 1), kk, vv, attn_mask=mask).transpose(0, 1)


@pytest.mark.parametrize(
    "M,L,H,H_kv,hd",
    [(1, 1, 4, 2, 16), (15, 15, 3, 3, 32), (17, 17, 9, 3, 64), (65, 65, 4, 1, 48), (274, 274, 9, 3, 64)]
    + [(5, 70, 6, 2, 128), (63, 129, 2, 2, 256)],
)
def test_equals_sdpa(M, L, H, H_kv, hd):
    """Within PATH of SDPA. Negative control: the same attention without the causal mask is far."""
    g = torch.Generator().manual_seed(M * L + hd)
    q, k, v = (3 * torch.randn(n, h, hd, generator=g) for n, h in ((M, H), (L, H_kv), (L, H_kv)))
    got = native_attention.causal_attention(q, k, v)
    assert got is not None and torch.isfinite(got).all()
    assert_close(got, twin(q, k, v), PATH, f"M={M} L={L}")
    if M == L > 1:
        assert_far(got, reference.attention(q[None], k[None], v[None], causal=False)[0], PATH, "no causal mask")


def test_refuses_what_it_does_not_take():
    """None (the caller keeps SDPA) for a head size that is not a multiple of 16 up to 256, more queries than
    keys, or heads that do not group."""
    x = torch.randn(4, 4, 8)
    assert native_attention.causal_attention(x, x, x) is None
    assert (
        native_attention.causal_attention(torch.randn(4, 2, 272), torch.randn(4, 2, 272), torch.randn(4, 2, 272))
        is None
    )
    assert (
        native_attention.causal_attention(torch.randn(5, 2, 16), torch.randn(4, 2, 16), torch.randn(4, 2, 16)) is None
    )
    assert (
        native_attention.causal_attention(torch.randn(4, 3, 16), torch.randn(4, 2, 16), torch.randn(4, 2, 16)) is None
    )
    k = torch.randn(4, 2, 16)
    with pytest.raises(ValueError, match="v must be contiguous fp32"):
        native_attention.causal_attention(torch.randn(4, 2, 16), k, torch.randn(2, 4, 16).transpose(0, 1))
    with pytest.raises(ValueError, match="k must be contiguous fp32 on CPU of shape"):
        native_attention.causal_attention(torch.randn(4, 2, 16), torch.randn(4, 2, 32), k)


def test_runs_on_torchs_openmp_runtime():
    """Both compiled libraries' parallel regions run on torch's OpenMP threads: their GOMP_parallel is the one
    libtorch_cpu binds to. Control: every other OpenMP copy mapped here (sentencepiece's wheel bundles one) has
    another, so the check tells runtimes apart."""
    import sentencepiece  # noqa: F401  (maps its own libgomp copy)

    from kernels import native

    assert native.openmp_is_torchs(native_attention.library()) and native.openmp_is_torchs(native.library())
    torch_lib = Path(torch.__file__).parent / "lib"
    maps = Path("/proc/self/maps").read_text().splitlines()
    others = {line.split()[-1] for line in maps if "libgomp" in line and Path(line.split()[-1]).parent != torch_lib}
    assert others  # sentencepiece's copy at least: else this control would check nothing
    for path in others:
        assert native.openmp_runtime(ctypes.CDLL(path)) != native.openmp_runtime(native.library()), path


def test_off_with_the_native_switch(monkeypatch):
    monkeypatch.setenv("PARALLAMA_NATIVE", "0")
    native_attention.library.cache_clear()
    try:
        x = torch.randn(4, 2, 16)
        assert native_attention.library() is None and native_attention.causal_attention(x, x, x) is None
    finally:
        monkeypatch.delenv("PARALLAMA_NATIVE")
        native_attention.library.cache_clear()
    assert native_attention.library() is not None
