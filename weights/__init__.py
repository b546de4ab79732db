"""Weight formats → (ModelArgs, Meta-named state dict, tokenizer). One loader per format."""

from __future__ import annotations

import os
from pathlib import Path

from weights.adapters import load_adapter, save_adapter
from weights.common import Checkpoint, CheckpointError


def load_checkpoint(source: str | os.PathLike[str]) -> Checkpoint:
    """Dispatch on the source: "default", a .gguf file, a Meta dir (params.json), an HF dir (config.json)."""
    if str(source) == "default":
        from weights.default import load_default

        return load_default()
    path = Path(source)
    if path.is_file() and path.suffix == ".gguf":
        from weights.gguf_file import load_gguf

        return load_gguf(path)
    if path.is_dir() and (path / "params.json").exists():
        from weights.meta import load_meta

        return load_meta(path)
    if path.is_dir() and (path / "config.json").exists():
        from weights.hf import load_hf

        return load_hf(path)
    raise CheckpointError(
        f"unknown model source {str(source)!r}: expected 'default', a .gguf file, "
        "a Meta directory (params.json) or an HF directory (config.json)"
    )


__all__ = ["Checkpoint", "CheckpointError", "load_adapter", "load_checkpoint", "save_adapter"]
