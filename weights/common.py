"""What every loader returns, and the one error type for bad checkpoints."""

from __future__ import annotations

import json
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch

from model.args import ModelArgs


class CheckpointError(ValueError):
    """A checkpoint that cannot be used; the message is one line naming the file and field."""


@dataclass
class Checkpoint:
    args: ModelArgs
    state_dict: dict[str, torch.Tensor]  # Meta names (tok_embeddings.weight, layers.0.attention.wq.weight, …)
    tokenizer: object  # weights.tokenizer.Tokenizer
    path: Path


def require(d: dict, key: str, where: str | Path):
    """d[key], or a one-line CheckpointError naming the file and the missing field."""
    if key not in d:
        raise CheckpointError(f"{where}: missing required field '{key}'")
    return d[key]


def brief(e: BaseException, limit: int = 80) -> str:
    """A library's error as a short phrase: its first line, clipped (some run to kilobytes)."""
    lines = str(e).strip().splitlines()
    line = lines[0] if lines else type(e).__name__
    return line if len(line) <= limit else line[: limit - 1] + "…"


def read_json(path: Path) -> dict:
    try:
        d = json.loads(path.read_text())
    except (OSError, ValueError) as e:  # ValueError: JSONDecodeError, UnicodeDecodeError (a binary file)
        raise CheckpointError(f"{path}: cannot read ({brief(e)})") from None
    if not isinstance(d, dict):
        raise CheckpointError(f"{path}: expected a JSON object, got {type(d).__name__}")
    return d


def load_tokenizer(load: Callable[[], object], where: str | Path | None = None) -> object:
    """Run a tokenizer constructor, turning its one-line ValueError into a CheckpointError."""
    try:
        return load()
    except ValueError as e:
        raise CheckpointError(f"{where}: {e}" if where else str(e)) from None
