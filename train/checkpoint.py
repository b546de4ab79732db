"""The resume checkpoint OUT/last: the adapter files (a loadable adapter directory) + trainer_state.pt
(optimizer, scheduler, step and early-stopping counters, the run's settings). Replaced atomically.

A new checkpoint is written into a temp directory beside the target, then swapped in with two renames
(target → .last.old, temp → target). A crash between them leaves `.last.old`, which `load` falls back to.
"""

from __future__ import annotations

import os
import shutil
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

from model.peft import Adapter, load_adapter

STATE = "trainer_state.pt"


def _old(target: Path) -> Path:
    return target.with_name(f".{target.name}.old")


def swap_in(target: str | os.PathLike[str], write: Callable[[Path], None]) -> Path:
    """Call `write(tmp)` to fill a temp directory beside `target`, then swap it in (target → .old,
    temp → target): a crash leaves the old directory or the new one, never a torn mix."""
    target = Path(target)
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(dir=target.parent, prefix=f".{target.name}.tmp-"))
    try:
        write(tmp)
        old = _old(target)
        shutil.rmtree(old, ignore_errors=True)
        if target.exists():
            os.replace(target, old)
        os.replace(tmp, target)
        shutil.rmtree(old, ignore_errors=True)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return target


def save(target: str | os.PathLike[str], adapter: Adapter, state: dict[str, Any]) -> Path:
    """Write adapter + state into `target`, replacing what was there in one step."""

    def write(tmp: Path) -> None:
        adapter.save(tmp)
        torch.save(state, tmp / STATE)

    return swap_in(target, write)


def find(target: str | os.PathLike[str]) -> Path | None:
    """The checkpoint directory to resume from (the target, or its leftover after a crash mid-swap), or None."""
    target = Path(target)
    for d in (target, _old(target)):
        if (d / STATE).is_file():
            return d
    return None


def load(directory: Path, model: Any, adapter: Adapter) -> dict[str, Any]:
    """Copy the saved adapter tensors into `adapter` (in place: the optimizer holds its parameters) and
    return the trainer state (tensors on the adapter's device)."""
    saved = load_adapter(directory, model)
    with torch.no_grad():
        adapter.load_state_dict(saved.state_dict())
    device = next(adapter.parameters()).device
    return torch.load(directory / STATE, map_location=device, weights_only=True)
