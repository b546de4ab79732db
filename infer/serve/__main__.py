"""`python -m infer.serve --model default [--adapter NAME=DIR ...] [--host 127.0.0.1] [--port 8000]
[--max-batch N] [--api-key KEY] [--device cpu] [--dtype float32]`: serve the model (named --served-model-name,
default the --model argument) and its adapters (named NAME) over OpenAI's HTTP API."""

from __future__ import annotations

import argparse
import os
import sys

from infer.cli import EXIT_BAD_INPUT, ArgumentParser, add_device_args, device_and_dtype

MISSING = "error: the server needs fastapi and uvicorn: pip install -e .[serve]"


def build_parser() -> argparse.ArgumentParser:
    p = ArgumentParser(prog="python -m infer.serve", description=__doc__.splitlines()[0])
    p.add_argument("--model", default="default", help="'default', a .gguf file, a Meta or an HF directory")
    p.add_argument("--served-model-name", help="the base model's name in requests (default: the --model argument)")
    p.add_argument(
        "--adapter", action="append", default=[], metavar="NAME=DIR", help="load an adapter at start (repeatable)"
    )
    p.add_argument("--host", default="127.0.0.1", help="bind address (default 127.0.0.1: this machine only)")
    p.add_argument("--port", type=int, default=8000)
    p.add_argument("--max-batch", type=int, default=32, help="sequences decoded together")
    p.add_argument("--max-queue", type=int, default=256, help="requests waiting for the batch before 503")
    p.add_argument("--num-blocks", type=int, help="KV pool size in blocks (default: a share of free memory)")
    p.add_argument(
        "--api-key",
        default=os.environ.get("PARALLAMA_API_KEY"),
        help="require 'Authorization: Bearer KEY' (default $PARALLAMA_API_KEY; unset: no auth)",
    )
    p.add_argument("--log-level", default="info", choices=["critical", "error", "warning", "info", "debug"])
    add_device_args(p)
    return p


def parse_adapters(specs: list[str]) -> dict[str, str]:
    """NAME=DIR pairs; ValueError with one line for a malformed or repeated name."""
    out: dict[str, str] = {}
    for spec in specs:
        name, sep, path = spec.partition("=")
        if not sep or not name or not path:
            raise ValueError(f"--adapter {spec!r}: expected NAME=DIR")
        if name in out:
            raise ValueError(f"--adapter: the name {name!r} is given twice")
        out[name] = path
    return out


def main(argv: list[str] | None = None) -> int:
    a = build_parser().parse_args(argv)
    try:
        import fastapi  # noqa: F401
        import uvicorn
    except ImportError:
        print(MISSING, file=sys.stderr)
        return EXIT_BAD_INPUT
    try:
        adapters = parse_adapters(a.adapter)
        device, dtype = device_and_dtype(a)
        name = a.served_model_name or a.model
        if name in adapters:
            raise ValueError(f"--adapter {name}: the base model is served under that name")
        if min(a.max_batch, a.max_queue, a.num_blocks or 1) < 1 or not 0 <= a.port < 65536:
            raise ValueError("--max-batch, --max-queue and --num-blocks must be >= 1, --port in 0..65535")
    except ValueError as e:
        print(f"error: {e}", file=sys.stderr)
        return EXIT_BAD_INPUT

    from infer.engine import Engine
    from infer.serve.app import create_app
    from model import Llama
    from model.peft import AdapterError
    from weights.adapters import load_adapter

    try:
        model = Llama.from_pretrained(a.model, dtype=dtype, device=device)
        engine = Engine(model, max_batch=a.max_batch, num_blocks=a.num_blocks)
        for n, path in adapters.items():
            engine.add_adapter(n, load_adapter(path, model))
    except (ValueError, OSError, AdapterError) as e:
        print(f"error: {e}", file=sys.stderr)
        return EXIT_BAD_INPUT
    app = create_app(engine, name, api_key=a.api_key, max_waiting=a.max_queue)
    print(
        f"serving {name!r} (+ {len(adapters)} adapters) on http://{a.host}:{a.port}/v1"
        + (" (bearer key required)" if a.api_key else ""),
        file=sys.stderr,
        flush=True,
    )
    uvicorn.run(app, host=a.host, port=a.port, log_level=a.log_level)
    return 0


if __name__ == "__main__":
    sys.exit(main())
