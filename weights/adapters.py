"""Adapter files: a directory holding `adapter_model.safetensors` + `adapter_config.json`.

PARA's config holds {"method": "para", r, activation, adjust, pool_norm, base_model} (a file without pool_norm,
written before it existed, is the paper's form: pool_norm false); LoRA / (IA)³ configs are exactly
peft's, and their base_model goes into the safetensors header instead (peft warns about unknown config
keys), so a directory moves between parallama and `peft.PeftModel.from_pretrained` both ways.
A save replaces the whole directory in one rename (weights.io.atomic_dir): a reader sees the old pair or the
new pair, never one file of each.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file

from model.checks import check_tensors
from model.peft.adapters import METHODS, PEFT_TYPES, SHAPE_FIELDS, fingerprint_diff, model_fingerprint
from model.peft.base import Adapter, AdapterError
from weights.io import atomic_dir, find_dir, read_json

if TYPE_CHECKING:
    from model import Llama

WEIGHTS, CONFIG = "adapter_model.safetensors", "adapter_config.json"


def write_adapter(adapter: Adapter, directory: Path) -> None:
    """Write the two files into an existing directory (no atomicity: callers fill a temp directory)."""
    config = adapter.file_config()
    fp = adapter.base_fingerprint or {f: getattr(adapter.args, f) for f in SHAPE_FIELDS}
    metadata = {"format": "pt"}
    if "peft_type" in config:
        metadata["parallama_base_model"] = json.dumps(fp)
    else:
        config["base_model"] = fp
    tensors = {k: v.detach().contiguous().cpu() for k, v in adapter.file_tensors().items()}
    save_file(tensors, directory / WEIGHTS, metadata=metadata)
    (directory / CONFIG).write_text(json.dumps(config, indent=2) + "\n")


def save_adapter(adapter: Adapter, directory: str | os.PathLike[str]) -> Path:
    """Write the adapter into `directory` (created, or replaced whole if it holds only an adapter's files)."""
    target = Path(directory)
    if getattr(adapter, "tp_shard", None) is not None:
        raise AdapterError(f"{target}: this is one tensor-parallel rank's shard of an adapter; save the whole adapter")
    if target.exists():
        if not target.is_dir():
            raise AdapterError(f"{target}: exists and is not a directory")
        other = sorted(p.name for p in target.iterdir() if p.name not in (WEIGHTS, CONFIG, "adapter_model.bin"))
        if other:  # the swap replaces the directory: never take someone's other files with it
            raise AdapterError(f"{target}: holds other files ({', '.join(other[:3])}); save into an adapter directory")
    return atomic_dir(target, lambda tmp: write_adapter(adapter, tmp))


def _read_config(path: Path) -> dict[str, Any]:
    if not path.is_file():
        raise AdapterError(f"{path}: not found (an adapter directory holds {CONFIG} and {WEIGHTS})")
    return read_json(path, AdapterError)


def _read_tensors(directory: Path) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    """(tensors, safetensors header metadata)."""
    path = directory / WEIGHTS
    if path.is_file():
        try:
            with safe_open(path, "pt") as f:
                metadata = f.metadata() or {}
            return load_file(path), metadata
        except Exception as e:  # safetensors raises its own error types for torn or foreign files
            raise AdapterError(f"{path}: cannot read safetensors ({e})") from None
    legacy = directory / "adapter_model.bin"  # what older peft versions wrote
    if legacy.is_file():
        try:
            return torch.load(legacy, map_location="cpu", weights_only=True), {}
        except Exception as e:
            raise AdapterError(f"{legacy}: cannot read ({e})") from None
    raise AdapterError(f"{path}: not found")


def _check_base(fp: object, model: Llama, where: Path, check_weights: bool) -> None:
    if not isinstance(fp, dict):
        return  # written by peft: only tensor shapes can be checked
    diff = fingerprint_diff(fp, model)
    if diff:
        raise AdapterError(
            f"{where}: adapter was made for another base model (adapter vs this model: {', '.join(diff)})"
        )
    diff = fingerprint_diff(fp, model, ("weights_sha256",)) if check_weights else []
    if diff:
        raise AdapterError(
            f"{where}: adapter was trained on a base model with other weights ({diff[0]}); "
            "pass check_base=False to load it anyway"
        )


def load_adapter(directory: str | os.PathLike[str], model: Llama, check_base: bool = True) -> Adapter:
    """Load an adapter saved by `save_adapter` (or a peft LoRA / (IA)³ adapter for the same base model)
    onto `model`'s device and dtype, in eval mode. Any mismatch is a one-line `AdapterError` naming the
    file and the field or tensor; `check_base=False` skips the weight-hash check (shapes are always checked)."""
    directory = Path(directory)
    directory = find_dir(directory, CONFIG) or directory  # after a crash mid-save: the previous adapter
    if not directory.is_dir():
        raise AdapterError(f"{directory}: not an adapter directory")
    where = directory / CONFIG
    config = _read_config(where)
    method = config.get("method") or PEFT_TYPES.get(config.get("peft_type"))
    if method not in METHODS:
        found = config.get("method") or config.get("peft_type")
        raise AdapterError(f"{where}: unknown adapter method {found!r} (supported: para, LORA, IA3)")
    tensors, metadata = _read_tensors(directory)
    fingerprint = config.get("base_model")
    if "parallama_base_model" in metadata:
        try:
            fingerprint = json.loads(metadata["parallama_base_model"])
        except json.JSONDecodeError:
            raise AdapterError(f"{directory / WEIGHTS}: header field parallama_base_model is not JSON") from None
    _check_base(fingerprint, model, where, check_base)
    adapter = METHODS[method].from_file(model.args, config, where)
    check_tensors(tensors, adapter.file_tensors(), str(directory / WEIGHTS), AdapterError)
    adapter.load_file_tensors(tensors, where)
    adapter.base_fingerprint = model_fingerprint(model)
    tp = getattr(model, "tp", None)
    if tp is not None and tp.size > 1:  # one file for every tp: each rank keeps its slice (model/tp.py)
        adapter = tp.shard_adapter(adapter, model.args)
    w = model.tok_embeddings.weight
    adapter = adapter.to(device=w.device, dtype=w.dtype).eval()
    model.requires_grad_(False)
    return adapter
