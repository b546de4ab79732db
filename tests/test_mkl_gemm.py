"""The prefill GEMM over weights packed once (kernels/mkl_gemm.py): equal to `F.linear` on ragged shapes and any
row count, remade when the weight changes, taken by the cpu backend only where it applies, and off on request."""

from __future__ import annotations

import io

import pytest
import torch
import torch.nn.functional as F

from kernels import cpu, mkl_gemm
from tests.tolerance import PATH, assert_close, assert_far

pytestmark = pytest.mark.skipif(not mkl_gemm.available(), reason="torch has no MKL here (packed GEMM off)")


@pytest.mark.parametrize("M", [1, 9, 17, 100, 274, 600])
@pytest.mark.parametrize("N,K", [(960, 576), (37, 129), (300, 1536)])
def test_packed_linear_equals_f_linear(M, N, K):
    """One packing serves every row count (MKL is told `PACK_ROWS` rows at packing). Negative control: the
    product with another weight's packing of the same shape is far."""
    g = torch.Generator().manual_seed(M * N + K)
    x, w, other = torch.randn(M, K, generator=g), torch.randn(N, K, generator=g), torch.randn(N, K, generator=g)
    assert_close(mkl_gemm.linear(x, w), F.linear(x, w), PATH, f"M={M}")
    assert_far(mkl_gemm.compute(x, mkl_gemm.pack(other), N), F.linear(x, w), PATH, "another weight's packing")


def test_repacked_when_the_weight_changes():
    """An in-place write (an optimizer step, `load_weights`' copy) and a new storage (`p.data = ...`) each make
    a new packing: never a product with the old weight. An unchanged weight keeps its packing."""
    g = torch.Generator().manual_seed(0)
    x, w = torch.randn(40, 64, generator=g), torch.nn.Parameter(torch.randn(96, 64, generator=g), requires_grad=False)
    first = mkl_gemm.linear(x, w)
    buf = mkl_gemm.packed(w)
    mkl_gemm.linear(x, w)
    assert mkl_gemm.packed(w) is buf  # reused
    w.mul_(-2)
    assert_close(mkl_gemm.linear(x, w), F.linear(x, w), PATH)
    assert_far(mkl_gemm.linear(x, w), first, PATH, "the stale packing")
    w.data = torch.randn(96, 64, generator=g)
    assert_close(mkl_gemm.linear(x, w), F.linear(x, w), PATH)
    # a write torch does not count: stale until invalidated (the documented contract), then fresh
    w.data.mul_(-1)
    assert_far(mkl_gemm.linear(x, w), F.linear(x, w), PATH, "uncounted write, not invalidated")
    mkl_gemm.invalidate(torch.nn.ParameterList([w]))
    assert not mkl_gemm.is_packed(w)
    assert_close(mkl_gemm.linear(x, w), F.linear(x, w), PATH)
    saved = io.BytesIO()
    torch.save(w, saved)  # the packing (megabytes) does not ride along with the weight
    assert mkl_gemm.is_packed(w) and saved.tell() < w.numel() * 4 + 4096


def test_bad_operands_are_refused():
    with pytest.raises(ValueError, match="contiguous 2-D fp32"):
        mkl_gemm.pack(torch.randn(64, 32).t())
    with pytest.raises(ValueError, match="linear: x"):
        mkl_gemm.linear(torch.randn(20, 33), torch.randn(8, 32))


def test_cpu_backend_takes_it_for_a_prefill_only(monkeypatch):
    """More than GEMV_ROWS rows on a big contiguous weight: the packed GEMM. A few rows, a weight needing
    gradients, a small weight (LoRA's), a strided or inference weight: not."""
    real, calls = mkl_gemm.linear, []
    monkeypatch.setattr(mkl_gemm, "linear", lambda x, w: calls.append(x.shape[0]) or real(x, w))
    g = torch.Generator().manual_seed(1)
    w = torch.randn(512, 128, generator=g)  # numel 65536: just big enough
    x = torch.randn(3, 20, 128, generator=g)  # (B, T, K): 60 rows
    assert_close(cpu.blas_linear(x, w), F.linear(x, w), PATH)
    assert calls == [60]
    cpu.blas_linear(x[0, : cpu.GEMV_ROWS], w)
    cpu.blas_linear(x, w.t().contiguous().t())  # column-major
    cpu.blas_linear(x, torch.randn(8, 128, generator=g))
    cpu.blas_linear(x, w.clone().requires_grad_())
    with torch.inference_mode():
        frozen = w.clone()
    cpu.blas_linear(x, frozen)
    assert calls == [60]
    with torch.no_grad():
        cpu.blas_linear(x, w.clone().requires_grad_())  # no autograd graph: the weight's flag does not matter
    assert calls == [60, 60]


def test_switched_off(monkeypatch):
    """PARALLAMA_PACKED_GEMM=0: not available, and the cpu backend's GEMMs are F.linear's."""
    monkeypatch.setenv("PARALLAMA_PACKED_GEMM", "0")
    mkl_gemm._mkl.cache_clear()
    try:
        assert not mkl_gemm.available()
        with pytest.raises(RuntimeError, match="PARALLAMA_PACKED_GEMM"):
            mkl_gemm.pack(torch.randn(4, 4))
        x, w = torch.randn(30, 256), torch.randn(300, 256)
        assert torch.equal(cpu.blas_linear(x, w), F.linear(x, w)) and not mkl_gemm.is_packed(w)
    finally:
        monkeypatch.delenv("PARALLAMA_PACKED_GEMM")
        mkl_gemm._mkl.cache_clear()
    assert mkl_gemm.available()


def test_packings_stop_at_the_budget(monkeypatch):
    """Past PARALLAMA_PACKED_GEMM_MIB of packed weights a weight keeps F.linear (same products, no packing); a
    packing's bytes are given back when its weight goes. A budget that is not a number is a one-line error."""
    import gc

    g = torch.Generator().manual_seed(2)
    x = torch.randn(20, 256, generator=g)
    first, second = torch.randn(512, 256, generator=g), torch.randn(512, 256, generator=g)  # 0.5 MiB each
    before = mkl_gemm._packed_bytes
    monkeypatch.setenv("PARALLAMA_PACKED_GEMM_MIB", str(before / 2**20 + 0.75))
    assert_close(mkl_gemm.linear(x, first), F.linear(x, first), PATH)
    assert mkl_gemm.is_packed(first) and mkl_gemm._packed_bytes == before + first.numel() * 4
    assert_close(mkl_gemm.linear(x, second), F.linear(x, second), PATH)
    assert not mkl_gemm.is_packed(second) and mkl_gemm._packed_bytes == before + first.numel() * 4
    del first
    gc.collect()
    assert mkl_gemm._packed_bytes == before
    mkl_gemm.linear(x, second)
    assert mkl_gemm.is_packed(second)
    monkeypatch.setenv("PARALLAMA_PACKED_GEMM_MIB", "lots")
    with pytest.raises(ValueError, match="PARALLAMA_PACKED_GEMM_MIB"):
        mkl_gemm.linear(x, torch.randn(512, 256))
    monkeypatch.delenv("PARALLAMA_PACKED_GEMM_MIB")
    assert mkl_gemm.budget_bytes() == mkl_gemm._mem_total() // 4 > 0
