"""What every loader returns, and the one error type for bad checkpoints."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch

from model.args import ModelArgs
from weights import io


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


def read_json(path: Path) -> dict:
    return io.read_json(path, CheckpointError)


def load_tokenizer(load: Callable[[], object], where: str | Path | None = None) -> object:
    """Run a tokenizer constructor, turning its one-line ValueError into a CheckpointError."""
    try:
        return load()
    except ValueError as e:
        raise CheckpointError(f"{where}: {e}" if where else str(e)) from None
