"""Test-side helpers for the server: a real uvicorn on a free port of 127.0.0.1 in a thread, a tiny random model
that speaks SmolLM2's tokenizer (fast steps, real text and chat template), adapters that really change it,
and an SSE reader for raw httpx streams."""

from __future__ import annotations

import contextlib
import json
import threading
import time
from collections.abc import Iterator
from typing import Any

import torch

from tests.helpers import random_meta_state_dict


@contextlib.contextmanager
def running(app: Any) -> Iterator[str]:
    """Serve `app` on 127.0.0.1 (a port the OS picks) until the block ends; yields the base URL."""
    import uvicorn

    server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=0, log_level="warning", lifespan="on"))
    thread = threading.Thread(target=server.run, name="uvicorn-test", daemon=True)
    thread.start()
    deadline = time.monotonic() + 30
    while not server.started:
        assert thread.is_alive() and time.monotonic() < deadline, "uvicorn did not start"
        time.sleep(0.01)
    port = server.servers[0].sockets[0].getsockname()[1]
    try:
        yield f"http://127.0.0.1:{port}"
    finally:
        server.should_exit = True
        thread.join(30)
        assert not thread.is_alive(), "uvicorn did not stop"


def tiny_model(tokenizer: Any, dim: int = 64, seed: int = 0, max_seq_len: int = 512):
    """A 2-layer random model over `tokenizer`'s vocab (SmolLM2's: real text, a chat template); a step costs
    about a millisecond, so tests can run long streams and many solo references."""
    from model import Llama, ModelArgs

    vocab = tokenizer.vocab_size
    sd = random_meta_state_dict(dim, 2, 4, 2, vocab, 96, seed)
    with torch.device("meta"):
        model = Llama(
            ModelArgs(
                dim=dim, n_layers=2, n_heads=4, n_kv_heads=2, vocab_size=vocab, hidden_dim=96, max_seq_len=max_seq_len
            )
        )
    model.load_weights(sd)
    model.setup_rope("cpu")
    model.tokenizer = tokenizer
    return model.eval()


def adapters(model: Any, seed: int = 0) -> dict[str, Any]:
    """Fresh PARA, (IA)³ and LoRA adapters with every parameter moved off its identity init, so each one
    changes what the model writes. They depend on `seed` alone: the init's draws from the global RNG run
    under that seed too (a module fixture is built before the per-test reseed, after whatever ran last)."""
    from model.peft import IA3Config, LoRAConfig, PARAConfig, create_adapter

    out = {}
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        for name, config in (("para", PARAConfig()), ("ia3", IA3Config()), ("lora", LoRAConfig(r=4))):
            a = create_adapter(model, config)
            with torch.no_grad():
                for p in a.parameters():
                    p.add_(torch.randn(p.shape) * 0.3)
            out[name] = a.eval()
    return out


def sse(response: Any) -> Iterator[dict[str, Any] | str]:
    """The `data:` payloads of an httpx streaming response: parsed JSON objects, then "[DONE]"."""
    for line in response.iter_lines():
        if line.startswith("data: "):
            data = line[len("data: ") :]
            yield data if data == "[DONE]" else json.loads(data)


def wait_idle(loop: Any, timeout: float = 30.0) -> None:
    """Until the engine thread has nothing running or waiting (its counters are read, not changed)."""
    engine = loop.engine
    deadline = time.monotonic() + timeout
    while engine.running or engine.waiting or loop.waiting() or loop.in_flight:
        assert time.monotonic() < deadline, "the engine did not go idle"
        time.sleep(0.01)
