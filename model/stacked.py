"""Several of Meta's projections that read the same input (wq | wk | wv, w1 | w3) stored as one parameter, so
they run as one GEMM, while state dicts keep Meta's names."""

from __future__ import annotations

import math
from typing import Any

import torch
import torch.nn as nn


def stacked_weight(module: nn.Module, name: str, parts: dict[str, int], in_dim: int) -> nn.Parameter:
    """One (sum(rows), in_dim) parameter for several of Meta's projections that read the same input, so
    they run as one GEMM. State dicts keep Meta's names: `{part}.weight` tensors are split out on save
    and stacked on load by the hooks registered here."""
    weight = nn.Parameter(torch.empty(sum(parts.values()), in_dim))
    nn.init.kaiming_uniform_(weight, a=math.sqrt(5))  # what each nn.Linear would have done (same fan-in)

    def split(module: nn.Module, state_dict: dict, prefix: str, local_metadata: dict) -> None:
        w = state_dict.pop(prefix + name)
        for part, rows in zip(parts, w.split(list(parts.values()))):
            state_dict[f"{prefix}{part}.weight"] = rows.clone()  # own storage: safetensors refuses shared tensors

    def stack(state_dict: dict, prefix: str, *args: Any) -> None:
        keys = [f"{prefix}{part}.weight" for part in parts]
        if all(k in state_dict for k in keys):
            state_dict[prefix + name] = torch.cat([state_dict.pop(k) for k in keys])

    module.register_state_dict_post_hook(split)
    module.register_load_state_dict_pre_hook(lambda mod, *args: stack(*args))
    return weight
