"""The engine against transformers, against itself run alone, and its allocator invariants."""

from __future__ import annotations

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from infer.engine import Engine
from infer.sampling import SamplingParams, filter_logits, sample_token
from infer.text import IncrementalDetokenizer
from model import Llama, ModelArgs
from tests.tolerance import PATH

PROMPTS = [
    "The capital of France is",
    "def quicksort(arr):\n    ",
    "Once upon a time, in a small village by the sea, there lived an old fisherman who",
    "1, 2, 3, 4,",
    "Water boils at",
]


@pytest.fixture(scope="module")
def engine(smollm2):
    return Engine(smollm2, num_blocks=256)


def test_batch_equals_each_prompt_alone(engine):
    params = SamplingParams(max_new_tokens=20)
    batch = engine.generate(PROMPTS, params)
    for prompt, out in zip(PROMPTS, batch):
        assert out.token_ids == engine.generate(prompt, params)[0].token_ids, prompt
    assert engine.cache.allocator.num_free == engine.cache.num_blocks


def test_greedy_matches_transformers(engine, hf_smollm2):
    hf, _ = hf_smollm2
    ids = engine.tokenizer.encode(PROMPTS[2])
    ours = engine.generate(ids, SamplingParams(max_new_tokens=32, ignore_eos=True))[0].token_ids
    with torch.no_grad():
        ref = hf.generate(torch.tensor([ids]), max_new_tokens=32, min_new_tokens=32, do_sample=False)
    assert ours == ref[0, len(ids) :].tolist()


@pytest.mark.parametrize("early_stopping", [False, True])
def test_beam_search_matches_transformers(engine, hf_smollm2, early_stopping):
    hf, tok = hf_smollm2
    for prompt in (PROMPTS[0], PROMPTS[3]):
        ids = engine.tokenizer.encode(prompt)
        ours = engine.generate(ids, SamplingParams(max_new_tokens=16, beams=3, early_stopping=early_stopping))[0]
        with torch.no_grad():
            ref = hf.generate(
                torch.tensor([ids]),
                max_new_tokens=16,
                num_beams=3,
                do_sample=False,
                early_stopping=early_stopping,
                length_penalty=1.0,
                eos_token_id=sorted(engine.tokenizer.stop_ids),
                pad_token_id=tok.eos_token_id,
            )[0, len(ids) :].tolist()
        assert ours.token_ids == ref[: len(ours.token_ids)]
        assert all(t == tok.eos_token_id for t in ref[len(ours.token_ids) :])  # the rest is padding
    assert engine.cache.allocator.num_free == engine.cache.num_blocks


def test_stop_string_cuts_text(engine):
    full = engine.generate(PROMPTS[3], SamplingParams(max_new_tokens=12))[0]
    assert " 7" in full.text
    cut = engine.generate(PROMPTS[3], SamplingParams(max_new_tokens=12, stop=(" 7",)))[0]
    assert cut.text == full.text[: full.text.index(" 7")] and cut.finish_reason == "stop"


@pytest.mark.parametrize(
    "prompt, params",
    [
        (PROMPTS[1], SamplingParams(max_new_tokens=16)),
        (PROMPTS[3], SamplingParams(max_new_tokens=12, stop=(" 7",))),  # never shows a stop string's start
        (PROMPTS[0], SamplingParams(max_new_tokens=8, beams=2)),
    ],
)
def test_stream_pieces_join_to_the_generated_text(engine, prompt, params):
    pieces = list(engine.stream(prompt, params))
    assert "".join(pieces) == engine.generate(prompt, params)[0].text
    assert len(pieces) > (0 if params.beams > 1 else 3)


def test_incremental_detokenizer_never_splits_a_character(smollm2):
    tok = smollm2.tokenizer
    text = "héllo 日本語 🙂 naïve café ∑ 🚀🚀"
    ids = tok.encode(text, bos=False)
    assert len(ids) > len(text.split())  # multi-byte characters span several tokens
    detok = IncrementalDetokenizer(tok)
    pieces = [p for p in (detok.add(i) for i in ids) if p]
    assert "".join(pieces) == text
    assert not any("\ufffd" in p for p in pieces)


# ---- tiny model: sampling, scheduling and allocator invariants ----------------------------------


@pytest.fixture(scope="module")
def tiny() -> Llama:
    torch.manual_seed(0)
    model = Llama(ModelArgs(dim=64, n_layers=2, n_heads=4, n_kv_heads=2, vocab_size=50, max_seq_len=96)).eval()
    with torch.no_grad():
        model.tok_embeddings.weight.normal_(0, 1.0)
        model.output.weight.normal_(0, 0.5)
    return model


def test_seeded_sampling_is_reproducible(tiny):
    eng = Engine(tiny, num_blocks=64, block_size=4)
    p = SamplingParams(max_new_tokens=20, temperature=1.0, top_p=0.9, seed=123)
    a = eng.generate([1, 2, 3], p)[0].token_ids
    b = eng.generate([1, 2, 3], p)[0].token_ids
    c = eng.generate([1, 2, 3], SamplingParams(max_new_tokens=20, temperature=1.0, top_p=0.9, seed=7))[0].token_ids
    assert a == b and a != c


def test_first_token_time_marks_the_prefill_not_the_decode_in_its_step(tiny):
    """The engine's first step prefills then decodes once; first_token_time falls between the two (the
    bench's prefill tok/s is measured to it): with decode made slow, it is far from the step's end."""
    import time

    eng = Engine(tiny, num_blocks=64, block_size=4)
    req = eng.add_request([1, 2, 3], SamplingParams(max_new_tokens=4), None)
    assert req.first_token_time is None
    decode = eng._decode

    def slow_decode():
        time.sleep(0.2)
        return decode()

    eng._decode = slow_decode
    t0 = time.perf_counter()
    eng.step()
    t1 = time.perf_counter()
    assert len(req.output_ids) == 2  # the prefill's token and one decode step's
    assert t0 < req.first_token_time < t1 - 0.2
    first = req.first_token_time
    eng.step()
    assert req.first_token_time == first  # later steps leave it


@settings(max_examples=60, deadline=None)
@given(
    logits=st.lists(st.floats(-20, 20, allow_nan=False), min_size=2, max_size=40),
    top_k=st.integers(0, 40),
    top_p=st.floats(0.05, 1.0),
    seed=st.integers(0, 2**31 - 1),
)
def test_top_k_top_p_never_leave_the_allowed_set(logits, top_k, top_p, seed):
    x = torch.tensor(logits)  # float32: the values the filter sees
    vals = x.tolist()
    allowed = set(range(len(vals)))
    if 0 < top_k < len(vals):  # ties at the k-th value are kept, as the filter does
        kth = sorted(vals, reverse=True)[top_k - 1]
        allowed = {i for i in allowed if vals[i] >= kth}
    masked = filter_logits(x, 1.0, top_k, top_p)
    kept = {i for i in range(len(vals)) if masked[i] > float("-inf")}
    assert kept and kept <= allowed
    probs = dict(zip(sorted(allowed), torch.tensor([vals[i] for i in sorted(allowed)]).softmax(-1).tolist()))
    mass = sum(probs[i] for i in kept)
    assert mass >= min(top_p, 1.0) * (1 - PATH.bound)  # the nucleus reaches top_p ...
    assert mass - min(probs[i] for i in kept) < top_p * (1 + PATH.bound)  # ... and is the smallest set that does
    dropped = allowed - kept
    assert all(vals[i] >= vals[j] for i in kept for j in dropped)  # and takes the most likely tokens
    gen = torch.Generator().manual_seed(seed)
    params = SamplingParams(temperature=1.0, top_k=top_k, top_p=top_p)
    for _ in range(5):
        assert sample_token(x, params, gen) in kept


@settings(max_examples=40, deadline=None)
@given(logits=st.lists(st.floats(-5, 5, allow_nan=False), min_size=2, max_size=30), seed=st.integers(0, 1000))
def test_temperature_to_zero_is_greedy(logits, seed):
    x = torch.tensor(logits)
    top2 = torch.topk(x, 2).values
    if top2[0] - top2[1] < 1e-3:
        return  # a near-tie is not decided by temperature
    gen = torch.Generator().manual_seed(seed)
    assert sample_token(x, SamplingParams(temperature=1e-5), gen) == sample_token(x, SamplingParams(), None)


def test_pool_too_small_is_a_clear_error(tiny):
    eng = Engine(tiny, num_blocks=2, block_size=4)
    with pytest.raises(ValueError, match="KV pool"):
        eng.generate(list(range(1, 11)), SamplingParams(max_new_tokens=4))
    assert not eng.has_unfinished()


@settings(max_examples=25, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(
    work=st.lists(
        st.tuples(st.integers(1, 20), st.integers(1, 12), st.sampled_from([1, 1, 2, 3])), min_size=1, max_size=6
    ),
    num_blocks=st.integers(8, 24),
    seed=st.integers(0, 10_000),
)
def test_random_workloads_free_every_block_and_match_solo_runs(tiny, work, num_blocks, seed):
    """Small pools force waiting and preemption; every output must still equal its solo run."""
    g = torch.Generator().manual_seed(seed)
    prompts = [torch.randint(1, 50, (n,), generator=g).tolist() for n, _, _ in work]
    params = [SamplingParams(max_new_tokens=m, beams=b, ignore_eos=True) for _, m, b in work]
    eng = Engine(tiny, num_blocks=num_blocks, block_size=4, max_batch=6)
    fits = [len(p) + sp.max_new_tokens <= num_blocks * 4 // sp.beams - 4 for p, sp in zip(prompts, params)]
    prompts = [p for p, ok in zip(prompts, fits) if ok]
    params = [sp for sp, ok in zip(params, fits) if ok]
    if not prompts:
        return
    outs = eng.generate(prompts, params)
    assert eng.cache.allocator.num_free == num_blocks
    assert all(c == 0 for c in eng.cache.allocator.refcount)
    solo = Engine(tiny, num_blocks=64, block_size=4)
    for p, sp, out in zip(prompts, params, outs):
        assert out.token_ids == solo.generate(p, sp)[0].token_ids
        assert len(out.token_ids) <= sp.max_new_tokens


def test_preemption_recomputes_without_corrupting_others(tiny):
    """Four long greedy requests in a pool that holds about two: the youngest get preempted."""
    prompts = [[(7 * i + j) % 49 + 1 for j in range(10)] for i in range(4)]
    params = SamplingParams(max_new_tokens=30, ignore_eos=True)
    eng = Engine(tiny, num_blocks=22, block_size=4)
    outs = eng.generate(prompts, params)
    assert eng.num_preemptions > 0
    assert eng.cache.allocator.num_free == 22
    solo = Engine(tiny, num_blocks=64, block_size=4)
    assert [o.token_ids for o in outs] == [solo.generate(p, params)[0].token_ids for p in prompts]
    beams = eng.generate(prompts, SamplingParams(max_new_tokens=12, beams=2, ignore_eos=True))
    assert [b.token_ids for b in beams] == [
        solo.generate(p, SamplingParams(max_new_tokens=12, beams=2, ignore_eos=True))[0].token_ids for p in prompts
    ]
    assert eng.cache.allocator.num_free == 22


def test_abort_frees_blocks_and_slot_at_once(tiny):
    """Engine.abort on a running (PARA, holding a pool slot) and a waiting request: blocks and slot are free on
    return, and the request left running still equals its solo run."""
    from model.peft import PARAConfig, create_adapter

    eng = Engine(tiny, num_blocks=32, block_size=4, max_batch=2)
    eng.add_adapter("para", create_adapter(tiny, PARAConfig()))
    params = SamplingParams(max_new_tokens=20, ignore_eos=True)
    keep = eng.add_request([1, 2, 3], params)
    running = eng.add_request([4, 5, 6, 7, 8], params, adapter="para")
    waiting = eng.add_request([9, 10], params)  # max_batch 2: it waits
    for _ in range(3):
        eng.step()
    assert running in eng.running and waiting in eng.waiting and running.slot
    used = eng.cache.num_blocks - eng.cache.allocator.num_free
    eng.abort(running)
    eng.abort(waiting)
    assert (running.finish_reason, waiting.finish_reason) == ("abort", "abort")
    assert running not in eng.running and waiting not in eng.waiting and running.slot == 0
    assert eng.cache.num_blocks - eng.cache.allocator.num_free == used - 2  # its 5 + 3 tokens: two blocks of 4
    assert len(eng.free_slots) == eng.max_batch
    eng.abort(running)  # a finished request is left as is
    while eng.has_unfinished():
        eng.step()
    assert eng.cache.allocator.num_free == eng.cache.num_blocks
    assert keep.output_ids == Engine(tiny, num_blocks=32, block_size=4).generate([1, 2, 3], params)[0].token_ids
