"""Making adapters of any method, and the base model's fingerprint an adapter carries (shape fields and a
hash of a few weights), so that one cannot silently land on another model. Files: weights/adapters.py."""

from __future__ import annotations

import hashlib
from typing import Any

import torch

from model.peft.base import Adapter
from model.peft.ia3 import IA3Adapter, IA3Config
from model.peft.lora import LoRAAdapter, LoRAConfig
from model.peft.para import PARAAdapter, PARAConfig

CONFIG_CLASSES: dict[type, type[Adapter]] = {PARAConfig: PARAAdapter, IA3Config: IA3Adapter, LoRAConfig: LoRAAdapter}
METHODS: dict[str, type[Adapter]] = {cls.method: cls for cls in CONFIG_CLASSES.values()}
PEFT_TYPES = {"LORA": "lora", "IA3": "ia3"}
SHAPE_FIELDS = ("dim", "n_layers", "n_heads", "n_kv_heads", "head_dim", "ffn_dim", "vocab_size")


def model_fingerprint(model: Any) -> dict[str, Any]:
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
    tp = getattr(model, "tp", None)
    if tp is not None and tp.size > 1:  # a tensor-parallel rank: the same values of the whole tensors
        weights = tp.fingerprint_tensors(model)
    h = hashlib.sha256()
    for w in weights:
        w = w.detach().flatten()[:4096].float()
        top = w[w.abs().topk(min(8, w.numel())).indices.sort().values]
        h.update(top.to(torch.bfloat16).float().cpu().numpy().tobytes())
    fp["weights_sha256"] = h.hexdigest()[:16]
    return fp


def fingerprint_diff(saved: dict[str, Any], model: Any, fields: tuple[str, ...] = SHAPE_FIELDS) -> list[str]:
    """The `fields` in which a saved fingerprint differs from `model`'s, as "field saved vs this"."""
    mine = model_fingerprint(model)
    return [f"{f} {saved[f]} vs {mine[f]}" for f in fields if f in saved and f in mine and saved[f] != mine[f]]


def create_adapter(model: Any, config: PARAConfig | IA3Config | LoRAConfig | None = None) -> Adapter:
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
