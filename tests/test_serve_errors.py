"""The server's error answers (OpenAI's JSON shape, the right status, never a traceback), its bearer-key
auth, the 503 of a full waiting line, and `python -m infer.serve`'s one-line exits."""

from __future__ import annotations

import json
import sys

import pytest

pytest.importorskip("fastapi")
pytest.importorskip("uvicorn")
openai = pytest.importorskip("openai")
httpx = pytest.importorskip("httpx")

from infer.engine import Engine  # noqa: E402
from infer.serve.__main__ import main  # noqa: E402
from infer.serve.app import create_app  # noqa: E402
from tests.serve_helpers import adapters, running, sse, tiny_model, wait_idle  # noqa: E402
from weights.adapters import save_adapter  # noqa: E402


@pytest.fixture(scope="module")
def tiny(smollm2, one_torch_thread):
    model = tiny_model(smollm2.tokenizer)
    return model, adapters(model)


@pytest.fixture(scope="module")
def server(tiny):
    model, regs = tiny
    engine = Engine(model, num_blocks=64)
    engine.add_adapter("para", regs["para"])
    with running(create_app(engine, "tiny")) as url:
        yield url


@pytest.fixture(scope="module")
def adapter_dirs(tiny, smollm2, tmp_path_factory):
    """A good LoRA, one made for another base model (same vocab, other width), and a corrupt one."""
    model, regs = tiny
    root = tmp_path_factory.mktemp("adapters")
    save_adapter(regs["lora"], root / "lora")
    other = tiny_model(smollm2.tokenizer, dim=32)
    save_adapter(adapters(other)["para"], root / "other")
    save_adapter(regs["ia3"], root / "corrupt")
    (root / "corrupt" / "adapter_model.safetensors").write_bytes(b"\x00not a safetensors file")
    return root


def check_error(resp: httpx.Response, status: int, *words: str) -> dict:
    """`status`, OpenAI's error shape, a one-line message holding `words`; no traceback."""
    assert resp.status_code == status, resp.text
    assert resp.headers["content-type"].startswith("application/json")
    err = resp.json()["error"]
    assert set(err) == {"message", "type", "param", "code"}
    assert isinstance(err["message"], str) and "\n" not in err["message"] and "Traceback" not in resp.text
    assert err["type"] == ("server_error" if status >= 500 else "invalid_request_error")
    for w in words:
        assert w in err["message"], err["message"]
    return err


BAD = [
    ({"prompt": "x", "temperature": -1}, "temperature", "temperature"),
    ({"prompt": "x", "top_p": 0}, "top_p", "top_p"),
    ({"prompt": "x", "max_tokens": 0}, "max_tokens", "max_tokens"),
    ({"prompt": "x", "beams": 0}, "beams", "beams"),
    ({"prompt": "x", "top_k": -2}, "top_k", "top_k"),
    ({"prompt": "x", "stop": [""]}, "stop strings must be non-empty", None),
    ({"prompt": "x", "n": 2}, "n > 1 is not supported", "n"),
    ({"prompt": "x", "logprobs": 2}, "logprobs is not supported", "logprobs"),
    ({"prompt": ["a", "b"]}, "one prompt per request", "prompt"),
    ({"prompt": 5}, "prompt", "prompt"),
    ({}, "prompt", "prompt"),
    ({"prompt": ""}, "prompt is empty", None),
    ({"prompt": [5] * 600}, "exceeds the context (512)", None),
    ({"prompt": "hello " * 300, "max_tokens": 300}, "exceeds the context", None),
    ({"prompt": [10**6]}, "outside the vocabulary", None),
    ({"prompt": "x", "stream_options": {"include_usage": True}}, "stream_options", "stream_options"),
]


@pytest.mark.parametrize("body, words, param", BAD)
def test_bad_parameters_are_400(server, body, words, param):
    err = check_error(httpx.post(server + "/v1/completions", json={"model": "tiny", **body}), 400, words)
    assert err["param"] == param


def test_every_error_case_has_its_status_and_body(server, adapter_dirs):
    url = server
    post = lambda path, **kw: httpx.post(url + path, **kw)  # noqa: E731
    raw = {"content-type": "application/json"}
    check_error(post("/v1/completions", content=b'{"model": "tiny", "prompt": ', headers=raw), 400, "malformed JSON")
    check_error(post("/v1/chat/completions", content=b"[1, 2", headers=raw), 400, "malformed JSON")
    check_error(post("/v1/completions", content=b"[1, 2]", headers=raw), 400, "must be a JSON object")
    form = post("/v1/completions", content=b'{"model": "tiny", "prompt": "x"}', headers={"content-type": "text/plain"})
    check_error(form, 400, "Content-Type: application/json")
    check_error(post("/v1/chat/completions", json={"model": "tiny", "messages": []}), 400, "messages")
    msg = {"model": "tiny", "messages": [{"role": "wizard", "content": "hi"}]}
    check_error(post("/v1/chat/completions", json=msg), 400, "role")
    msg = {"model": "tiny", "messages": [{"role": "user", "content": "hi"}], "n": 3}
    check_error(post("/v1/chat/completions", json=msg), 400, "n > 1")
    msg = {"model": "tiny", "messages": [{"role": "user", "content": "hi " * 600}]}
    check_error(post("/v1/chat/completions", json=msg), 400, "exceeds the context")

    # 404: an unknown model or adapter, an unknown route
    err = check_error(post("/v1/completions", json={"model": "gpt-4", "prompt": "x"}), 404, "gpt-4")
    assert (err["param"], err["code"]) == ("model", "model_not_found")
    msg = {"model": "nope", "messages": [{"role": "user", "content": "hi"}], "stream": True}
    check_error(post("/v1/chat/completions", json=msg), 404, "nope")
    check_error(httpx.delete(url + "/v1/adapters/nope"), 404, "nope")
    check_error(httpx.get(url + "/v1/nothing-here"), 404)

    # adapters: 409 for a name that exists, 422 for what the loader refuses, 400 for a bad body
    good = str(adapter_dirs / "lora")
    err = check_error(post("/v1/adapters", json={"name": "para", "path": good}), 409, "para")
    assert err["code"] == "model_exists"
    check_error(post("/v1/adapters", json={"name": "tiny", "path": good}), 409, "tiny")
    err = check_error(post("/v1/adapters", json={"name": "x", "path": str(adapter_dirs / "other")}), 422)
    assert "another base model" in err["message"] and err["param"] == "path"
    err = check_error(post("/v1/adapters", json={"name": "x", "path": str(adapter_dirs / "corrupt")}), 422)
    assert "cannot read safetensors" in err["message"]
    check_error(post("/v1/adapters", json={"name": "x", "path": str(adapter_dirs / "missing")}), 422, "missing")
    check_error(post("/v1/adapters", json={"name": "x"}), 400, "path")
    check_error(post("/v1/adapters", json={"name": "bad name!", "path": good}), 400, "name")
    assert "x" not in [m["id"] for m in httpx.get(url + "/v1/models").json()["data"]]

    # the same through the official client: its typed exceptions
    client = openai.OpenAI(base_url=url + "/v1", api_key="unused", max_retries=0)
    with pytest.raises(openai.NotFoundError, match="does not exist"):
        client.completions.create(model="gpt-4", prompt="x")
    with pytest.raises(openai.BadRequestError, match="n > 1"):
        client.chat.completions.create(model="tiny", messages=[{"role": "user", "content": "x"}], n=2)


def test_load_then_unload_an_adapter(server, adapter_dirs, tiny):
    url = server
    r = httpx.post(url + "/v1/adapters", json={"name": "lora2", "path": str(adapter_dirs / "lora")})
    assert r.status_code == 200 and r.json() == {**r.json(), "id": "lora2", "object": "model", "parent": "tiny"}
    ok = httpx.post(url + "/v1/completions", json={"model": "lora2", "prompt": "x", "max_tokens": 3})
    assert ok.status_code == 200 and ok.json()["usage"]["completion_tokens"] >= 1
    check_error(httpx.post(url + "/v1/adapters", json={"name": "lora2", "path": str(adapter_dirs / "lora")}), 409)
    assert httpx.delete(url + "/v1/adapters/lora2").json() == {
        "id": "lora2",
        "object": "model",
        "deleted": True,
        "in_flight": 0,
    }
    check_error(httpx.post(url + "/v1/completions", json={"model": "lora2", "prompt": "x"}), 404)
    check_error(httpx.delete(url + "/v1/adapters/lora2"), 404)


def test_full_waiting_line_is_503_with_retry_after(tiny):
    """One request runs (max_batch 1), one waits (max_waiting 1): the next is refused, and none is dropped."""
    model, _ = tiny
    app = create_app(Engine(model, num_blocks=64, max_batch=1), "tiny", max_waiting=1)
    body = {"model": "tiny", "prompt": "a b c", "max_tokens": 480, "ignore_eos": True, "stream": True}
    with (
        running(app) as url,
        httpx.Client(base_url=url, timeout=60) as c1,
        httpx.Client(base_url=url, timeout=60) as c2,
    ):
        with c1.stream("POST", "/v1/completions", json=body) as first:
            it = sse(first)
            next(it)  # admitted and running
            with c2.stream("POST", "/v1/completions", json={**body, "max_tokens": 4}) as second:
                assert second.status_code == 200  # accepted: it waits for the batch
                full = httpx.post(url + "/v1/completions", json={**body, "stream": False})
                err = check_error(full, 503, "overloaded")
                assert full.headers["retry-after"] == "1" and err["code"] == "overloaded"
                client = openai.OpenAI(base_url=url + "/v1", api_key="unused", max_retries=0)
                with pytest.raises(openai.InternalServerError):
                    client.completions.create(model="tiny", prompt="x")
                rest = list(it)
                events = list(sse(second))
            assert rest[-1] == events[-1] == "[DONE]"
            assert events[-2]["choices"][0]["finish_reason"] == "length"
        wait_idle(app.state.loop)


def test_auth(tiny):
    model, _ = tiny
    app = create_app(Engine(model, num_blocks=16), "tiny", api_key="s3cret")
    with running(app) as url:
        body = {"model": "tiny", "prompt": "x", "max_tokens": 2}
        check_error(httpx.post(url + "/v1/completions", json=body), 401, "Missing")
        check_error(httpx.get(url + "/v1/models"), 401)
        check_error(httpx.post(url + "/v1/adapters", json={"name": "a", "path": "/tmp"}), 401)
        check_error(httpx.delete(url + "/v1/adapters/a"), 401)
        wrong = {"Authorization": "Bearer nope"}
        err = check_error(httpx.post(url + "/v1/completions", json=body, headers=wrong), 401, "Incorrect")
        assert err["code"] == "invalid_api_key"
        check_error(httpx.post(url + "/v1/completions", json=body, headers={"Authorization": "s3cret"}), 401)
        ok = httpx.post(url + "/v1/completions", json=body, headers={"Authorization": "Bearer s3cret"})
        assert ok.status_code == 200
        assert httpx.get(url + "/health").status_code == 200  # the probe stays open
        with pytest.raises(openai.AuthenticationError):
            openai.OpenAI(base_url=url + "/v1", api_key="nope", max_retries=0).models.list()
        models = openai.OpenAI(base_url=url + "/v1", api_key="s3cret", max_retries=0).models.list()
        assert [m.id for m in models.data] == ["tiny"]


def test_engine_failure_is_a_500_without_traceback(tiny):
    """A step that raises fails its requests (JSON 500, or an error event in a stream); the server goes on."""
    model, _ = tiny
    engine = Engine(model, num_blocks=32)
    failures = [RuntimeError("boom in a kernel"), RuntimeError("boom again")]
    step = engine.step

    def failing_step():
        if failures:
            raise failures.pop(0)
        return step()

    engine.step = failing_step
    body = {"model": "tiny", "prompt": "x", "max_tokens": 4}
    with running(create_app(engine, "tiny")) as url:
        r = httpx.post(url + "/v1/completions", json=body)
        check_error(r, 500, "the engine failed")
        assert "boom" not in r.text
        with httpx.stream("POST", url + "/v1/completions", json={**body, "stream": True}) as resp:
            events = list(sse(resp))
        assert events[0]["error"]["code"] == "engine_error" and events[-1] == "[DONE]"
        ok = httpx.post(url + "/v1/completions", json=body)
        assert ok.status_code == 200 and ok.json()["usage"]["completion_tokens"] >= 1
        assert engine.cache.allocator.num_free == engine.cache.num_blocks


# ---- the command line ----------------------------------------------------------------------------------------
@pytest.mark.parametrize(
    "argv, message",
    [
        (["--adapter", "no-equals-sign"], "expected NAME=DIR"),
        (["--adapter", "a=x", "--adapter", "a=y"], "given twice"),
        (["--adapter", "default=x"], "base model is served under that name"),
        (["--max-batch", "0"], "--max-batch"),
        (["--device", "nonsense"], "not a device"),
        (["--model", "no-such-model"], "unknown model source 'no-such-model'"),
    ],
)
def test_cli_bad_arguments_exit_2_with_one_line(argv, message, capsys):
    assert main(argv) == 2
    err = capsys.readouterr().err.strip()
    assert message in err and "\n" not in err and "Traceback" not in err


def test_cli_parser_errors_and_missing_extra(capsys, monkeypatch):
    with pytest.raises(SystemExit) as e:
        main(["--dtype", "float64"])
    assert e.value.code == 2 and capsys.readouterr().err.count("\n") == 1
    monkeypatch.setitem(sys.modules, "fastapi", None)  # as if the serve extra were not installed
    assert main([]) == 2
    assert capsys.readouterr().err.strip() == "error: the server needs fastapi and uvicorn: pip install -e .[serve]"


def test_cli_loads_model_and_adapters_and_serves(monkeypatch, tiny, adapter_dirs, capsys):
    """main() wires --model/--device/--dtype/--adapter/--max-batch/--api-key into the app it hands uvicorn."""
    import torch
    import uvicorn

    from model import Llama

    model, _ = tiny
    seen = {}
    monkeypatch.setattr(Llama, "from_pretrained", lambda source, **kw: seen.update(source=source, **kw) or model)
    monkeypatch.setattr(uvicorn, "run", lambda app, **kw: seen.update(app=app, **kw))
    argv = ["--model", "m.gguf", "--served-model-name", "m", "--adapter", f"lo={adapter_dirs / 'lora'}"]
    argv += ["--dtype", "bfloat16", "--max-batch", "4", "--port", "8123", "--api-key", "k"]
    assert main(argv) == 0
    assert (seen["source"], seen["dtype"], seen["device"]) == ("m.gguf", torch.bfloat16, torch.device("cpu"))
    assert (seen["host"], seen["port"]) == ("127.0.0.1", 8123)
    loop = seen["app"].state.loop
    assert loop.model_name == "m" and loop.adapters() == ["lo"] and loop.engine.max_batch == 4
    assert "bearer key required" in capsys.readouterr().err
    assert main(["--adapter", f"x={adapter_dirs / 'other'}"]) == 2
    assert "another base model" in capsys.readouterr().err


def test_errors_json_is_one_object(server):
    """A 4xx body is exactly one JSON object (clients json.loads it whole)."""
    r = httpx.post(server + "/v1/completions", json={"model": "tiny", "prompt": "x", "n": 5})
    assert json.loads(r.text)["error"]["code"] == "unsupported_parameter"
