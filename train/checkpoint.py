"""The resume checkpoint OUT/last: the adapter files (a loadable adapter directory) + trainer_state.pt
(optimizer, scheduler, step and early-stopping counters, the run's settings). Replaced atomically.

A new checkpoint is written into a temp directory beside the target, then swapped in (weights.io.atomic_dir:
target → .last.old, temp → target); a crash between the two renames leaves `.last.old`, which `find` returns.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import torch

from model.peft import Adapter
from weights.adapters import load_adapter, write_adapter
from weights.io import atomic_dir, find_dir

STATE = "trainer_state.pt"


def save(target: str | os.PathLike[str], adapter: Adapter, state: dict[str, Any]) -> Path:
    """Write adapter + state into `target`, replacing what was there in one step."""

    def write(tmp: Path) -> None:
        write_adapter(adapter, tmp)
        torch.save(state, tmp / STATE)

    return atomic_dir(target, write)


def find(target: str | os.PathLike[str]) -> Path | None:
    """The checkpoint directory to resume from (the target, or its leftover after a crash mid-swap), or None."""
    return find_dir(target, STATE)


def load(directory: Path, model: Any, adapter: Adapter) -> dict[str, Any]:
    """Copy the saved adapter tensors into `adapter` (in place: the optimizer holds its parameters) and
    return the trainer state (tensors on the adapter's device)."""
    saved = load_adapter(directory, model)
    with torch.no_grad():
        adapter.load_state_dict(saved.state_dict())
    device = next(adapter.parameters()).device
    return torch.load(directory / STATE, map_location=device, weights_only=True)
