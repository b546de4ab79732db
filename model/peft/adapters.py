"""Making, saving and loading adapters of any method.

A saved adapter is a directory: `adapter_model.safetensors` + `adapter_config.json`. PARA's config holds
{"method": "para", r, activation, adjust, base_model}; LoRA / (IA)³ configs are exactly peft's, and
their base_model goes into the safetensors header instead (peft warns about unknown config keys).
base_model is the base model's fingerprint (shape fields and a hash of a few weights), so an adapter
cannot silently land on another model.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import tempfile
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file

from model.peft.base import Adapter, AdapterError
from model.peft.ia3 import IA3Adapter, IA3Config
from model.peft.lora import LoRAAdapter, LoRAConfig
from model.peft.para import PARAAdapter, PARAConfig

if TYPE_CHECKING:
    from model.llama import Llama

CONFIG_CLASSES: dict[type, type[Adapter]] = {PARAConfig: PARAAdapter, IA3Config: IA3Adapter, LoRAConfig: LoRAAdapter}
METHODS: dict[str, type[Adapter]] = {cls.method: cls for cls in CONFIG_CLASSES.values()}
PEFT_TYPES = {"LORA": "lora", "IA3": "ia3"}
WEIGHTS, CONFIG = "adapter_model.safetensors", "adapter_config.json"
SHAPE_FIELDS = ("dim", "n_layers", "n_heads", "n_kv_heads", "head_dim", "ffn_dim", "vocab_size")


def model_fingerprint(model: Llama) -> dict[str, Any]:
    """Shape fields plus a hash of the 8 largest-magnitude values among the first 4096 of three weights,
    rounded to bf16: the same model loaded in fp32, fp16 or bf16 hashes alike, another model does not."""
    a = model.args
    fp: dict[str, Any] = {f: getattr(a, f) for f in SHAPE_FIELDS}
    weights = (
        model.tok_embeddings.weight,
        model.layers[0].attention.wqkv,
        model.layers[-1].feed_forward.w2.weight,
    )
    if any(w.device.type == "meta" for w in weights):
        return fp
    h = hashlib.sha256()
    for w in weights:
        w = w.detach().flatten()[:4096].float()
        top = w[w.abs().topk(min(8, w.numel())).indices.sort().values]
        h.update(top.to(torch.bfloat16).float().cpu().numpy().tobytes())
    fp["weights_sha256"] = h.hexdigest()[:16]
    return fp


def create_adapter(model: Llama, config: PARAConfig | IA3Config | LoRAConfig | None = None) -> Adapter:
    """A fresh adapter (the identity) for `model`, on its device and dtype. The base model is frozen
    (`requires_grad_(False)`), as peft does: training touches only adapter parameters."""
    config = config if config is not None else PARAConfig()
    cls = CONFIG_CLASSES.get(type(config))
    if cls is None:
        raise ValueError(f"config must be a PARAConfig, IA3Config or LoRAConfig, got {type(config).__name__}")
    w = model.tok_embeddings.weight
    with torch.device(w.device):
        adapter = cls(model.args, config)
    adapter = adapter.to(dtype=w.dtype)
    adapter.base_fingerprint = model_fingerprint(model)
    model.requires_grad_(False)
    return adapter


def save_adapter(adapter: Adapter, directory: str | os.PathLike[str]) -> Path:
    """Write both files into a temp dir beside `directory`, then move them in (config last), so a crash
    leaves either the old adapter or the new one, never a torn pair. Returns the directory."""
    target = Path(directory)
    config = adapter.file_config()
    fp = adapter.base_fingerprint or {f: getattr(adapter.args, f) for f in SHAPE_FIELDS}
    metadata = {"format": "pt"}
    if "peft_type" in config:
        metadata["parallama_base_model"] = json.dumps(fp)
    else:
        config["base_model"] = fp
    tensors = {k: v.detach().contiguous().cpu() for k, v in adapter.file_tensors().items()}
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(dir=target.parent, prefix=f".{target.name}.tmp-"))
    try:
        save_file(tensors, tmp / WEIGHTS, metadata=metadata)
        (tmp / CONFIG).write_text(json.dumps(config, indent=2) + "\n")
        if not target.exists():
            os.replace(tmp, target)
            return target
        if not target.is_dir():
            raise AdapterError(f"{target}: exists and is not a directory")
        for name in (WEIGHTS, CONFIG):
            os.replace(tmp / name, target / name)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return target


def _read_config(path: Path) -> dict[str, Any]:
    if not path.is_file():
        raise AdapterError(f"{path}: not found (an adapter directory holds {CONFIG} and {WEIGHTS})")
    try:
        config = json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise AdapterError(f"{path}: not valid JSON ({e})") from None
    if not isinstance(config, dict):
        raise AdapterError(f"{path}: expected a JSON object")
    return config


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
    mine = model_fingerprint(model)
    diff = [f"{f} {fp[f]} vs {mine[f]}" for f in SHAPE_FIELDS if f in fp and fp[f] != mine[f]]
    if diff:
        raise AdapterError(
            f"{where}: adapter was made for another base model (adapter vs this model: {', '.join(diff)})"
        )
    if (
        check_weights
        and "weights_sha256" in fp
        and "weights_sha256" in mine
        and fp["weights_sha256"] != mine["weights_sha256"]
    ):
        raise AdapterError(
            f"{where}: adapter was trained on a base model with other weights (weights_sha256 "
            f"{fp['weights_sha256']} vs {mine['weights_sha256']}); pass check_base=False to load it anyway"
        )


def load_adapter(directory: str | os.PathLike[str], model: Llama, check_base: bool = True) -> Adapter:
    """Load an adapter saved by `adapter.save` (or a peft LoRA / (IA)³ adapter for the same base model)
    onto `model`'s device and dtype, in eval mode. Any mismatch is a one-line `AdapterError` naming the
    file and the field or tensor; `check_base=False` skips the weight-hash check (shapes are always checked)."""
    directory = Path(directory)
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
    expected = adapter.file_tensors()
    missing = [k for k in expected if k not in tensors]
    if missing:
        more = f" (+{len(missing) - 1} more)" if len(missing) > 1 else ""
        raise AdapterError(f"{directory / WEIGHTS}: tensor {missing[0]} is missing{more}")
    unexpected = sorted(set(tensors) - set(expected))
    if unexpected:
        raise AdapterError(f"{directory / WEIGHTS}: unexpected tensor {unexpected[0]} for this {method} config")
    for k, v in expected.items():
        if tuple(tensors[k].shape) != tuple(v.shape):
            raise AdapterError(
                f"{directory / WEIGHTS}: tensor {k} has shape {tuple(tensors[k].shape)}, "
                f"this model needs {tuple(v.shape)}"
            )
    adapter.load_file_tensors(tensors, where)
    w = model.tok_embeddings.weight
    adapter = adapter.to(device=w.device, dtype=w.dtype).eval()
    adapter.base_fingerprint = model_fingerprint(model)
    model.requires_grad_(False)
    return adapter
