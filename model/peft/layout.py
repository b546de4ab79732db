"""peft's names and layout for LLaMA adapters, so (IA)³ and LoRA files move between parallama and peft.

peft stores tensors under transformers' module paths (`base_model.model.model.layers.{i}.self_attn.q_proj`)
with q_proj / k_proj output rows in HF's rotate-half order; parallama keeps Meta's interleaved-pair
order inside (as its weights are), so those rows are permuted on the way in and out.
"""

from __future__ import annotations

import torch

from model import hf_layout
from model.args import ModelArgs

PREFIX = "base_model.model.model.layers"
# peft module name → (transformers submodule, parallama's name for the projection in the model's ops)
MODULES = {
    "q_proj": ("self_attn", "q"),
    "k_proj": ("self_attn", "k"),
    "v_proj": ("self_attn", "v"),
    "o_proj": ("self_attn", "o"),
    "gate_proj": ("mlp", "gate"),
    "up_proj": ("mlp", "up"),
    "down_proj": ("mlp", "down"),
}


def peft_key(i: int, module: str, suffix: str) -> str:
    return f"{PREFIX}.{i}.{MODULES[module][0]}.{module}.{suffix}"


def in_out(args: ModelArgs, module: str) -> tuple[int, int]:
    """(in_features, out_features) of a projection."""
    return {
        "q_proj": (args.dim, args.q_dim),
        "k_proj": (args.dim, args.kv_dim),
        "v_proj": (args.dim, args.kv_dim),
        "o_proj": (args.q_dim, args.dim),
        "gate_proj": (args.dim, args.ffn_dim),
        "up_proj": (args.dim, args.ffn_dim),
        "down_proj": (args.ffn_dim, args.dim),
    }[module]


def _rotary_heads(args: ModelArgs, module: str) -> int | None:
    return {"q_proj": args.n_heads, "k_proj": args.n_kv_heads}.get(module)


def rows_to_hf(t: torch.Tensor, args: ModelArgs, module: str) -> torch.Tensor:
    """Output rows of `module` (dim 0 of t) from Meta's interleaved pairs to HF's rotate-half order."""
    heads = _rotary_heads(args, module)
    return t if heads is None else hf_layout.rows_to_hf(t, heads)


def rows_from_hf(t: torch.Tensor, args: ModelArgs, module: str) -> torch.Tensor:
    """Inverse of `rows_to_hf`."""
    heads = _rotary_heads(args, module)
    return t if heads is None else hf_layout.rows_from_hf(t, heads)


def target_list(value: object, allowed: tuple[str, ...], field: str) -> tuple[str, ...]:
    """A config's module list in canonical order, or a one-line error naming the field."""
    if isinstance(value, str):
        if value == "all-linear":
            return allowed
        value = [value]
    if not isinstance(value, (list, tuple)) or not value or not all(isinstance(m, str) for m in value):
        raise ValueError(f"{field}={value!r} must be a non-empty list of module names from {', '.join(allowed)}")
    bad = [m for m in value if m not in allowed]
    if bad:
        raise ValueError(f"{field}: {', '.join(map(repr, bad))} not supported; choose from {', '.join(allowed)}")
    return tuple(m for m in allowed if m in value)
