"""The cpu backend's compiled decode layer (kernels/native.py) equals its twin, the per-op path, and is used
exactly where it applies."""

from __future__ import annotations

import os
import time
from collections.abc import Iterator
from contextlib import contextmanager

import pytest
import torch

from infer.cache import BlockTable, PagedKVCache
from kernels import native
from model import Llama, ModelArgs
from model.peft import IA3Config, LoRAConfig, PARAConfig, create_adapter
from model.step import AdapterStep, scale_columns
from tests.helpers import random_meta_state_dict
from tests.tolerance import MODEL_PATH, PATH, assert_close, assert_far

pytestmark = pytest.mark.skipif(not native.available(), reason="the compiled decode layer did not build here")
ARGS = ModelArgs(dim=96, n_layers=2, n_heads=6, n_kv_heads=2, vocab_size=83, hidden_dim=160, max_seq_len=96)


@contextmanager
def per_op(model: Llama) -> Iterator[None]:
    """The model's ops without the compiled layer for the duration, so it runs them one by one."""
    ops = model.ops
    kept = ops.decode_layer
    ops.decode_layer = None
    try:
        yield
    finally:
        ops.decode_layer = kept


@pytest.fixture
def calls(monkeypatch):
    """How many layers the compiled code ran (one call each, or a whole step's in one DecodeStack call)."""
    seen = []
    real = native.decode_layer
    monkeypatch.setattr(native, "decode_layer", lambda *a, **k: seen.append(1) or real(*a, **k))
    stack = native.DecodeStack.__call__  # a whole step's layers in one call: one entry per layer
    monkeypatch.setattr(
        native.DecodeStack, "__call__", lambda self, *a, **k: seen.extend([1] * self.n) or stack(self, *a, **k)
    )
    return seen


def _model(args: ModelArgs = ARGS) -> Llama:
    sd = random_meta_state_dict(args.dim, args.n_layers, args.n_heads, args.n_kv_heads, 83, args.hidden_dim, seed=0)
    with torch.device("meta"):
        m = Llama(args, backend="cpu")
    m.load_weights(sd)
    m.setup_rope("cpu")
    return m.eval()


def _adapter_pools(model: Llama) -> dict[str, torch.Tensor]:
    """Pools with slot 1 a trained-looking PARA row's vectors, slot 2 a perturbed (IA)³'s, slot 0 the identity."""
    torch.manual_seed(3)
    para, ia3 = create_adapter(model, PARAConfig()), create_adapter(model, IA3Config())
    with torch.no_grad():
        for p in [*para.parameters(), *ia3.parameters()]:
            p.add_(0.3 * torch.randn_like(p))
    pools = {p: AdapterStep.make_pool(model.args, p, 3) for p in ("qkv", "u")}
    where = scale_columns(model.args)
    pooled = torch.randn(1, model.args.dim)
    for i in range(model.args.n_layers):
        for slot, scales in ((1, para.scales(i, pooled)), (2, ia3.scales(i, None))):
            for t, v in scales.items():
                pools[where[t][0]][i, slot, where[t][1]] = v[0]
    return pools


def _loras(model: Llama) -> list:
    """Two trained-looking LoRAs: r=4 on q/v (peft's default targets) and r=2 on every other projection."""
    torch.manual_seed(4)
    out = []
    for cfg in (
        LoRAConfig(r=4, lora_alpha=8),
        LoRAConfig(r=2, target_modules=("k_proj", "o_proj", "gate_proj", "up_proj", "down_proj")),
    ):
        a = create_adapter(model, cfg).eval()
        with torch.no_grad():
            for p in a.parameters():
                p.add_(0.2 * torch.randn_like(p))
        out.append(a)
    return out


def _decode(
    model: Llama,
    lens: list[int],
    slots: list[int] | None,
    steps: int = 4,
    lora: list | None = None,
    blocks: int = 40,
) -> list[torch.Tensor]:
    """Prefill sequences of `lens` tokens (per-op: a prefill is never native), then `steps` decode steps.
    lora: [(adapter, its rows)] for the decode steps."""
    g = torch.Generator().manual_seed(sum(lens))
    seqs = [torch.randint(0, 83, (n + steps,), generator=g) for n in lens]
    cache = PagedKVCache(model.args, num_blocks=blocks, block_size=4)
    tables = [BlockTable() for _ in seqs]
    pools = _adapter_pools(model) if slots else None
    step = cache.prepare_step(tables, lens)
    if pools:
        step.adapters = AdapterStep(pools, torch.tensor([s for s, n in zip(slots, lens) for _ in range(n)]))
    out = [model.forward_step(torch.cat([s[:n] for s, n in zip(seqs, lens)]), step, cache.k, cache.v)]
    for t in range(steps):
        step = cache.prepare_step(tables, [1] * len(seqs))
        if pools or lora:
            step.adapters = AdapterStep(pools or {}, torch.tensor(slots or [0]))
            step.adapters.lora = [(a, None if rows is None else torch.tensor(rows)) for a, rows in lora or ()]
        out.append(model.forward_step(torch.stack([s[n + t] for s, n in zip(seqs, lens)]), step, cache.k, cache.v))
    return out


@torch.inference_mode()
@pytest.mark.parametrize(
    ("lens", "slots"),
    [([9], None), ([9], [1]), ([7, 18, 5], [1, 0, 2]), ([3, 5, 2, 8, 4, 6, 1, 9], [1, 2, 0, 1, 2, 0, 1, 2])],
    ids=["1-row", "1-row-para", "3-rows-mixed", "8-rows-mixed"],
)
def test_native_decode_equals_the_per_op_path(lens, slots, calls):
    """Decode logits through the compiled layer equal the per-op path's (its twin) for 1-8 rows with PARA,
    (IA)³ and base rows (contexts crossing block boundaries); the compiled layer really ran every layer of every
    decode step; a scale given to the wrong rows is caught."""
    model = _model()
    with per_op(model):
        want = _decode(model, lens, slots)
    assert not calls
    got = _decode(model, lens, slots)
    assert len(calls) == 4 * ARGS.n_layers  # decode steps only; the prefill stays per-op
    for g, w in zip(got, want):
        assert_close(g, w, MODEL_PATH)
    if slots and len(set(slots)) > 1:  # negative control: the rows' adapters swapped
        swapped = _decode(model, lens, slots[1:] + slots[:1])
        assert_far(swapped[-1], want[-1], MODEL_PATH)


@torch.inference_mode()
@pytest.mark.parametrize("lens", [[9], [7, 18, 5]], ids=["1-row", "3-rows"])
def test_head_dim_64_unrolled_attention_equals_the_per_op_path(lens, calls):
    """head_dim 64 takes the C code's unrolled attention (a constant head size): equal to the per-op path, with
    GQA (2 query heads per KV head) and contexts crossing block boundaries; head_dim above 256 stays per-op."""
    args = ModelArgs(dim=256, n_layers=2, n_heads=4, n_kv_heads=2, vocab_size=83, hidden_dim=160, max_seq_len=96)
    model = _model(args)
    with per_op(model):
        want = _decode(model, lens, [1] * len(lens))
    got = _decode(model, lens, [1] * len(lens))
    assert len(calls) == 4 * args.n_layers
    for g, w in zip(got, want):
        assert_close(g, w, MODEL_PATH)
    calls.clear()
    wide = ModelArgs(dim=288, n_layers=1, n_heads=1, n_kv_heads=1, vocab_size=83, hidden_dim=64, max_seq_len=96)
    _decode(_model(wide), [5], None, steps=1)
    assert not calls  # head_dim 288 > MAX_HEAD_DIM: the per-op path


@torch.inference_mode()
@pytest.mark.parametrize("lens", [[9], [7, 18, 5, 11]], ids=["1-row", "4-rows"])
def test_native_decode_with_lora_rows_equals_the_per_op_path(lens, calls):
    """Unmerged LoRA updates on every projection (q/v on some rows, k/o/gate/up/down on others, a LoRA that owns
    every row) inside the compiled layer equal the per-op path; dropping them is caught."""
    model = _model()
    a, b = _loras(model)
    n = len(lens)
    lora = [(a, None)] if n == 1 else [(a, [0, 2]), (b, [1, 3])]
    slots = None if n == 1 else [0, 1, 0, 2]  # PARA / (IA)³ scales on the rows without LoRA
    with per_op(model):
        want = _decode(model, lens, slots, lora=lora)
    assert not calls
    got = _decode(model, lens, slots, lora=lora)
    assert len(calls) == 4 * ARGS.n_layers
    for g, w in zip(got, want):
        assert_close(g, w, MODEL_PATH)
    assert_far(_decode(model, lens, slots)[-1], want[-1], MODEL_PATH)  # negative control: the LoRAs left out


@torch.inference_mode()
def test_what_stays_on_the_per_op_path(calls):
    """More than 8 rows, a prefill, a LoRA in training mode (dropout) never take the compiled layer."""
    model = _model()
    cache = PagedKVCache(model.args, num_blocks=40, block_size=4)
    tables = [BlockTable() for _ in range(9)]
    model.forward_step(torch.arange(9 * 3) % 83, cache.prepare_step(tables, [3] * 9), cache.k, cache.v)
    model.forward_step(torch.arange(9), cache.prepare_step(tables, [1] * 9), cache.k, cache.v)  # 9 rows
    lora = create_adapter(model, LoRAConfig(r=2, lora_dropout=0.1)).train()
    step = cache.prepare_step(tables[:2], [1, 1])
    step.adapters = AdapterStep({}, torch.tensor([0]), lora=[(lora, torch.tensor([1]))])
    model.forward_step(torch.arange(2), step, cache.k, cache.v)
    assert not calls
    lora.eval()  # no dropout: the same step takes it
    step = cache.prepare_step(tables[:2], [1, 1])
    step.adapters = AdapterStep({}, torch.tensor([0]), lora=[(lora, torch.tensor([1]))])
    model.forward_step(torch.arange(2), step, cache.k, cache.v)
    assert len(calls) == ARGS.n_layers


def test_disabled_or_unbuildable_falls_back(monkeypatch, tmp_path):
    """PARALLAMA_NATIVE=0, or no C compiler, leaves the per-op path (with one warning for the compiler)."""
    from kernels.ops import CpuOps, get_ops

    assert get_ops("cpu").decode_layer is not None  # built here (this module is skipped otherwise)
    monkeypatch.setattr(native, "_tried", False)
    monkeypatch.setattr(native, "_lib", None)
    monkeypatch.setenv("PARALLAMA_NATIVE", "0")
    assert not native.available() and CpuOps().decode_layer is None and CpuOps().decode_linear is None
    monkeypatch.setattr(native, "_tried", False)
    monkeypatch.setenv("PARALLAMA_NATIVE", "1")
    monkeypatch.setenv("CC", "/nonexistent/cc")
    monkeypatch.setenv("PARALLAMA_CACHE", str(tmp_path))  # no prebuilt library either
    with pytest.warns(UserWarning, match="compiled decode layer is unavailable"):
        assert CpuOps().decode_layer is None


@torch.inference_mode()
def test_a_strided_weight_is_refused_not_misread():
    """The C code reads raw rows: a weight that is a strided view gets a one-line error naming it."""
    model = _model()
    layer = model.layers[0]
    wo = layer.attention.wo.weight
    strided = torch.empty(wo.shape[1], wo.shape[0]).t()  # same shape, column-major
    strided.copy_(wo)
    cache = PagedKVCache(model.args, num_blocks=8, block_size=4)
    tables = [BlockTable()]
    model.forward_step(torch.arange(3), cache.prepare_step(tables, [3]), cache.k, cache.v)
    step = cache.prepare_step(tables, [1])
    x = model.tok_embeddings(torch.tensor([5]))
    cos_sin = model.rope_cos_sin[step.positions]
    a, f = layer.attention, layer.feed_forward
    weights = (layer.attention_norm.weight, a.wqkv, strided, layer.ffn_norm.weight, f.w13, f.w2.weight)
    args = (1e-5, (a.n_heads, a.n_kv_heads, a.head_dim), cos_sin, cache.k[0], cache.v[0])
    args += (step.slots, step.block_tables, step.seq_lens)
    with pytest.raises(ValueError, match="decode_layer: wo must be contiguous"):
        native.decode_layer(x, None, weights, *args)
    out, _ = native.decode_layer(x, None, (*weights[:2], wo, *weights[3:]), *args)
    assert out.isfinite().all()


@pytest.fixture
def gemv_mode():
    """Leaves the library's GEMV choice and thread count as the test found them."""
    blas = native.use_blas(False)
    native.use_blas(blas)
    threads = torch.get_num_threads()
    yield
    native.use_blas(blas)
    native.set_threads(threads)


@torch.inference_mode()
@pytest.mark.parametrize("blas", [False, True], ids=["pool", "blas"])
def test_gemv_equals_matmul_on_ragged_shapes(blas, gemv_mode):
    """native.linear (the GEMV every projection goes through) equals x @ wᵀ for 1-8 rows on shapes that leave
    tails everywhere: K not a multiple of the 32-float step, N not a multiple of a thread's 8-row share, GEMVs
    too small to share and large ones split over 1, 2 and 3 threads; a weight with two rows swapped fails."""
    if blas and not native.use_blas(True):
        pytest.skip("numpy's BLAS has no cblas_sgemv here")
    g = torch.Generator().manual_seed(0)
    for threads in (1, 2, 3):
        assert native.set_threads(threads) == threads
        for n, k in ((1, 7), (5, 33), (37, 64), (1029, 65), (2050, 576), (96, 1000)):
            w = torch.randn(n, k, generator=g)
            for rows in (1, 3, 8):
                x = torch.randn(rows, k, generator=g)
                assert_close(native.linear(x, w), x @ w.T, PATH, f"{threads} threads, ({n}, {k}), {rows} rows")
    swapped = w[[1, 0, *range(2, w.shape[0])]]
    assert_far(native.linear(x, swapped), x @ w.T, PATH)


@pytest.mark.skipif(not hasattr(os, "fork"), reason="no fork here")
def test_gemv_pool_in_a_forked_child(gemv_mode):
    """The pool's workers do not survive fork: a child (e.g. a DataLoader worker) computes GEMVs alone instead
    of waiting for them forever."""
    native.use_blas(False)
    native.set_threads(2)
    w, x = torch.randn(2050, 576), torch.randn(2, 576)
    want = x @ w.T
    native.linear(x, w)  # the workers are up
    pid = os.fork()
    if pid == 0:  # the child: exit 0 only when the GEMV finished and is right
        ok = float((native.linear(x, w) - want).abs().max() / want.abs().max()) <= PATH.bound
        os._exit(0 if ok else 1)
    deadline = time.monotonic() + 60
    while (done := os.waitpid(pid, os.WNOHANG))[0] == 0 and time.monotonic() < deadline:
        time.sleep(0.05)
    if done[0] == 0:
        os.kill(pid, 9)
        os.waitpid(pid, 0)
        pytest.fail("the forked child's GEMV hung")
    assert os.waitstatus_to_exitcode(done[1]) == 0


@torch.inference_mode()
def test_decode_stack_follows_a_new_kv_pool(calls):
    """The struct array of every layer is built once per model and KV pool: a second pool of another size (an
    engine resized, or a new one on the same model) gets a new stack, and both decode as the per-op path."""
    model = _model()
    with per_op(model):
        want = _decode(model, [7, 18, 5], [1, 0, 2])
    got = _decode(model, [7, 18, 5], [1, 0, 2])
    first = model._stack
    for g, w in zip(got, want):
        assert_close(g, w, MODEL_PATH)
    cache = PagedKVCache(model.args, num_blocks=64, block_size=4)  # another pool, another layout
    assert not first.matches(model.layers[0].attention.wqkv, model.layers[-1].feed_forward.w2.weight, cache.k, cache.v)
    again = _decode(model, [7, 18, 5], [1, 0, 2], blocks=64)
    assert model._stack is not first
    for g, w in zip(again, want):
        assert_close(g, w, MODEL_PATH)


@pytest.mark.parametrize("rows", [1, 7, 274])
def test_add_rms_norm_equals_the_twin(rows):
    """One C pass per row: h is x + residual exactly, the norm equals the twin's; without a residual, the norm
    of x. Negative control: the norm of x alone is far from that of x + residual."""
    from kernels import reference

    g = torch.Generator().manual_seed(rows)
    x, r, w = torch.randn(rows, 576, generator=g), torch.randn(rows, 576, generator=g), torch.randn(576, generator=g)
    y, h = native.add_rms_norm(x, r, w, 1e-5)
    want_y, want_h = reference.add_rms_norm(x, r, w, 1e-5)
    assert torch.equal(h, want_h)
    assert_close(y, want_y, PATH)
    assert_far(y, reference.rms_norm(x, w, 1e-5), PATH)
    alone, same = native.add_rms_norm(x, None, w, 1e-5)
    assert same is x
    assert_close(alone, reference.rms_norm(x, w, 1e-5), PATH)


def test_cpu_backend_takes_the_c_norm(monkeypatch):
    """The cpu backend's add_rms_norm is one C pass for contiguous fp32 rows; strided views are added by torch
    first (the norm of that contiguous sum is the C pass again); grad-tracking inputs stay on torch."""
    from kernels import cpu

    real, calls = native.add_rms_norm, []
    monkeypatch.setattr(native, "add_rms_norm", lambda *a: calls.append(a[1] is not None) or real(*a))
    x, r, w = torch.randn(4, 64), torch.randn(4, 64), torch.randn(32)
    cpu.add_rms_norm(x[:, :32].contiguous(), r[:, :32].contiguous(), w, 1e-5)
    cpu.add_rms_norm(x[:, ::2], r[:, ::2], w, 1e-5)
    cpu.rms_norm(x[:, :32].contiguous(), w, 1e-5)
    cpu.add_rms_norm(x[:, ::2].contiguous().requires_grad_(), r[:, ::2].contiguous(), w, 1e-5)
    assert calls == [True, False, False]


@pytest.mark.parametrize("M,H,H_kv,hd", [(1, 9, 3, 64), (17, 6, 2, 48), (274, 9, 3, 64)])
def test_rope_write_kv_equals_the_twin(M, H, H_kv, hd):
    """Q returned rotated, K rotated and V copied into their slots, every other slot and qkv itself untouched;
    the cpu backend takes this path. Negative control: K one slot off is caught by the same comparison."""
    from kernels import cpu, reference

    g = torch.Generator().manual_seed(M)
    qkv = torch.randn(M, (H + 2 * H_kv) * hd, generator=g)
    inv = reference.rope_frequencies(hd, 10000.0)
    cs = reference.rope_table(inv, 600)[torch.randint(0, 600, (M,), generator=g)]
    n_blocks, bs = M // 16 + 3, 16
    kc, vc = torch.randn(n_blocks, bs, H_kv, hd, generator=g), torch.randn(n_blocks, bs, H_kv, hd, generator=g)
    slots = torch.randperm(n_blocks * bs, generator=g)[:M]
    k_want, v_want, qkv_before = kc.clone(), vc.clone(), qkv.clone()
    q_want = reference.rope_write_kv(qkv, cs, k_want, v_want, slots, H, H_kv)
    k_before, v_before = kc.clone(), vc.clone()
    q = cpu.rope_write_kv(qkv, cs, kc, vc, slots, H, H_kv)
    assert torch.equal(qkv, qkv_before) and q.shape == (M, H, hd)
    assert_close(q, q_want, PATH)
    assert_close(kc, k_want, PATH)
    assert torch.equal(vc, v_want)
    k_off, v_off = k_before.clone(), v_before.clone()
    reference.rope_write_kv(qkv, cs, k_off, v_off, (slots + 1) % (n_blocks * bs), H, H_kv)
    assert_far(kc, k_off, PATH)


def test_cpu_backend_takes_the_c_rope(monkeypatch):
    """Contiguous fp32 with int64 slots: the C pass; a strided qkv: the torch form (same result)."""
    from kernels import cpu, reference

    real, calls = native.rope_write_kv, []
    monkeypatch.setattr(native, "rope_write_kv", lambda *a: calls.append(1) or real(*a))
    qkv = torch.randn(5, 2 * (4 + 2 * 2) * 8)[:, ::2]  # (5, 64) strided: 4 Q, 2 K, 2 V heads of 8
    cs = reference.rope_table(reference.rope_frequencies(8, 10000.0), 5)
    kc, vc = torch.zeros(2, 4, 2, 8), torch.zeros(2, 4, 2, 8)
    slots = torch.arange(5)
    strided = cpu.rope_write_kv(qkv, cs, kc, vc, slots, 4, 2)
    assert calls == []
    dense = cpu.rope_write_kv(qkv.contiguous(), cs, kc, vc, slots, 4, 2)
    assert calls == [1]
    assert_close(dense, strided, PATH)


@pytest.mark.parametrize("M,N", [(9, 37), (274, 1536)])
def test_silu_mul_equals_torch(M, N):
    """The SwiGLU epilogue's own e^x: within PATH of torch's silu(gate) · up, finite at the clamp's edges; the
    cpu backend's gated_up takes it for a prefill's rows (PARA's up scale applied first). Negative control:
    gate and up swapped is far."""
    import torch.nn.functional as F

    from kernels import cpu, reference

    g = torch.Generator().manual_seed(N)
    g13 = 6 * torch.randn(M, 2 * N, generator=g)
    g13[0, :6] = torch.tensor([-100.0, -87.5, 0.0, 1e-8, 87.5, 100.0])
    out = native.silu_mul(g13)
    if out is None:
        pytest.skip("the library has no AVX-512 form of silu_mul here")
    want = F.silu(g13[:, :N]) * g13[:, N:]
    assert torch.isfinite(out).all()
    assert_close(out, want, PATH)
    assert_far(out, F.silu(g13[:, N:]) * g13[:, :N], PATH)
    x, w = torch.randn(M, 24, generator=g), torch.randn(2 * N, 24, generator=g)
    scale = torch.rand(1, N, generator=g) + 0.5
    w_gate, w_up = w.split(N)
    assert_close(cpu.gated_up(x, w_gate, w_up, scale), reference.gated_up(x, w_gate, w_up, scale), PATH)
