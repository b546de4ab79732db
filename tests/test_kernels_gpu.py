"""Triton kernels vs their PyTorch twins on CUDA at LLaMA-7B sizes, fp16/bf16 (and fp32 exactness).

Run on a GPU machine with `python -m pytest -q -m gpu tests/test_kernels_gpu.py` (tests/conftest.py skips
them without CUDA). The twin runs in fp32 on the same (rounded) inputs and is rounded to the test dtype,
so the tolerance measures the kernel alone: tests/tolerance.py's LOW[dtype] for fp16 / bf16 and KERNEL
for fp32, relative to the reference's magnitude. Every autotune config is checked, not only the one the tuner picks.
"""

from __future__ import annotations

import math

import pytest
import torch

triton = pytest.importorskip("triton")

from triton.runtime.interpreter import InterpretedFunction  # noqa: E402

from kernels import gated_up, linear_scale, paged_attention, rope, rope_kv  # noqa: E402
from kernels import reference as ref  # noqa: E402
from kernels.rms_norm import fused_rms_norm  # noqa: E402
from tests.tolerance import KERNEL, LOW, assert_close  # noqa: E402

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(
        torch.cuda.is_available() and isinstance(linear_scale.linear_scale_kernel, InterpretedFunction),
        reason="TRITON_INTERPRET is set: these tests need the compiled kernels",
    ),
]

DTYPES = [torch.float16, torch.bfloat16, torch.float32]
DIM, FFN, N_HEADS, HD = 4096, 11008, 32, 128  # LLaMA-2-7B


@pytest.fixture(autouse=True)
def no_tf32():
    old = torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = False
    yield
    torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = old


def close(out: torch.Tensor, want32: torch.Tensor, dtype: torch.dtype) -> None:
    """out (dtype) vs the fp32 twin rounded to dtype."""
    want = want32.to(dtype)
    assert out.dtype == dtype
    assert_close(out.float(), want.float(), LOW.get(dtype, KERNEL))


def rand(*shape, dtype, scale=1.0, g):
    return (torch.randn(*shape, generator=g, device="cuda") * scale).to(dtype)


def gen(seed: int) -> torch.Generator:
    return torch.Generator(device="cuda").manual_seed(seed)


def rows_of(M: int) -> tuple[torch.Tensor, int]:
    """Sequences of different row counts: decode (M rows, M sequences) up to M=32, else ragged prefill."""
    if M <= 32:
        return torch.randperm(M, device="cuda"), M
    counts = torch.tensor([M // 2, 1, M - M // 2 - 1 - M // 8, M // 8], device="cuda")
    return torch.repeat_interleave(torch.arange(4, device="cuda"), counts), 4


@pytest.mark.parametrize("config", [None, *range(len(linear_scale.CONFIGS))])
@pytest.mark.parametrize("M", [1, 32, 130, 512])
@pytest.mark.parametrize("dtype", DTYPES)
def test_linear_scale(dtype, M, config):
    g = gen(M)
    N = 3 * DIM  # the fused wq|wk|wv projection
    x = rand(M, DIM, dtype=dtype, g=g)
    w = rand(N, DIM, dtype=dtype, scale=DIM**-0.5, g=g)
    r2s, S = rows_of(M)
    scale = (torch.rand(S, N, generator=g, device="cuda") + 0.5).to(dtype)
    cfg = None if config is None else linear_scale.CONFIGS[config]
    out = linear_scale.fused_linear_scale(x, w, scale, r2s, config=cfg)
    close(out, ref.linear_scale(x.float(), w.float(), scale.float(), r2s), dtype)
    close(linear_scale.fused_linear_scale(x, w, config=cfg), ref.linear_scale(x.float(), w.float()), dtype)


@pytest.mark.parametrize("config", [None, *range(len(gated_up.CONFIGS))])
@pytest.mark.parametrize("M", [1, 32, 130])
@pytest.mark.parametrize("dtype", DTYPES)
def test_gated_up(dtype, M, config):
    g = gen(M + 1)
    x = rand(M, DIM, dtype=dtype, g=g)
    wg = rand(FFN, DIM, dtype=dtype, scale=DIM**-0.5, g=g)
    wu = rand(FFN, DIM, dtype=dtype, scale=DIM**-0.5, g=g)
    r2s, S = rows_of(M)
    scale = (torch.rand(S, FFN, generator=g, device="cuda") + 0.5).to(dtype)
    cfg = None if config is None else gated_up.CONFIGS[config]
    out = gated_up.fused_gated_up(x, wg, wu, scale, r2s, config=cfg)
    close(out, ref.gated_up(x.float(), wg.float(), wu.float(), scale.float(), r2s), dtype)


@pytest.mark.parametrize("residual", [False, True])
@pytest.mark.parametrize("M", [1, 32, 130, 2048])
@pytest.mark.parametrize("dtype", DTYPES)
def test_rms_norm(dtype, M, residual):
    g = gen(M + 2)
    x = rand(M, DIM, dtype=dtype, scale=3.0, g=g)
    w = (torch.rand(DIM, generator=g, device="cuda") + 0.5).to(dtype)
    if not residual:
        close(fused_rms_norm(x, w, 1e-5), ref.rms_norm(x.float(), w.float(), 1e-5), dtype)
        return
    r = rand(M, DIM, dtype=dtype, g=g)
    normed, h = fused_rms_norm(x, w, 1e-5, residual=r)
    assert torch.equal(h, x + r)  # one rounding of an fp32 sum, like torch
    close(normed, ref.rms_norm(h.float(), w.float(), 1e-5), dtype)


@pytest.mark.parametrize("config", [None, *range(len(rope.CONFIGS))])
@pytest.mark.parametrize("dtype", DTYPES)
def test_rope(dtype, config):
    g = gen(3)
    inv = ref.rope_frequencies(HD, 500000.0, scaled=True)  # Llama 3.1 scaling
    cs = ref.rope_table(inv, 8192).cuda()
    cfg = None if config is None else rope.CONFIGS[config]
    x = rand(4, 512, N_HEADS, HD, dtype=dtype, g=g)  # prefill: positions 1000..1511
    close(rope.fused_rope(x, cs[1000:1512], config=cfg), ref.rope(x.float(), cs[1000:1512]), dtype)
    xk = rand(32, 8, HD, dtype=dtype, g=g)  # decode rows of 32 sequences, 8 kv heads, per-row positions
    pos = torch.randint(0, 8192, (32,), generator=g, device="cuda")
    close(rope.fused_rope(xk, cs[pos], config=cfg), ref.rope(xk.float(), cs[pos]), dtype)


@pytest.mark.parametrize("config", [None, *range(len(rope_kv.CONFIGS))])
@pytest.mark.parametrize("n_kv", [32, 8])
@pytest.mark.parametrize("dtype", DTYPES)
def test_rope_write_kv(dtype, n_kv, config):
    """Decode rows of 32 sequences and a 130-row prefill: Q, and the K/V pool (written slots and untouched ones)."""
    g = gen(5)
    cs = ref.rope_table(ref.rope_frequencies(HD, 500000.0, scaled=True), 8192).cuda()
    cfg = None if config is None else rope_kv.CONFIGS[config]
    for M in (32, 130):
        qkv = rand(M, (N_HEADS + 2 * n_kv) * HD, dtype=dtype, g=g)
        pos = torch.randint(0, 8192, (M,), generator=g, device="cuda")
        kc, vc = rand(2, 64, 16, n_kv, HD, dtype=dtype, g=g)
        slots = torch.randperm(64 * 16, generator=g, device="cuda")[:M]
        k32, v32 = kc.float(), vc.float()
        q32 = ref.rope_write_kv(qkv.float(), cs[pos], k32, v32, slots, N_HEADS, n_kv)
        q = rope_kv.fused_rope_write_kv(qkv, cs[pos], kc, vc, slots, N_HEADS, n_kv, config=cfg)
        close(q, q32, dtype)
        close(kc, k32, dtype)
        close(vc, v32, dtype)


@pytest.mark.parametrize("config", [None, *range(len(paged_attention.CONFIGS))])
@pytest.mark.parametrize("page", [16, 32])
@pytest.mark.parametrize("n_kv", [32, 8, 4])  # g = 1 (LLaMA-2-7B), 4, 8
@pytest.mark.parametrize("dtype", DTYPES)
def test_paged_attention_decode(dtype, n_kv, page, config):
    g = gen(n_kv * page)
    S = 32
    lens = torch.randint(1, 2048, (S,), generator=g, device="cuda")
    lens[:6] = torch.tensor([1, page - 1, page, page + 1, 2 * page + 1, 2048], device="cuda")
    max_blocks = math.ceil(2048 / page) + 1
    N = S * max_blocks + 5
    k = rand(N, page, n_kv, HD, dtype=dtype, g=g)
    v = rand(N, page, n_kv, HD, dtype=dtype, g=g)
    bt = torch.randperm(N, generator=g, device="cuda")[: S * max_blocks].view(S, max_blocks).int()
    q = rand(S, N_HEADS, HD, dtype=dtype, g=g)
    cfg = None if config is None else paged_attention.CONFIGS[config]
    out = paged_attention.paged_attention_decode(q, k, v, bt, lens.int(), config=cfg)
    want = paged_attention.reference_decode(q.float(), k.float(), v.float(), bt.long(), lens)
    close(out, want, dtype)
