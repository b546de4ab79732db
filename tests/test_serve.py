"""The OpenAI-compatible server (infer/serve) as clients see it: a real uvicorn on 127.0.0.1, driven by the
official `openai` client and raw httpx. Every generated token is compared with the Engine run directly.

SmolLM2 shows real text and its chat template; the concurrency tests run a 2-layer random model over SmolLM2's
tokenizer (tests/serve_helpers.py), whose steps are fast enough for long streams and many solo references.
"""

from __future__ import annotations

import asyncio
import json
import time

import pytest
import torch

pytest.importorskip("fastapi")
pytest.importorskip("uvicorn")
openai = pytest.importorskip("openai")
httpx = pytest.importorskip("httpx")

from infer.engine import Engine  # noqa: E402
from infer.sampling import SamplingParams  # noqa: E402
from infer.serve.app import create_app  # noqa: E402
from tests.serve_helpers import adapters, running, sse, tiny_model, wait_idle  # noqa: E402
from weights.adapters import save_adapter  # noqa: E402

NAMES = [None, "para", "ia3", "lora"]  # the four tenants, base first
PROMPTS = [f"Request {i}: the {w} of the river" for i, w in enumerate("colour sound depth name".split() * 4)]


# ---- SmolLM2: completions, chat and streams equal Engine.generate ------------------------------------------------
@pytest.fixture(scope="module")
def smol(smollm2):
    """(base URL, an Engine for references, the PARA adapter both use)."""
    from model.peft import PARAConfig, create_adapter

    torch.manual_seed(0)
    para = create_adapter(smollm2, PARAConfig())
    with torch.no_grad():
        for layer in para.layers:
            layer["para"].up.weight.normal_(0, 0.05)  # enough to change the answer, normalised pool or not
    engine = Engine(smollm2, num_blocks=64)
    engine.add_adapter("para", para)
    ref = Engine(smollm2, num_blocks=64)
    ref.add_adapter("para", para)
    with running(create_app(engine, "smol")) as url:
        yield url, ref


def test_smollm2_completion_and_chat_stream_equal_engine(smol):
    url, ref = smol
    client = openai.OpenAI(base_url=url + "/v1", api_key="unused", max_retries=0)
    messages = [{"role": "user", "content": "What is the capital of France?"}]
    chat_ids = ref.tokenizer.encode_chat(messages)
    prompt = "The capital of France is"
    # the references in one batch (every row of a mixed batch equals its solo run: tests/test_engine.py)
    want = ref.generate([prompt, chat_ids, chat_ids], SamplingParams(max_new_tokens=8), adapters=[None, None, "para"])
    r = client.completions.create(
        model="smol", prompt=prompt, max_tokens=8, temperature=0, extra_body={"return_token_ids": True}
    )
    c, w = r.choices[0], want[0]
    assert (c.text, c.token_ids, c.finish_reason) == (w.text, w.token_ids, w.finish_reason) and "Paris" in c.text
    assert (r.usage.prompt_tokens, r.usage.completion_tokens, r.usage.total_tokens) == (
        len(w.prompt_ids),
        len(w.token_ids),
        len(w.prompt_ids) + len(w.token_ids),
    )
    assert r.model == "smol" and r.object == "text_completion"

    stream = client.chat.completions.create(
        model="para",
        messages=messages,
        max_tokens=8,
        temperature=0,
        stream=True,
        stream_options={"include_usage": True},
    )
    chunks = list(stream)
    w = want[2]
    assert w.text != want[1].text and "Paris" in want[1].text  # the adapter really changes the answer
    assert chunks[0].choices[0].delta.role == "assistant" and len(chunks) > 4  # piece by piece
    assert "".join(c.choices[0].delta.content or "" for c in chunks if c.choices) == w.text
    assert [c.choices[0].finish_reason for c in chunks[:-1]][-1] == w.finish_reason
    assert chunks[-1].choices == [] and chunks[-1].usage.completion_tokens == len(w.token_ids)
    assert chunks[-1].usage.prompt_tokens == len(chat_ids) and all(c.usage is None for c in chunks[:-1])
    assert {c.object for c in chunks} == {"chat.completion.chunk"} and len({c.id for c in chunks}) == 1


# ---- the tiny model: many tenants at once ------------------------------------------------------------------------
@pytest.fixture(scope="module")
def tiny(smollm2, one_torch_thread):
    model = tiny_model(smollm2.tokenizer)
    return model, adapters(model)


@pytest.fixture(scope="module")
def server(tiny):
    """(base URL, the EngineLoop) serving the tiny model as "tiny" with PARA, (IA)³, LoRA and a "victim" PARA."""
    model, regs = tiny
    engine = Engine(model, num_blocks=256, max_batch=32)
    for name, a in {**regs, "victim": adapters(model, seed=1)["para"]}.items():
        engine.add_adapter(name, a)
    app = create_app(engine, "tiny")
    with running(app) as url:
        yield url, app.state.loop


def solo(tiny, prompt, adapter, max_tokens, extra=None):
    """The tokens of one request run alone on an engine of its own (same model and adapter objects)."""
    model, regs = tiny
    engine = Engine(model, num_blocks=64)
    for name, a in {**regs, **(extra or {})}.items():
        engine.add_adapter(name, a)
    params = SamplingParams(max_new_tokens=max_tokens, ignore_eos=True)
    return engine.generate(prompt, params, adapters=[adapter])[0].token_ids


def test_models_lists_base_and_adapters(server):
    url, _ = server
    client = openai.OpenAI(base_url=url + "/v1", api_key="unused", max_retries=0)
    ids = [m.id for m in client.models.list().data]
    assert ids == ["tiny", "ia3", "lora", "para", "victim"]
    assert client.models.retrieve("para").parent == "tiny" and client.models.retrieve("tiny").id == "tiny"
    with pytest.raises(openai.NotFoundError):
        client.models.retrieve("nope")
    assert httpx.get(url + "/health").json()["status"] == "ok"


def test_completions_and_chat_equal_engine_for_every_adapter(server, tiny):
    url, _ = server
    client = openai.OpenAI(base_url=url + "/v1", api_key="unused", max_retries=0)
    model, regs = tiny
    ref = Engine(model, num_blocks=64)
    for name, a in regs.items():
        ref.add_adapter(name, a)
    messages = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": PROMPTS[5]}]
    chat_ids = model.tokenizer.encode_chat(messages)
    for name in NAMES:
        w = ref.generate([PROMPTS[4], chat_ids], SamplingParams(max_new_tokens=6), adapters=[name, name])
        r = client.completions.create(
            model=name or "tiny", prompt=PROMPTS[4], max_tokens=6, temperature=0, extra_body={"return_token_ids": True}
        )
        assert (r.choices[0].text, r.choices[0].token_ids) == (w[0].text, w[0].token_ids), name
        assert r.usage.completion_tokens == len(w[0].token_ids) and r.model == (name or "tiny")
        r = client.chat.completions.create(model=name or "tiny", messages=messages, max_tokens=6, temperature=0)
        assert r.choices[0].message.content == w[1].text and r.choices[0].finish_reason == w[1].finish_reason, name
        assert (r.usage.prompt_tokens, r.usage.completion_tokens) == (len(chat_ids), len(w[1].token_ids))


def test_stream_stop_string_beams_and_raw_sse(server, tiny):
    url, _ = server
    client = openai.OpenAI(base_url=url + "/v1", api_key="unused", max_retries=0)
    model, regs = tiny
    ref = Engine(model, num_blocks=64)
    ref.add_adapter("lora", regs["lora"])
    full = ref.generate(PROMPTS[2], SamplingParams(max_new_tokens=12), adapters=["lora"])[0]
    # a stop string the model writes mid-answer: first seen after its 3rd token, so some chunks stream before it
    start = len(ref.tokenizer.decode(full.token_ids[:3]))
    stop = next(
        full.text[i : i + 3] for i in range(start, len(full.text) - 3) if full.text.find(full.text[i : i + 3]) == i
    )
    w = ref.generate(PROMPTS[2], SamplingParams(max_new_tokens=12, stop=(stop,)), adapters=["lora"])[0]
    assert w.finish_reason == "stop" and len(w.text) < len(full.text) and len(w.token_ids) >= 3
    stream = client.completions.create(
        model="lora",
        prompt=PROMPTS[2],
        max_tokens=12,
        temperature=0,
        stop=[stop],
        stream=True,
        extra_body={"return_token_ids": True},
    )
    chunks = list(stream)
    assert "".join(c.choices[0].text for c in chunks) == w.text  # never shows the stop string's start
    assert [t for c in chunks for t in c.choices[0].token_ids] == w.token_ids
    assert chunks[-1].choices[0].finish_reason == "stop" and len(chunks) > 2

    beams = ref.generate(PROMPTS[3], SamplingParams(max_new_tokens=6, beams=2))[0]
    r = client.completions.create(
        model="tiny", prompt=PROMPTS[3], max_tokens=6, temperature=0, extra_body={"beams": 2, "return_token_ids": True}
    )
    assert r.choices[0].token_ids == beams.token_ids and r.choices[0].text == beams.text

    body = {"model": "tiny", "prompt": PROMPTS[3], "max_tokens": 6, "temperature": 0, "stream": True}
    with httpx.stream("POST", url + "/v1/completions", json=body) as resp:
        assert resp.status_code == 200 and resp.headers["content-type"].startswith("text/event-stream")
        events = list(sse(resp))
    greedy = ref.generate(PROMPTS[3], SamplingParams(max_new_tokens=6))[0]
    assert events[-1] == "[DONE]" and "".join(e["choices"][0]["text"] for e in events[:-1]) == greedy.text
    assert [e["object"] for e in events[:-1]] == ["text_completion"] * (len(events) - 1)


def test_16_concurrent_streams_4_adapters_get_their_solo_tokens(server, tiny):
    url, loop = server
    engine = loop.engine
    want = [solo(tiny, p, NAMES[i % 4], 16) for i, p in enumerate(PROMPTS)]
    assert len({tuple(w) for w in want[:4]}) == 4  # the four tenants really differ
    mixes = []  # the adapters of each engine step's batch
    step = engine.step

    def recording_step():
        mixes.append({r.adapter for r in engine.running} | {r.adapter for r in engine.waiting})
        return step()

    engine.step = recording_step  # the engine thread looks the method up on each step

    async def one(client, i):
        model = NAMES[i % 4] or "tiny"
        stream = await client.completions.create(
            model=model,
            prompt=PROMPTS[i],
            max_tokens=16,
            temperature=0,
            stream=True,
            extra_body={"ignore_eos": True, "return_token_ids": True},
        )
        return [t async for c in stream for t in c.choices[0].token_ids]

    async def main():
        client = openai.AsyncOpenAI(base_url=url + "/v1", api_key="unused", max_retries=0)
        async with client:
            return await asyncio.gather(*(one(client, i) for i in range(16)))

    try:
        got = asyncio.run(main())
    finally:
        del engine.step
    assert got == want
    assert max(len(m) for m in mixes) == 4  # base, PARA, (IA)³ and LoRA rows in the same steps
    wait_idle(loop)
    assert engine.cache.allocator.num_free == engine.cache.num_blocks and len(engine.free_slots) == engine.max_batch


def test_adapter_loaded_and_unloaded_while_8_streams_run(server, tiny, tmp_path):
    url, loop = server
    model, regs = tiny
    fresh = adapters(model, seed=2)["lora"]
    save_adapter(fresh, tmp_path / "fresh")
    names = ["victim", None, "para", "victim", "ia3", "lora", None, "victim"]
    n_tokens = 400  # long enough that the load and the unload land mid-stream (checked: in_flight > 0)
    victim = {"victim": loop.engine.adapters["victim"]}
    ref = Engine(model, num_blocks=256)
    for name, a in {**regs, **victim}.items():
        ref.add_adapter(name, a)
    params = SamplingParams(max_new_tokens=n_tokens, ignore_eos=True)
    want = [o.token_ids for o in ref.generate(PROMPTS[:8], params, adapters=names)]
    want_fresh = solo(tiny, PROMPTS[9], "fresh", 8, {"fresh": fresh})

    async def stream(client, i, started):
        body = {"model": names[i] or "tiny", "prompt": PROMPTS[i], "max_tokens": n_tokens, "temperature": 0}
        body.update(stream=True, ignore_eos=True, return_token_ids=True)
        ids = []
        async with client.stream("POST", "/v1/completions", json=body) as resp:
            assert resp.status_code == 200
            async for line in resp.aiter_lines():
                if line.startswith("data: {"):
                    ids += json.loads(line[6:])["choices"][0]["token_ids"]
                    started[i].set()
        return ids

    async def main():
        async with httpx.AsyncClient(base_url=url, timeout=60) as client:
            started = [asyncio.Event() for _ in names]
            tasks = [asyncio.create_task(stream(client, i, started)) for i in range(len(names))]
            await asyncio.gather(*(e.wait() for e in started))
            loaded = await client.post("/v1/adapters", json={"name": "fresh", "path": str(tmp_path / "fresh")})
            gone = await client.delete("/v1/adapters/victim")
            refused = await client.post("/v1/completions", json={"model": "victim", "prompt": "x", "max_tokens": 2})
            body = {"model": "fresh", "prompt": PROMPTS[9], "max_tokens": 8, "temperature": 0}
            new = await client.post("/v1/completions", json={**body, "ignore_eos": True, "return_token_ids": True})
            listed = (await client.get("/v1/models")).json()
            running = not any(t.done() for t in tasks)
            return await asyncio.gather(*tasks), loaded, gone, refused, new, listed, running

    got, loaded, gone, refused, new, listed, still_running = asyncio.run(main())
    assert loaded.status_code == 200 and loaded.json()["id"] == "fresh"
    assert gone.status_code == 200 and gone.json()["in_flight"] == 3 and still_running
    assert refused.status_code == 404 and refused.json()["error"]["code"] == "model_not_found"
    assert new.status_code == 200 and new.json()["choices"][0]["token_ids"] == want_fresh
    assert [m["id"] for m in listed["data"]] == ["tiny", "fresh", "ia3", "lora", "para"]
    assert got == want  # every stream, the unloaded adapter's included, finished with its own tokens
    wait_idle(loop)
    assert "victim" not in loop.engine.adapters  # removed when its last request finished
    assert loop.engine.cache.allocator.num_free == loop.engine.cache.num_blocks
    # leave the module's server as it was
    assert httpx.delete(url + "/v1/adapters/fresh").json()["in_flight"] == 0
    asyncio.run(loop.load_adapter("victim", victim["victim"]))


def test_client_disconnect_aborts_and_frees_blocks(server):
    url, loop = server
    engine = loop.engine
    before = loop.finish_counts["abort"]
    body = {"model": "para", "prompt": PROMPTS[0], "max_tokens": 480, "temperature": 0, "stream": True}
    with httpx.stream("POST", url + "/v1/completions", json={**body, "ignore_eos": True}) as resp:
        for i, _ in enumerate(sse(resp)):
            if i == 3:
                assert engine.cache.allocator.num_free < engine.cache.num_blocks  # the request holds blocks
                break  # leaving the block closes the connection mid-stream
    wait_idle(loop, timeout=10)
    assert loop.finish_counts["abort"] == before + 1  # aborted, not finished by length
    assert engine.cache.allocator.num_free == engine.cache.num_blocks and len(engine.free_slots) == engine.max_batch

    # a non-streaming request whose client gives up is aborted too
    with pytest.raises(httpx.ReadTimeout):
        httpx.post(url + "/v1/completions", json={**body, "stream": False, "ignore_eos": True}, timeout=0.1)
    wait_idle(loop, timeout=10)
    assert loop.finish_counts["abort"] == before + 2
    assert engine.cache.allocator.num_free == engine.cache.num_blocks


def test_slow_client_does_not_stall_the_batch(server):
    """A stream nobody reads: the engine thread never waits for it, so another request completes meanwhile."""
    url, loop = server
    body = {"model": "tiny", "prompt": PROMPTS[1], "max_tokens": 200, "temperature": 0, "stream": True}
    with httpx.stream("POST", url + "/v1/completions", json={**body, "ignore_eos": True}) as slow:
        assert slow.status_code == 200
        t0 = time.monotonic()
        r = httpx.post(url + "/v1/completions", json={"model": "lora", "prompt": "x", "max_tokens": 8}, timeout=30)
        assert r.status_code == 200 and r.json()["usage"]["completion_tokens"] >= 1
        assert time.monotonic() - t0 < 30
        events = list(sse(slow))  # read late: nothing was lost
    assert events[-1] == "[DONE]" and sum(len(e["choices"][0]["text"]) > 0 for e in events[:-1]) > 10
    wait_idle(loop)


def test_bench_serve_load_runner_and_targets(server):
    """bench/serve.py's client side against the tiny server: token counts, latencies, paired ratios, the table."""
    from bench import serve as bs

    url, loop = server
    r = asyncio.run(bs.run_load(url, ["tiny", "para"], 2, 2, bs.prompts(4, 8), 4))
    assert (r["requests"], r["tokens"], len(r["ttft"])) == (4, 16, 4)
    assert 4 * 2 <= len(r["itl"]) <= 4 * 3  # a sample per token after the first event (which holds one or two)
    assert r["tps"] > 0 and min(r["ttft"]) > 0 and min(r["itl"]) >= 0
    slow = {**r, "tps": r["tps"] * 0.9}
    rows = [bs.make_row("base", 2, [r, r], 4), bs.make_row("para_ia3_mix", 2, [slow, slow], 4)]
    (t,) = bs.targets(rows)
    assert t["ratio"] == pytest.approx(0.9) and t["paired"] and t["met"] is False and t["goal"] == 0.95
    assert "| 2 | para_ia3_mix | 8 |" in bs.format_rows(rows) and "0.900x" in bs.format_rows(rows)
    assert bs.percentile([4, 1, 3, 2], 50) == 2.5 and bs.percentile([1, 2], 100) == 2
    wait_idle(loop)
