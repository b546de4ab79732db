"""backend="triton" (fused kernels, Triton's interpreter on CPU) and backend="cpu" (BLAS GEMMs) equal
backend="torch", the reference, on the whole model."""

from __future__ import annotations

import os

import pytest
import torch

from infer.cache import BlockTable, PagedKVCache
from infer.engine import Engine
from infer.sampling import SamplingParams
from kernels.ops import Ops, get_ops, resolve_backend
from model import Llama, ModelArgs
from model.peft import IA3Config, PARAConfig, create_adapter
from model.step import AdapterStep, scale_columns
from tests.helpers import random_meta_state_dict
from tests.tolerance import MODEL_PATH, PATH, assert_close, assert_far

TRITON = pytest.param(
    "triton",
    marks=pytest.mark.skipif(
        not torch.cuda.is_available() and os.environ.get("TRITON_INTERPRET") != "1",
        reason="needs CUDA or TRITON_INTERPRET=1",
    ),
)
BACKENDS = pytest.mark.parametrize("backend", [TRITON, "cpu"])
ARGS = ModelArgs(dim=96, n_layers=2, n_heads=6, n_kv_heads=2, vocab_size=83, hidden_dim=160, max_seq_len=96)


def _pair(backend: str) -> tuple[Llama, Llama]:
    sd = random_meta_state_dict(96, 2, 6, 2, 83, 160, seed=0)
    models = []
    for name in ("torch", backend):
        with torch.device("meta"):
            m = Llama(ARGS, backend=name)
        m.load_weights({k: v.clone() for k, v in sd.items()})
        m.setup_rope("cpu")
        models.append(m.eval())
    return models[0], models[1]


def _para(model: Llama, seed: int):
    torch.manual_seed(seed)
    a = create_adapter(model, PARAConfig())
    with torch.no_grad():
        for layer in a.layers:
            layer["para"].up.weight.normal_(0, 0.3)
    return a


@BACKENDS
@torch.no_grad()
def test_no_cache_forward_matches_with_para(backend):
    ref, tri = _pair(backend)
    assert tri.ops.backend == backend and ref.ops.backend == "torch"
    adapter = _para(ref, 1)
    tokens = torch.randint(0, 83, (3, 13), generator=torch.Generator().manual_seed(0))
    lens = torch.tensor([4, 13, 9])
    want = ref(tokens, adapter=adapter, prompt_lens=lens)
    got = tri(tokens, adapter=adapter, prompt_lens=lens)
    print(f"no-cache max |Δ logits| = {(got - want).abs().max():.3g}")
    assert_close(got, want, MODEL_PATH)
    assert (want - ref(tokens)).abs().max() > 1e-2  # the adapter matters


@BACKENDS
@torch.no_grad()
def test_cached_prefill_and_decode_match_with_adapters(backend):
    """Packed prefill (twin attention, fused projections) then decode steps (Triton paged attention)."""
    ref, tri = _pair(backend)
    para, ia3 = _para(ref, 2), create_adapter(ref, IA3Config())
    with torch.no_grad():
        for p in ia3.parameters():
            p.add_(0.3 * torch.randn_like(p))
    slots, lens = [1, 0, 2], [7, 18, 5]  # rows: PARA, base, (IA)³; 18 crosses block boundaries
    seqs = [torch.randint(0, 83, (n + 5,), generator=torch.Generator().manual_seed(n)) for n in lens]
    out = {}
    for name, model in (("torch", ref), (backend, tri)):
        cache = PagedKVCache(model.args, num_blocks=32, block_size=4)
        tables = [BlockTable() for _ in seqs]
        pools = {p: AdapterStep.make_pool(model.args, p, 3) for p in ("qkv", "u")}
        where = scale_columns(model.args)
        for i in range(model.args.n_layers):  # (IA)³ vectors are fixed: written at admission
            for t, v in ia3.scales(i, None).items():
                pools[where[t][0]][i, 2, where[t][1]] = v[0]
        step = cache.prepare_step(tables, lens, all_logits=True)
        first = [0, 7, 25]
        step.adapters = AdapterStep(
            pools,
            torch.tensor([s for s, n in zip(slots, lens) for _ in range(n)]),
            [(para, torch.tensor([first[0] + lens[0] - 1]), torch.tensor([1]))],
        )
        logits = [model.forward_step(torch.cat([s[:n] for s, n in zip(seqs, lens)]), step, cache.k, cache.v)]
        for t in range(5):
            step = cache.prepare_step(tables, [1, 1, 1])
            step.adapters = AdapterStep(pools, torch.tensor(slots))
            logits.append(
                model.forward_step(torch.stack([s[n + t] for s, n in zip(seqs, lens)]), step, cache.k, cache.v)
            )
        out[name] = logits
    for want, got in zip(out["torch"], out[backend]):
        assert_close(got, want, MODEL_PATH)


@BACKENDS
def test_engine_greedy_tokens_match(backend):
    ref, tri = _pair(backend)
    prompts = [[(3 * i + j) % 83 for j in range(n)] for i, n in enumerate((6, 11, 3))]
    params = [SamplingParams(max_new_tokens=6, ignore_eos=True)] * 2 + [SamplingParams(max_new_tokens=5, beams=2)]
    want = [o.token_ids for o in Engine(ref, num_blocks=48, block_size=4).generate(prompts, params)]
    got = [o.token_ids for o in Engine(tri, num_blocks=48, block_size=4).generate(prompts, params)]
    assert got == want


@BACKENDS
def test_training_falls_back_to_the_twins(backend):
    """The kernels are forward-only: with autograd recording, the twins run and gradients flow."""
    _, tri = _pair(backend)
    adapter = _para(tri, 3)
    tokens = torch.randint(0, 83, (2, 9), generator=torch.Generator().manual_seed(1))
    tri(tokens, adapter=adapter).logsumexp(-1).mean().backward()
    assert all(p.grad is not None for p in adapter.parameters())


def test_backend_resolution(monkeypatch):
    monkeypatch.delenv("PARALLAMA_BACKEND", raising=False)
    assert resolve_backend("auto", "cpu") == "cpu"
    assert resolve_backend("torch", "cpu") == "torch"
    monkeypatch.setenv("PARALLAMA_BACKEND", "torch")
    assert resolve_backend("triton", "cpu") == "torch"  # the environment wins
    monkeypatch.setenv("PARALLAMA_BACKEND", "cuda-graphs")
    with pytest.raises(ValueError, match="PARALLAMA_BACKEND"):
        resolve_backend("auto", "cpu")
    monkeypatch.delenv("PARALLAMA_BACKEND")
    monkeypatch.delenv("TRITON_INTERPRET")
    with pytest.raises(ValueError, match="needs a CUDA device"):
        resolve_backend("triton", "cpu")
    with pytest.raises(ValueError, match="expected 'torch', 'triton' or 'cpu'"):
        get_ops("auto")


def test_blas_linear_is_used_for_inference_and_matches_the_twin(monkeypatch):
    from kernels import cpu

    g = torch.Generator().manual_seed(0)
    w = torch.randn(37, 100, generator=g)
    for x in (torch.randn(1, 100, generator=g), torch.randn(3, 100, generator=g), torch.randn(2, 5, 100, generator=g)):
        with torch.no_grad():
            assert cpu._blas_ok(x, w)
            assert_close(cpu.blas_linear(x, w), torch.nn.functional.linear(x, w), PATH)
    with torch.no_grad():  # no rows (a rank's empty share): an empty result, not the GEMV's row-count error
        assert cpu.blas_linear(torch.empty(0, 100), w).shape == (0, 37)
    x3 = torch.randn(3, 100, generator=g)
    with monkeypatch.context() as m:  # a few rows where the compiled library did not build: numpy's GEMVs
        m.setattr(cpu.native, "available", lambda: False)
        m.setattr(cpu, "GEMV_CHUNK_BYTES", 8 * 100 * 4)  # weight rows in chunks of 8: 8, 8, 8, 8, 5
        with torch.no_grad():
            assert_close(cpu.blas_linear(x3, w), torch.nn.functional.linear(x3, w), PATH)
    with torch.no_grad():  # a weight's numpy view is kept on it; new storage (p.data = ...) is seen
        y_old = cpu.blas_linear(x3, w)
        w.data = torch.randn(37, 100, generator=g)
        assert_close(cpu.blas_linear(x3, w), torch.nn.functional.linear(x3, w), PATH)
        assert_far(cpu.blas_linear(x3, w), y_old, PATH)
        w2 = torch.nn.Parameter(torch.randn(2 * 37, 100, generator=g))  # a stacked weight used in halves
        gate, up = w2.split(37)
        want = torch.nn.functional.silu(x3 @ gate.T) * (x3 @ up.T)
        assert_close(cpu.gated_up(x3, gate, up), want, PATH)
        assert cpu._stacked(gate, up) is w2  # its own numpy view, made once
    wg = w.clone().requires_grad_()
    assert not cpu._blas_ok(x, wg)  # autograd needs the twin
    assert not cpu._blas_ok(x.double(), w.double())
    n = torch.get_num_threads()
    with cpu.scope(decode=True):  # the compiled layers' pool owns the cores
        assert torch.get_num_threads() == 1
    assert torch.get_num_threads() == n
    with cpu.scope():  # a prefill keeps torch's threads for its GEMMs
        assert torch.get_num_threads() == n


def test_every_backend_binds_every_op_of_the_protocol():
    """Ops is the one list of ops: each backend binds each of them to a callable with the Protocol's parameters."""
    import inspect

    names = [n for n, f in vars(Ops).items() if not n.startswith("_") and inspect.isfunction(f)]
    assert {"rms_norm", "add_rms_norm", "linear_scale", "gated_up", "paged_attention", "scope"} <= set(names)
    for backend in ("torch", "cpu", "triton"):  # triton: its interpreter on CPU (tests/conftest.py)
        ops = get_ops(backend)
        assert ops.backend == backend
        for n in names:
            want = list(inspect.signature(getattr(Ops, n)).parameters)[1:]  # without self
            got = list(inspect.signature(getattr(ops, n)).parameters)
            forward_only = got == ["args", "kwargs"]  # a Triton op that falls back to its twin under autograd
            assert forward_only or got[: len(want)] == want, (backend, n, got, want)


def test_cpu_add_rms_norm_matches_the_twin():
    from kernels import cpu, reference

    g = torch.Generator().manual_seed(0)
    x, r, w = torch.randn(3, 5, 100, generator=g), torch.randn(3, 5, 100, generator=g), torch.randn(100, generator=g)
    (normed, h), (want_normed, want_h) = cpu.add_rms_norm(x, r, w, 1e-5), reference.add_rms_norm(x, r, w, 1e-5)
    assert torch.equal(h, x + r) and torch.equal(want_h, x + r)
    assert_close(normed, want_normed, PATH)
    assert_far(normed, reference.rms_norm(x, w, 1e-5), PATH)  # the residual really is added


def test_cpu_small_ops_match_the_twins():
    """The cpu backend's one-call RMSNorm and complex-multiply RoPE equal the twins, on strided views too."""
    from kernels import cpu, reference

    g = torch.Generator().manual_seed(0)
    x, w = torch.randn(3, 5, 100, generator=g), torch.randn(100, generator=g)
    assert_close(cpu.rms_norm(x, w, 1e-5), reference.rms_norm(x, w, 1e-5), PATH)
    for row in (x[0, :1], x[1, 2], x[None, 2, 4:5]):  # one row (a decode step's)
        assert_close(cpu.rms_norm(row, w, 1e-5), reference.rms_norm(row, w, 1e-5), PATH)
    xb = x.bfloat16()  # not an exact dtype for the rewrite: the twin runs
    assert torch.equal(cpu.rms_norm(xb, w.bfloat16(), 1e-5), reference.rms_norm(xb, w.bfloat16(), 1e-5))
    table = reference.rope_table(reference.rope_frequencies(18, 10000.0), 40)  # (40, 9, 2)
    qkv = torch.randn(7, 11 * 18, generator=g)  # packed rows of a fused projection: 5 Q, 3 K, 3 V heads
    qk = qkv[:, : 8 * 18].unflatten(-1, (8, 18))  # a strided view, as the model passes it
    pos = torch.tensor([0, 3, 39, 5, 6, 7, 1])
    got = cpu.rope(qk, table[pos])
    assert_close(got, reference.rope(qk, table[pos]), PATH)
    assert not torch.equal(got, qk)  # it rotated
    xt = torch.randn(2, 6, 4, 18, generator=g)  # (B, T, H, hd) with a (T, hd/2, 2) table
    assert_close(cpu.rope(xt, table[:6]), reference.rope(xt, table[:6]), PATH)


def test_cpu_write_kv_matches_the_twin():
    from kernels import cpu, reference

    g = torch.Generator().manual_seed(0)
    pools = [torch.randn(6, 4, 2, 8, generator=g) for _ in range(2)]  # K and V pools (blocks, bs, H_kv, hd)
    pools += [p.clone() for p in pools]
    slots = torch.tensor([3, 17, 0, 22])
    k, v = torch.randn(2, 4, 2, 8, generator=g).unbind(0)
    cpu.write_kv(pools[0], pools[1], slots, k, v)
    reference.write_kv(pools[2], pools[3], slots, k, v)
    assert torch.equal(pools[0], pools[2]) and torch.equal(pools[1], pools[3])
    assert torch.equal(pools[0].view(-1, 2, 8)[17], k[1])
    cpu.write_kv(pools[0], pools[1], slots[:1], k[:1].double(), v[:1].double())  # cast as the twin does
    assert torch.equal(pools[1].view(-1, 2, 8)[3], v[0])


@pytest.mark.parametrize("rows", [1, 5, 9])
def test_cpu_gated_up_one_gemm_over_stacked_weights(rows):
    """w1 | w3 stored as one tensor (as FeedForward keeps them) run as one GEMM with the SwiGLU epilogue in
    place; it equals the twin with and without a scale (per sequence, broadcast, or per row), and separate
    weights take the two-GEMM path."""
    from kernels import cpu, reference

    g = torch.Generator().manual_seed(rows)
    w13 = torch.randn(2 * 37, 50, generator=g)
    wg, wu = w13.split(37)
    assert cpu._stacked(wg, wu) is not None and cpu._stacked(wu, wg) is None
    assert cpu._stacked(wg.clone(), wu.clone()) is None
    x = torch.randn(rows, 50, generator=g)
    r2s = torch.randint(0, 3, (rows,), generator=g)
    for scale, rs in (
        (None, None),
        (torch.rand(1, 37, generator=g) + 0.5, None),
        (torch.rand(3, 37, generator=g), r2s),
    ):
        want = reference.gated_up(x, wg, wu, scale, rs)
        assert_close(cpu.gated_up(x, wg, wu, scale, rs), want, PATH)
        assert_close(cpu.gated_up(x, wg.clone(), wu.clone(), scale, rs), want, PATH)
    x3 = torch.randn(2, rows, 50, generator=g)  # (B, T, K) with a (B, N) per-sequence scale
    s3 = torch.rand(2, 37, generator=g)
    assert_close(cpu.gated_up(x3, wg, wu, s3), reference.gated_up(x3, wg, wu, s3), PATH)
    assert torch.equal(w13, torch.cat([wg, wu]))  # the weights were not touched


@pytest.mark.parametrize(
    "row_to_seq",
    [
        [0] * 5 + [1] * 9 + [2] * 3,  # a prefill: one run per sequence
        [2, 2, 0, 1, 1, 1, 0, 0, 2],  # runs out of order, a sequence in two runs
        list(range(70)) * 2,  # more runs than _MAX_RUNS: the gathered multiply
    ],
    ids=["prefill", "unordered", "many-runs"],
)
def test_cpu_scale_by_runs_of_rows_matches_the_twin(row_to_seq):
    """A per-sequence scale over packed rows is applied run by run (no (M, N) gather) and equals the twin's
    scale[row_to_seq] in linear_scale and gated_up; multiplying a run by its neighbour's row is caught."""
    from kernels import cpu, reference

    g = torch.Generator().manual_seed(len(row_to_seq))
    rs = torch.tensor(row_to_seq)
    S, M = int(rs.max()) + 1, len(row_to_seq)
    x, w, w13 = torch.randn(M, 40, generator=g), torch.randn(23, 40, generator=g), torch.randn(2 * 19, 40, generator=g)
    scale, scale_u = torch.rand(S, 23, generator=g) + 0.5, torch.rand(S, 19, generator=g) + 0.5
    want = reference.linear_scale(x, w, scale, rs)
    assert_close(cpu.linear_scale(x, w, scale, rs), want, PATH)
    wg, wu = w13.split(19)
    assert_close(cpu.gated_up(x, wg, wu, scale_u, rs), reference.gated_up(x, wg, wu, scale_u, rs), PATH)
    shifted = (rs + 1) % S  # negative control: every row scaled by another sequence's vector
    assert_far(cpu.linear_scale(x, w, scale, shifted), want, PATH)


def test_stacked_weights_keep_metas_names():
    """wqkv and w13 are stored stacked, but state dicts name Meta's wq/wk/wv and w1/w3, and load back by them."""
    args = ModelArgs(dim=32, n_layers=1, n_heads=4, n_kv_heads=2, vocab_size=40, multiple_of=16, max_seq_len=16)
    torch.manual_seed(0)
    a, b = Llama(args), Llama(args)
    sd = a.state_dict()
    assert "layers.0.feed_forward.w1.weight" in sd and "layers.0.feed_forward.w3.weight" in sd
    assert not any("w13" in k or "wqkv" in k for k in sd)
    ffn = a.layers[0].feed_forward
    assert torch.equal(sd["layers.0.feed_forward.w3.weight"], ffn.w13[ffn.hidden_dim :])
    b.load_state_dict(sd)
    tokens = torch.randint(0, 40, (2, 9))
    assert torch.equal(a(tokens), b(tokens))


@pytest.mark.parametrize("hd", [8, 32])
@pytest.mark.parametrize("lens", [[21], [7, 16, 1, 30]])
def test_cpu_paged_attention_matches_the_twin(lens, hd, monkeypatch):
    """Decode (one row per sequence; a partly filled last block; ragged lengths) and one-sequence prefill
    take the cpu backend's direct forms (a lone sequence's consecutive blocks read in place, the prefill
    then too); a prefill of several whole prompts runs one causal attention per sequence (the compiled one
    where it builds and hd is a multiple of 16, else SDPA); a step mixing a prompt with another sequence's
    decode row falls back to the twin."""
    from kernels import cpu, native_attention, reference

    compiled, real = [], native_attention.causal_attention

    def spy(*a):
        out = real(*a)
        compiled.append(out is not None)
        return out

    monkeypatch.setattr(native_attention, "causal_attention", spy)
    g = torch.Generator().manual_seed(len(lens))
    H, n_kv, bs = 6, 2, 4
    width = -(-max(lens) // bs)
    n_blocks = len(lens) * width + 3
    k_cache, v_cache = torch.randn(2, n_blocks, bs, n_kv, hd, generator=g).unbind(0)
    perm = torch.randperm(n_blocks, generator=g)  # scattered blocks, as a real pool hands them out
    tables = perm[: len(lens) * width].view(len(lens), width)

    contiguous = None

    def both(q, seq_lens, positions, row_to_seq, row_index, max_rows):
        a = (q, k_cache, v_cache, tables, seq_lens, positions, row_to_seq, row_index, max_rows)
        return cpu.paged_attention(*a, contiguous_kv=contiguous), reference.paged_attention(*a)

    S = len(lens)
    seq_lens = torch.tensor(lens)
    decode = (seq_lens, seq_lens - 1, torch.arange(S), torch.zeros(S, dtype=torch.long), 1)
    got, want = both(torch.randn(S, H, hd, generator=g), *decode)
    assert_close(got, want, PATH)
    if S == 1:  # consecutive blocks (how a fresh pool serves a lone sequence): attended in place
        tables, contiguous = torch.arange(2, 2 + width)[None], (2, lens[0])
        got, want = both(torch.randn(S, H, hd, generator=g), *decode)
        assert_close(got, want, PATH)
    # a prefill step: every sequence's whole prompt at once
    counts = torch.tensor(lens)
    row_to_seq = torch.repeat_interleave(torch.arange(S), counts)
    row_index = torch.arange(len(row_to_seq)) - (torch.cumsum(counts, 0) - counts)[row_to_seq]
    q = torch.randn(len(row_to_seq), H, hd, generator=g)
    assert cpu._whole_prompts_in_order(row_index, row_to_seq, row_index, seq_lens)
    got, want = both(q, seq_lens, row_index, row_to_seq, row_index, max(lens))
    assert_close(got, want, PATH)
    takes = hd % 16 == 0 and native_attention.library() is not None
    assert compiled == [takes] * S  # one per prompt
    if S > 1:  # sequence 0 decodes its newest token while the others prefill: not whole prompts
        keep = row_index >= 0
        keep[: lens[0] - 1] = False
        pos = row_index.clone()
        pos[lens[0] - 1] = lens[0] - 1
        r_idx = torch.where(row_to_seq == 0, 0, row_index)[keep]
        assert not cpu._whole_prompts_in_order(pos[keep], row_to_seq[keep], r_idx, seq_lens)
        got, want = both(q[keep], seq_lens, pos[keep], row_to_seq[keep], r_idx, max(lens))
        assert_close(got, want, PATH)
