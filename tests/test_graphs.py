"""The fixed-shape decode step behind CUDA graphs (infer/graphs.py), run eagerly on CPU, and on CUDA with -m gpu.

Oracles: `Llama.forward_step` on the unpadded step (logits), the eager engine (greedy tokens), and
torch.compile(fullgraph=True), which refuses a host sync or a data-dependent shape with an error.
"""

from __future__ import annotations

import pytest
import torch

from infer.cache import BlockTable, PagedKVCache
from infer.engine import Engine
from infer.graphs import DecodeGraphs, static_decode_step
from infer.sampling import SamplingParams
from model import Llama, ModelArgs
from model.peft import IA3Config, LoRAConfig
from model.step import AdapterStep
from tests.test_para_cached import _trained, random_adapter
from tests.tolerance import MODEL_PATH, assert_close


def tiny(device: str = "cpu", backend: str = "torch") -> Llama:
    torch.manual_seed(0)
    args = ModelArgs(dim=96, n_layers=2, n_heads=6, n_kv_heads=2, vocab_size=61, max_seq_len=64)
    model = Llama(args, backend=backend).eval()
    with torch.no_grad():
        model.tok_embeddings.weight.normal_(0, 1.0)
        model.output.weight.normal_(0, 0.3)
    return model.to(device)


def with_adapters(eng: Engine, model: Llama) -> Engine:
    eng.add_adapter("para", random_adapter(model, 1))
    eng.add_adapter("para_vu", random_adapter(model, 2, adjust=("v", "u")))
    eng.add_adapter("ia3", _trained(model, IA3Config(), 3))
    eng.add_adapter("lora", _trained(model, LoRAConfig(r=4), 4))
    return eng


def engine(model: Llama, **kw) -> Engine:
    return with_adapters(Engine(model, num_blocks=64, block_size=4, max_batch=6, **kw), model)


PROMPTS = [[5, 9, 2, 7, 1, 3, 3], [11, 4, 8], [1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11], [7, 7], [3, 1, 4, 1, 5]]


def run(eng: Engine, adapters, params=None) -> list[list[int]]:
    params = params or SamplingParams(max_new_tokens=9, ignore_eos=True)
    return [o.token_ids for o in eng.generate(PROMPTS[: len(adapters)], params, adapters)]


def eager_static(eng: Engine) -> Engine:
    """The engine with its decode steps on the static-buffer path, run eagerly (no capture on CPU)."""
    eng.graphs = DecodeGraphs(eng.model, eng.cache, eng.pools, eng.max_batch, capture=False)
    return eng


@torch.no_grad()
@pytest.mark.parametrize(
    "adapters",
    [
        [None],  # bucket 1, no pools
        ["para", None, "ia3"],  # bucket 4 with a padded row
        ["para", "para_vu", "ia3", None, "para"],  # bucket 8 at max_batch 6 → bucket 6
    ],
)
def test_static_step_engine_equals_eager_engine(adapters):
    model = tiny()
    want = run(engine(model), adapters)
    eng = eager_static(engine(model))
    got = run(eng, adapters)
    assert got == want
    assert eng.graphs.replays >= 8  # every decode step took the static path
    assert eng.cache.allocator.num_free == eng.cache.num_blocks


@torch.no_grad()
def test_lora_rows_and_beams_fall_back_or_pass_through():
    model = tiny()
    adapters = ["lora", "para", None]
    want = run(engine(model), adapters)
    eng = eager_static(engine(model))
    assert run(eng, adapters) == want
    assert eng.graphs.replays == 0  # a LoRA row in the batch: every step ran eagerly
    beams = SamplingParams(max_new_tokens=6, beams=3, ignore_eos=True)
    want = run(engine(model), ["para"], beams)
    assert run(eng, ["para"], beams) == want  # 3 beams share one pool slot: 3 rows in bucket 4
    assert eng.graphs.replays > 0


def _static_case(model: Llama, n_rows: int):
    """A decode step over n_rows sequences: the engine's unpadded StepBatch and the padded static inputs."""
    cache = PagedKVCache(model.args, num_blocks=40, block_size=4)
    tables = [BlockTable() for _ in range(n_rows)]
    lens = [5, 9, 2, 13, 7][:n_rows]
    pools = {p: AdapterStep.make_pool(model.args, p, n_rows + 1) for p in ("qkv", "u")}
    for p in pools.values():
        p[:, 1:].uniform_(0.5, 1.5)
    prompt = torch.randint(0, 61, (sum(lens),))
    model.forward_step(prompt, cache.prepare_step(tables, lens), cache.k, cache.v)  # fill the context
    tokens = torch.randint(0, 61, (n_rows,))
    slots = list(range(1, n_rows + 1))
    return cache, tables, pools, tokens, slots


@torch.no_grad()
def test_padded_static_step_equals_forward_step_and_leaves_real_blocks_alone():
    model = tiny()
    cache, tables, pools, tokens, slots = _static_case(model, 3)
    twin = PagedKVCache(model.args, num_blocks=40, block_size=4)
    twin.k.copy_(cache.k), twin.v.copy_(cache.v)
    twin_tables = [BlockTable(list(t.blocks), t.num_tokens) for t in tables]
    step = twin.prepare_step(twin_tables, [1] * 3)
    step.adapters = AdapterStep(pools, torch.tensor(slots))
    want = model.forward_step(tokens, step, twin.k, twin.v)

    graphs = DecodeGraphs(model, cache, pools, max_batch=4, capture=False)
    got = graphs.run(tokens.tolist(), cache.prepare_step(tables, [1] * 3, on_host=True), slots)
    assert got.shape == want.shape == (3, 61)
    assert_close(got, want, MODEL_PATH)
    real = slice(0, cache.pad_block)
    assert_close(cache.k[:, real], twin.k[:, real], MODEL_PATH)  # the same new K/V, nothing else touched
    assert_close(cache.v[:, real], twin.v[:, real], MODEL_PATH)
    assert cache.k[:, cache.pad_block, 0].abs().sum() > 0  # the padded row wrote its K into the pad block


def test_static_step_compiles_as_one_graph_without_host_syncs():
    """fullgraph=True fails on a graph break: a .item()/bool() of a tensor, a .tolist(), or an op whose output
    shape depends on data (nonzero, boolean masking) — exactly what a CUDA graph cannot replay."""
    torch._dynamo.reset()
    model = tiny()
    cache, tables, pools, tokens, slots = _static_case(model, 3)
    graphs = DecodeGraphs(model, cache, pools, max_batch=4, capture=False)
    with torch.no_grad():
        eager = graphs.run(tokens.tolist(), cache.prepare_step(tables, [1] * 3, on_host=True), slots)
    dev = graphs._inputs[4][1]  # the bucket's static inputs, as the run above filled them
    zeros = torch.zeros(4, dtype=torch.long)
    compiled = torch.compile(static_decode_step, fullgraph=True, backend="eager", dynamic=False)
    with torch.no_grad():
        kv0 = torch.stack([cache.k, cache.v]).clone()
        out = compiled(model, dev, cache.k, cache.v, pools, zeros)
    assert_close(out[:3], eager, MODEL_PATH)
    assert_close(torch.stack([cache.k, cache.v]), kv0, MODEL_PATH)  # rewrites the same K/V

    def with_sync(x: torch.Tensor) -> torch.Tensor:  # negative control: what the old uniform-slot check did
        return x[:1] if bool((x == x[0]).all()) else x

    with pytest.raises(Exception, match="(?i)data-dependent|graph break|unsupported"):
        torch.compile(with_sync, fullgraph=True, backend="eager")(torch.tensor([2, 2, 2]))


def test_cuda_graphs_on_cpu_is_a_one_line_error():
    with pytest.raises(ValueError, match="cuda_graphs=True needs the model on a CUDA device"):
        Engine(tiny(), num_blocks=8, block_size=4, cuda_graphs=True)
    assert Engine(tiny(), num_blocks=8, block_size=4).graphs is None  # off by default on CPU


@pytest.mark.gpu
@torch.no_grad()
@pytest.mark.parametrize("backend", ["triton", "torch"])
def test_cuda_graph_replay_equals_eager_token_for_token(backend):
    model = tiny("cuda", backend)
    for adapters in ([None], ["para", None, "ia3"], ["para", "para_vu", "ia3", None, "para"], ["lora", "para"]):
        want = run(engine(model, cuda_graphs=False), adapters)
        eng = engine(model)
        assert eng.graphs is not None  # on by default on CUDA
        assert run(eng, adapters) == want
        assert (eng.graphs.replays > 0) == ("lora" not in adapters)
        assert eng.cache.allocator.num_free == eng.cache.num_blocks
