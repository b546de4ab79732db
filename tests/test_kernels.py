"""Triton kernels vs their PyTorch twins under Triton's interpreter (CPU, fp32), and the AOT compile check.

Triton decides at *import* time whether @triton.jit means "interpret": TRITON_INTERPRET=1 must be in the
environment before triton is first imported. This module sets it when it can (triton not yet imported
and no CUDA, where the interpreter is the only way to run a kernel anyway); otherwise the interpreter
tests run once more in a fresh subprocess (`test_interpreter_in_subprocess`) and are skipped here.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

if "triton" not in sys.modules and not torch.cuda.is_available():
    os.environ["TRITON_INTERPRET"] = "1"

triton = pytest.importorskip("triton")

from triton.runtime.interpreter import InterpretedFunction  # noqa: E402

from kernels import reference as ref  # noqa: E402
from kernels.gated_up import fused_gated_up  # noqa: E402
from kernels.linear_scale import fused_linear_scale, linear_scale_kernel  # noqa: E402
from kernels.paged_attention import paged_attention_decode, reference_decode  # noqa: E402
from kernels.rms_norm import fused_rms_norm  # noqa: E402
from kernels.rope import fused_rope  # noqa: E402
from kernels.rope_kv import fused_rope_write_kv  # noqa: E402
from tests.tolerance import KERNEL, LOW, Kind, assert_close, assert_far  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
INTERPRETED = isinstance(linear_scale_kernel, InterpretedFunction)
interp = pytest.mark.skipif(not INTERPRETED, reason="triton imported without the interpreter: see the subprocess test")


def close(out: torch.Tensor, want: torch.Tensor, kind: Kind = KERNEL) -> None:
    assert out.dtype == want.dtype, (out.dtype, want.dtype)
    assert_close(out, want, kind)


def gen(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def ragged_rows(M: int, g: torch.Generator, shuffle: bool = False) -> tuple[torch.Tensor, int]:
    """row_to_seq for M rows split into several sequences of different row counts (prefill-like)."""
    counts = {1: [1], 3: [1, 2], 17: [5, 1, 11], 130: [64, 1, 47, 18]}.get(M) or [M]
    r2s = torch.repeat_interleave(torch.arange(len(counts)), torch.tensor(counts))
    if shuffle:
        r2s = r2s[torch.randperm(M, generator=g)]
    return r2s, len(counts)


# ---------------------------------------------------------------- linear_scale / gated_up

GEMM_SHAPES = [(1, 100, 37), (3, 576, 192), (17, 192, 576), (130, 576, 1536)]  # (M, K, N)
SCALE_MODES = ["none", "rows", "rows_shuffled_i32", "per_row", "single"]


def scale_args(mode: str, M: int, N: int, g: torch.Generator):
    """(scale, row_to_seq) for a scale mode; per_row/single use the twin's broadcast path (row_to_seq None)."""
    if mode == "none":
        return None, None
    if mode == "per_row":
        return torch.rand(M, N, generator=g) + 0.5, None
    if mode == "single":
        return torch.rand(1, N, generator=g) + 0.5, None
    r2s, S = ragged_rows(M, g, shuffle=mode.startswith("rows_shuffled"))
    if mode.endswith("i32"):
        r2s = r2s.int()
    return torch.rand(S, N, generator=g) + 0.5, r2s


@interp
@pytest.mark.parametrize("mode", SCALE_MODES)
@pytest.mark.parametrize("M,K,N", GEMM_SHAPES)
def test_linear_scale(M, K, N, mode):
    g = gen(M * 7 + N)
    x = torch.randn(M, K, generator=g)
    w = torch.randn(N, K, generator=g) / K**0.5
    scale, r2s = scale_args(mode, M, N, g)
    close(fused_linear_scale(x, w, scale, r2s), ref.linear_scale(x, w, scale, r2s))


@interp
@pytest.mark.parametrize("S", [1, 3])
def test_linear_scale_3d_broadcast(S):
    """x (B, T, K) with scale (B, N) or (1, N) and no row_to_seq: the scale broadcasts over T."""
    g = gen(S)
    x = torch.randn(3, 5, 100, generator=g)
    w = torch.randn(37, 100, generator=g) / 10
    scale = torch.rand(S, 37, generator=g) + 0.5
    out = fused_linear_scale(x, w, scale)
    assert out.shape == (3, 5, 37)
    close(out, ref.linear_scale(x, w, scale))


@interp
@pytest.mark.parametrize(
    "M,K,N,cfg",
    [(17, 100, 37, (16, 16, 32)), (130, 200, 100, (32, 64, 32)), (3, 37, 1536, (16, 128, 16))],
)
def test_linear_scale_small_tiles(M, K, N, cfg):
    """Many programs and K steps, ragged in every dim (the default interpreter tiles cover most in one)."""
    g = gen(M + K)
    x = torch.randn(M, K, generator=g)
    w = torch.randn(N, K, generator=g) / K**0.5
    scale, r2s = scale_args("rows", M, N, g)
    config = dict(zip(("BLOCK_M", "BLOCK_N", "BLOCK_K"), cfg))
    close(fused_linear_scale(x, w, scale, r2s, config=config), ref.linear_scale(x, w, scale, r2s))


@interp
def test_linear_scale_strided_input():
    """A non-contiguous x (a column slice) is read through its strides."""
    g = gen(5)
    x = torch.randn(17, 300, generator=g)[:, 50:250]
    w = torch.randn(64, 200, generator=g) / 14
    scale, r2s = scale_args("rows", 17, 64, g)
    close(fused_linear_scale(x, w, scale, r2s), ref.linear_scale(x, w, scale, r2s))


@interp
@pytest.mark.parametrize("mode", ["none", "rows", "rows_shuffled_i32", "per_row"])
@pytest.mark.parametrize("M,K,N", GEMM_SHAPES)
def test_gated_up(M, K, N, mode):
    g = gen(M * 11 + K)
    x = torch.randn(M, K, generator=g)
    wg = torch.randn(N, K, generator=g) / K**0.5
    wu = torch.randn(N, K, generator=g) / K**0.5
    scale, r2s = scale_args(mode, M, N, g)
    close(fused_gated_up(x, wg, wu, scale, r2s), ref.gated_up(x, wg, wu, scale, r2s))


@interp
@pytest.mark.parametrize("M,K,N,cfg", [(17, 100, 37, (16, 16, 32)), (130, 200, 100, (64, 32, 64))])
def test_gated_up_small_tiles_3d(M, K, N, cfg):
    g = gen(N)
    x = torch.randn(2, M, K, generator=g)
    wg = torch.randn(N, K, generator=g) / K**0.5
    wu = torch.randn(N, K, generator=g) / K**0.5
    scale = torch.rand(2, N, generator=g) + 0.5
    config = dict(zip(("BLOCK_M", "BLOCK_N", "BLOCK_K"), cfg))
    close(fused_gated_up(x, wg, wu, scale, config=config), ref.gated_up(x, wg, wu, scale))


# ---------------------------------------------------------------- rms_norm


@interp
@pytest.mark.parametrize("residual", [False, True])
@pytest.mark.parametrize("shape", [(1, 37), (3, 576), (17, 100), (130, 576), (2, 3, 4096)])
def test_rms_norm(shape, residual):
    g = gen(sum(shape))
    x = torch.randn(*shape, generator=g) * 3
    w = torch.rand(shape[-1], generator=g) + 0.5
    if not residual:
        close(fused_rms_norm(x, w, 1e-5), ref.rms_norm(x, w, 1e-5))
        return
    r = torch.randn(*shape, generator=g)
    normed, h = fused_rms_norm(x, w, 1e-6, residual=r)
    close(h, x + r)
    close(normed, ref.rms_norm(x + r, w, 1e-6))


# ---------------------------------------------------------------- rope


def table(hd: int, T: int, scaled: bool) -> torch.Tensor:
    if scaled:  # Llama 3.1-style frequencies, at positions where the scaling bites
        inv = ref.rope_frequencies(hd, 500000.0, scaled=True, scale_factor=8.0, original_max_seq_len=64)
    else:
        inv = ref.rope_frequencies(hd, 10000.0)
    return ref.rope_table(inv, T)


@interp
@pytest.mark.parametrize("scaled", [False, True])
@pytest.mark.parametrize(
    "case",
    ["prefill_table", "per_seq_table", "packed_rows", "gqa_k", "odd_half", "strided"],
)
def test_rope(case, scaled):
    g = gen(len(case))
    if case == "prefill_table":  # (B, T, H, hd) with a (T, hd/2, 2) slice at an offset
        x, cs = torch.randn(2, 17, 9, 64, generator=g), table(64, 300, scaled)[200:217]
    elif case == "per_seq_table":  # (B, T, ...) table: each sequence at its own positions
        x = torch.randn(3, 5, 4, 128, generator=g)
        cs = table(128, 400, scaled)[torch.randint(0, 400, (3, 5), generator=g)]
    elif case == "packed_rows":  # decode / packed prefill rows (M, H, hd) with per-row (M, hd/2, 2)
        x = torch.randn(130, 3, 64, generator=g)
        cs = table(64, 2000, scaled)[torch.randint(0, 2000, (130,), generator=g)]
    elif case == "gqa_k":  # a single kv head
        x, cs = torch.randn(1, 33, 1, 64, generator=g), table(64, 33, scaled)
    elif case == "odd_half":  # hd/2 not a power of two: masked lanes
        x, cs = torch.randn(2, 7, 5, 48, generator=g), table(48, 7, scaled)
    else:  # q viewed out of a fused qkv output: row strides ≠ H·hd
        x = torch.randn(2, 6, 12 * 32, generator=g)[..., : 4 * 32].view(2, 6, 4, 32)
        cs = table(32, 6, scaled)
    close(fused_rope(x, cs), ref.rope(x, cs))


@interp
def test_rope_head_blocks():
    """Heads split over several programs (BLOCK_H < H, ragged)."""
    g = gen(0)
    x, cs = torch.randn(2, 5, 9, 64, generator=g), table(64, 5, True)
    close(fused_rope(x, cs, config={"BLOCK_H": 4}), ref.rope(x, cs))


# ---------------------------------------------------------------- rope + KV write


def rope_kv_case(M: int, H: int, H_kv: int, hd: int, g: torch.Generator, dtype=torch.float32, bs: int = 4):
    """Packed rows' fused QKV output, their table rows, a partly filled pool, and distinct random slots."""
    qkv = torch.randn(M, (H + 2 * H_kv) * hd, generator=g).to(dtype)
    cs = table(hd, 500, True)[torch.randint(0, 500, (M,), generator=g)]
    n_blocks = M // bs + 3
    k_cache = torch.randn(n_blocks, bs, H_kv, hd, generator=g).to(dtype)
    v_cache = torch.randn(n_blocks, bs, H_kv, hd, generator=g).to(dtype)
    slots = torch.randperm(n_blocks * bs, generator=g)[:M]
    return qkv, cs, k_cache, v_cache, slots


@interp
@pytest.mark.parametrize("M,H,H_kv,hd", [(1, 9, 3, 64), (3, 4, 4, 32), (17, 6, 2, 48), (130, 8, 1, 64)])
@pytest.mark.parametrize("block_h", [None, 4])
def test_rope_write_kv(M, H, H_kv, hd, block_h):
    """Q returned rotated; K rotated and V copied into their slots; every other slot of the pool untouched."""
    qkv, cs, kc, vc, slots = rope_kv_case(M, H, H_kv, hd, gen(M + H))
    before = kc.clone(), vc.clone()
    k_want, v_want = kc.clone(), vc.clone()
    q_want = ref.rope_write_kv(qkv, cs, k_want, v_want, slots, H, H_kv)
    q = fused_rope_write_kv(qkv, cs, kc, vc, slots, H, H_kv, config=None if block_h is None else {"BLOCK_H": block_h})
    close(q, q_want)
    close(kc, k_want)
    close(vc, v_want)
    # negative control: K written one slot off is caught by the same comparison
    k_off, v_off = before[0].clone(), before[1].clone()
    ref.rope_write_kv(qkv, cs, k_off, v_off, (slots + 1) % (kc.shape[0] * kc.shape[1]), H, H_kv)
    assert_far(kc, k_off, KERNEL)


# ---------------------------------------------------------------- paged attention


def paged_case(S_lens, H, n_kv, hd, page, g, idx_dtype=torch.int32):
    """Random pool with shuffled block tables (plus spare blocks and padded table columns)."""
    S = len(S_lens)
    max_blocks = max(-(-n // page) for n in S_lens) + 1
    N = S * max_blocks + 3
    k = torch.randn(N, page, n_kv, hd, generator=g)
    v = torch.randn(N, page, n_kv, hd, generator=g)
    bt = torch.randperm(N, generator=g)[: S * max_blocks].view(S, max_blocks).to(idx_dtype)
    q = torch.randn(S, H, hd, generator=g)
    return q, k, v, bt, torch.tensor(S_lens, dtype=idx_dtype)


LENS = {16: [1, 15, 16, 17, 33, 100], 32: [31, 32, 33, 64, 65, 7]}


@interp
@pytest.mark.parametrize("page", [16, 32])
@pytest.mark.parametrize("H,n_kv", [(8, 8), (12, 4), (16, 4), (32, 4)])  # g = 1, 3, 4, 8
def test_paged_attention_decode(H, n_kv, page):
    g = gen(H * page + n_kv)
    q, k, v, bt, sl = paged_case(LENS[page], H, n_kv, 64, page, g)
    close(paged_attention_decode(q, k, v, bt, sl), reference_decode(q, k, v, bt.long(), sl))


@interp
@pytest.mark.parametrize("block_n", [16, 64])
def test_paged_attention_decode_tiles_int64_scale(block_n):
    """BLOCK_N below and above the page size, int64 tables, head_dim 128, an explicit scale."""
    g = gen(block_n)
    q, k, v, bt, sl = paged_case([1, 16, 47, 90], 8, 2, 128, 16, g, idx_dtype=torch.int64)
    out = paged_attention_decode(q, k, v, bt, sl, scale=0.05, config={"BLOCK_N": block_n})
    close(out, reference_decode(q, k, v, bt, sl, scale=0.05))


@interp
def test_paged_attention_decode_odd_head_dim():
    g = gen(3)
    q, k, v, bt, sl = paged_case([5, 40], 6, 2, 48, 16, g)
    close(paged_attention_decode(q, k, v, bt, sl), reference_decode(q, k, v, bt.long(), sl))


@interp
def test_paged_attention_decode_matches_engine_twin_call():
    """The twin as the engine calls it at decode (one row per sequence at position seq_len − 1)."""
    g = gen(9)
    q, k, v, bt, sl = paged_case([3, 18, 40], 12, 4, 64, 16, g)
    S = q.shape[0]
    ar = torch.arange(S)
    want = ref.paged_attention(q, k, v, bt, sl.long(), sl.long() - 1, ar, torch.zeros_like(ar), 1)
    close(paged_attention_decode(q, k, v, bt, sl), want)


# ---------------------------------------------------------------- fp16 through the interpreter


@interp
@pytest.mark.parametrize(
    "kernel", ["linear_scale", "gated_up", "rms_norm", "rope", "rope_write_kv", "paged_attention_decode"]
)
def test_fp16_under_interpreter(kernel):
    """The dtype plumbing (loads, fp32 math, the twin's roundings, stores) in fp16, at fp16 tolerance.

    Not bf16: the interpreter multiplies bf16 tl.dot operands as their raw uint16 bits and truncates on
    casts to bf16, so bf16 is checked on GPU only (tests/test_kernels_gpu.py).
    """
    g = gen(16)
    h = torch.float16
    if kernel in ("linear_scale", "gated_up"):
        x = torch.randn(33, 576, generator=g).to(h)
        w = (torch.randn(200, 576, generator=g) / 24).to(h)
        scale, r2s = scale_args("rows_shuffled", 17, 200, g)
        x, scale = x[:17], scale.to(h)
        if kernel == "linear_scale":
            out, want = fused_linear_scale(x, w, scale, r2s), ref.linear_scale(x, w, scale, r2s)
        else:
            out, want = fused_gated_up(x, w, w.flip(0), scale, r2s), ref.gated_up(x, w, w.flip(0), scale, r2s)
    elif kernel == "rms_norm":
        x, r = torch.randn(2, 17, 576, generator=g).to(h)
        w = (torch.rand(576, generator=g) + 0.5).to(h)
        out, h_out = fused_rms_norm(x, w, 1e-5, residual=r)
        close(h_out, x + r, LOW[h])
        want = ref.rms_norm(x + r, w, 1e-5)
    elif kernel == "rope":
        x, cs = torch.randn(2, 17, 9, 64, generator=g).to(h), table(64, 17, True)
        out, want = fused_rope(x, cs), ref.rope(x, cs)
    elif kernel == "rope_write_kv":
        qkv, cs, kc, vc, slots = rope_kv_case(17, 9, 3, 64, g, h)
        k_want, v_want = kc.clone(), vc.clone()
        want = ref.rope_write_kv(qkv, cs, k_want, v_want, slots, 9, 3)
        out = fused_rope_write_kv(qkv, cs, kc, vc, slots, 9, 3)
        close(torch.cat([kc, vc]), torch.cat([k_want, v_want]), LOW[h])
    else:
        q, k, v, bt, sl = paged_case([1, 17, 40], 12, 4, 64, 16, g)
        q, k, v = q.to(h), k.to(h), v.to(h)
        out, want = paged_attention_decode(q, k, v, bt, sl), reference_decode(q, k, v, bt.long(), sl)
    close(out, want, LOW[h])


# ---------------------------------------------------------------- how the interpreter tests run


@pytest.mark.skipif(INTERPRETED, reason="the interpreter tests ran in this process")
def test_interpreter_in_subprocess():
    """triton was imported before TRITON_INTERPRET could be set here (or CUDA is present): rerun this file."""
    env = {**os.environ, "TRITON_INTERPRET": "1", "CUDA_VISIBLE_DEVICES": ""}
    res = subprocess.run(
        [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", __file__, "-k", "not aot"],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=900,
    )
    assert res.returncode == 0, res.stdout[-8000:] + res.stderr[-2000:]


# ---------------------------------------------------------------- AOT compile check


def run_aot(tmp_path: Path, *args: str) -> list[dict]:
    from kernels.aot import ptxas_path

    if not ptxas_path().exists():
        pytest.skip("triton ships no ptxas-blackwell here")
    out = tmp_path / "aot.json"
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}  # compiled kernels, not interpreted
    res = subprocess.run(
        [sys.executable, "-m", "kernels.aot", *args, "--json", str(out)],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert res.returncode == 0, res.stdout[-8000:] + res.stderr[-4000:]
    return json.loads(out.read_text())


def test_aot_one_kernel(tmp_path):
    rows = run_aot(tmp_path, "--arch", "90", "--kernel", "paged_attention_decode", "--dtype", "fp16")
    assert len(rows) == 3
    for r in rows:
        assert r["error"] is None
        assert r["regs"] > 0 and r["spill_stores"] == 0 and r["spill_loads"] == 0
        assert r["shared"] > 0


def test_aot_full_sweep(tmp_path):
    """Every kernel × config × fp16/bf16 × sm_80/sm_90 compiles without spills (about 15 s on 2 cores)."""
    rows = run_aot(tmp_path, "--arch", "80,90")
    kernels = {"linear_scale", "gated_up", "rms_norm", "rope", "rope_write_kv", "paged_attention_decode"}
    assert {r["kernel"] for r in rows} == kernels
    assert {(r["dtype"], r["arch"]) for r in rows} == {(d, a) for d in ("fp16", "bf16") for a in (80, 90)}
    assert all(r["error"] is None and r["regs"] > 0 and r["spill_stores"] == r["spill_loads"] == 0 for r in rows)
