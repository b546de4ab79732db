"""PARA on the cached path: vectors made once at prefill, reused at decode; mixed-adapter batches."""

from __future__ import annotations

import pytest
import torch

from infer.cache import BlockTable, PagedKVCache
from infer.engine import Engine
from infer.sampling import SamplingParams
from model import Llama, ModelArgs
from model.peft import IA3Config, LoRAConfig, PARAConfig, create_adapter
from model.step import AdapterStep
from tests.tolerance import MODEL_PATH, assert_close


def tiny() -> Llama:
    torch.manual_seed(0)
    args = ModelArgs(dim=96, n_layers=2, n_heads=6, n_kv_heads=2, vocab_size=61, max_seq_len=128)
    model = Llama(args).eval()
    with torch.no_grad():
        model.tok_embeddings.weight.normal_(0, 1.0)
        model.output.weight.normal_(0, 0.3)
    return model


def random_adapter(model: Llama, seed: int, **cfg):
    """A trained-looking adapter: vectors far from 1, so a wrong pooling position shows."""
    torch.manual_seed(seed)
    adapter = create_adapter(model, PARAConfig(**cfg))
    with torch.no_grad():
        for layer in adapter.layers:
            layer["para"].down.weight.normal_(0, 0.5)
            layer["para"].up.weight.normal_(0, 0.5)
            layer["para"].up.bias.normal_(1.0, 0.2)
    return adapter


@torch.no_grad()
def test_cached_para_equals_no_cache_forward_with_prefill_vectors():
    model = tiny()
    adapters = [random_adapter(model, 1), random_adapter(model, 2, adjust=("v", "u")), None]
    slots = [1, 2, 0]
    prompt_lens = [7, 12, 5]
    seqs = [torch.randint(0, 61, (n + 6,)) for n in prompt_lens]
    cache = PagedKVCache(model.args, num_blocks=32, block_size=4)
    tables = [BlockTable() for _ in seqs]
    pools = {p: AdapterStep.make_pool(model.args, p, 3) for p in ("qkv", "u")}

    step = cache.prepare_step(tables, prompt_lens, all_logits=True)
    first = [0, 7, 19]
    compute = [
        (a, torch.tensor([f + n - 1]), torch.tensor([s]))
        for a, f, n, s in zip(adapters, first, prompt_lens, slots)
        if a
    ]
    step.adapters = AdapterStep(pools, torch.tensor([s for s, n in zip(slots, prompt_lens) for _ in range(n)]), compute)
    got = model.forward_step(torch.cat([s[:n] for s, n in zip(seqs, prompt_lens)]), step, cache.k, cache.v)
    ref = torch.cat([model(s[None, :n], adapter=a)[0] for s, n, a in zip(seqs, prompt_lens, adapters)])
    assert_close(got, ref, MODEL_PATH)

    for t in range(6):
        step = cache.prepare_step(tables, [1, 1, 1])
        step.adapters = AdapterStep(pools, torch.tensor(slots))  # decode: vectors only gathered
        got = model.forward_step(torch.stack([s[n + t] for s, n in zip(seqs, prompt_lens)]), step, cache.k, cache.v)
        for row, (s, n, a) in enumerate(zip(seqs, prompt_lens, adapters)):
            full = model(s[None, : n + t + 1], adapter=a, prompt_lens=torch.tensor([n]))[0, -1]
            assert_close(got[row], full, MODEL_PATH)
            if a is not None:  # pooling at the growing last token instead would differ
                moved = model(s[None, : n + t + 1], adapter=a)[0, -1]
                assert (moved - full).abs().max() > 1e-3


@torch.no_grad()
def test_prefill_runs_the_last_layers_ffn_on_the_logit_rows_only():
    """A prefill wants the logits of each prompt's last row: the last layer writes every row's K/V but runs
    its FFN on those rows (llama.cpp's output ids). Logits equal the full forward's; later decode steps, which
    read every row's K/V, still equal it; the FFN's row counts show the pruning."""
    model = tiny()
    adapters = [random_adapter(model, 1), None, random_adapter(model, 2, adjust=("v", "u"))]
    slots, prompt_lens = [1, 0, 2], [7, 12, 5]
    seqs = [torch.randint(0, 61, (n + 3,)) for n in prompt_lens]
    cache = PagedKVCache(model.args, num_blocks=32, block_size=4)
    tables = [BlockTable() for _ in seqs]
    pools = {p: AdapterStep.make_pool(model.args, p, 3) for p in ("qkv", "u")}
    rows_seen = []
    gated_up = model.ops.gated_up

    def counting(x, *args, **kwargs):
        rows_seen.append(x.shape[0])
        return gated_up(x, *args, **kwargs)

    step = cache.prepare_step(tables, prompt_lens)
    last = torch.tensor(prompt_lens).cumsum(0) - 1
    compute = [(a, last[i : i + 1], torch.tensor([s])) for i, (a, s) in enumerate(zip(adapters, slots)) if a]
    step.adapters = AdapterStep(pools, torch.tensor(slots), compute, row_to_seq=step.row_to_seq)
    model.ops.gated_up = counting  # an instance attribute over the shared ops object's method
    try:
        got = model.forward_step(torch.cat([s[:n] for s, n in zip(seqs, prompt_lens)]), step, cache.k, cache.v)
    finally:
        del model.ops.gated_up
    assert rows_seen == [sum(prompt_lens), 3]  # layer 0 over every row, the last layer over the logit rows
    ref = torch.stack([model(s[None, :n], adapter=a)[0, -1] for s, n, a in zip(seqs, prompt_lens, adapters)])
    assert_close(got, ref, MODEL_PATH)
    for t in range(3):
        step = cache.prepare_step(tables, [1, 1, 1])
        step.adapters = AdapterStep(pools, torch.tensor(slots))
        got = model.forward_step(torch.stack([s[n + t] for s, n in zip(seqs, prompt_lens)]), step, cache.k, cache.v)
        for row, (s, n, a) in enumerate(zip(seqs, prompt_lens, adapters)):
            assert_close(
                got[row], model(s[None, : n + t + 1], adapter=a, prompt_lens=torch.tensor([n]))[0, -1], MODEL_PATH
            )


def test_mixed_adapter_batch_equals_each_row_alone():
    model = tiny()
    engine = Engine(model, num_blocks=64, block_size=4)
    engine.add_adapter("a", random_adapter(model, 1))
    engine.add_adapter("b", random_adapter(model, 2, adjust=("q",)))
    g = torch.Generator().manual_seed(0)
    prompts = [torch.randint(0, 61, (n,), generator=g).tolist() for n in (5, 9, 13, 7, 4)]
    names = ["a", "b", None, "a", "b"]
    params = [SamplingParams(max_new_tokens=10, ignore_eos=True)] * 4 + [
        SamplingParams(max_new_tokens=8, beams=2, ignore_eos=True)
    ]
    batch = engine.generate(prompts, params, adapters=names)
    solo = [engine.generate(p, sp, adapters=[n])[0] for p, sp, n in zip(prompts, params, names)]
    assert [o.token_ids for o in batch] == [o.token_ids for o in solo]
    base = engine.generate(prompts[0], params[0])[0]
    assert base.token_ids != batch[0].token_ids  # the adapter really changes the output
    # greedy tokens equal the no-cache forward with prefill-pooled vectors, step by step
    ids, adapter = prompts[0], engine.adapters["a"]
    for k, tok in enumerate(batch[0].token_ids):
        x = torch.tensor([ids + batch[0].token_ids[:k]])
        with torch.no_grad():
            assert int(model(x, adapter=adapter, prompt_lens=torch.tensor([len(ids)]))[0, -1].argmax()) == tok
    assert engine.cache.allocator.num_free == 64 and len(engine.free_slots) == engine.max_batch


def test_preempted_adapter_requests_recompute_their_vectors():
    model = tiny()
    engine = Engine(model, num_blocks=22, block_size=4)
    engine.add_adapter("a", random_adapter(model, 3))
    prompts = [[(5 * i + j) % 60 + 1 for j in range(10)] for i in range(4)]
    params = SamplingParams(max_new_tokens=30, ignore_eos=True)
    outs = engine.generate(prompts, params, adapters=["a", None, "a", "a"])
    assert engine.num_preemptions > 0
    solo = Engine(model, num_blocks=64, block_size=4)
    solo.add_adapter("a", engine.adapters["a"])
    for p, name, out in zip(prompts, ["a", None, "a", "a"], outs):
        assert out.token_ids == solo.generate(p, params, adapters=[name])[0].token_ids


def test_adapter_registry_errors():
    model = tiny()
    engine = Engine(model, num_blocks=16, block_size=4)
    with pytest.raises(ValueError, match="no adapter named 'x'"):
        engine.generate([1, 2, 3], SamplingParams(max_new_tokens=2), adapters=["x"])
    engine.add_adapter("a", random_adapter(model, 1))
    with pytest.raises(ValueError, match="already registered"):
        engine.add_adapter("a", random_adapter(model, 1))
    other = Llama(ModelArgs(dim=64, n_layers=2, n_heads=4, vocab_size=61, max_seq_len=64))
    with pytest.raises(ValueError, match="another shape"):
        engine.add_adapter("b", create_adapter(other))
    engine.add_request([1, 2, 3], SamplingParams(max_new_tokens=2), adapter="a")
    with pytest.raises(ValueError, match="used by 1 unfinished"):
        engine.remove_adapter("a")
    while engine.has_unfinished():
        engine.step()
    engine.remove_adapter("a")
    assert "a" not in engine.adapters


def _trained(model: Llama, cfg, seed: int):
    """(IA)³ vectors ≠ 1 and LoRA B ≠ 0, as after training."""
    torch.manual_seed(seed)
    adapter = create_adapter(model, cfg)
    with torch.no_grad():
        for name, p in adapter.named_parameters():
            if "lora_A" not in name:
                p.add_(0.3 * torch.randn_like(p))
    return adapter


@torch.no_grad()
@pytest.mark.parametrize(
    "names",
    [
        ["para", "ia3", None, "lora", "lora-all", "ia3", "para"],
        # no PARA row: the prefill takes decode's one-gather path, with per-sequence scales
        ["ia3", None, "lora", "ia3", "lora-all", None, "ia3"],
    ],
    ids=["with-para", "without-para"],
)
def test_mixed_methods_each_row_equals_its_solo_run(names):
    """PARA, (IA)³, two LoRAs and base rows in one engine: logits of the mixed prefill and decode steps
    equal each row's no-cache forward, and greedy tokens (with beams) equal each request run alone."""
    model = tiny()
    engine = Engine(model, num_blocks=96, block_size=4)
    adapters = {
        "para": random_adapter(model, 1),
        "ia3": _trained(model, IA3Config(), 2),
        "lora": _trained(model, LoRAConfig(r=4, lora_alpha=8), 3),
        "lora-all": _trained(model, LoRAConfig(r=2, target_modules=("q_proj", "o_proj", "gate_proj", "down_proj")), 4),
    }
    for name, a in adapters.items():
        engine.add_adapter(name, a)
    g = torch.Generator().manual_seed(5)
    prompts = [torch.randint(0, 61, (n,), generator=g).tolist() for n in (5, 9, 13, 7, 4, 6, 10)]

    # one prefill step over all seven, then decode steps, straight through forward_step
    reqs = [engine.add_request(p, SamplingParams(max_new_tokens=4), adapter=n) for p, n in zip(prompts, names)]
    admitted = engine._admit()
    assert admitted == reqs
    seqs = [list(p) for p in prompts]
    counts = [len(p) for p in prompts]
    for t in range(3):
        step = engine.cache.prepare_step([r.seqs[0].table for r in reqs], counts, all_logits=t == 0)
        # as `Engine._prefill` / `_decode` build it: a prefill's scales stay one row per sequence
        step.adapters = engine._adapter_step(
            reqs, counts, compute=t == 0, row_to_seq=step.row_to_seq if t == 0 else None
        )
        assert (step.adapters.row_to_seq is not None) == (t == 0)
        new = [s for s in seqs] if t == 0 else [s[-1:] for s in seqs]
        got = model.forward_step(torch.tensor([x for s in new for x in s]), step, engine.cache.k, engine.cache.v)
        first = 0
        for j, (s, n, name) in enumerate(zip(seqs, counts, names)):
            a = adapters.get(name)
            ref = model(torch.tensor([s]), adapter=a, prompt_lens=torch.tensor([len(prompts[j])]))[0]
            rows = got[first : first + n] if t == 0 else got[j : j + 1]
            assert_close(rows, ref[-n:] if t == 0 else ref[-1:], MODEL_PATH)
            if a is not None:  # every adapter really moves its rows
                assert (ref - model(torch.tensor([s]))[0]).abs().max() > 1e-3, name
            first += n
        for s, n in zip(seqs, counts):
            s.append((7 * len(s) + n) % 61)
        counts = [1] * len(seqs)
    for r in reqs:
        engine._finish(r, "length")
    assert len(engine.free_slots) == engine.max_batch and engine.cache.allocator.num_free == 96

    params = [SamplingParams(max_new_tokens=8, ignore_eos=True)] * 6 + [
        SamplingParams(max_new_tokens=6, beams=3, ignore_eos=True)
    ]
    batch = engine.generate(prompts, params, adapters=names)
    solo = [engine.generate(p, sp, adapters=[n])[0] for p, sp, n in zip(prompts, params, names)]
    assert [o.token_ids for o in batch] == [o.token_ids for o in solo]
