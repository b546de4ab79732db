"""LoRA kept unmerged, as multi-tenant serving runs it: y = x Wᵀ + dropout(x) Aᵀ Bᵀ · α/r (α/√r with rsLoRA).

A is Kaiming-uniform (a=√5, nn.Linear's own init, as peft), B = 0, so a fresh adapter is the identity.
Default targets are peft's for LLaMA, q_proj and v_proj; any of the seven projections may be chosen.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import torch.nn as nn

from model.args import ModelArgs
from model.peft.base import Adapter, AdapterError, LoRADelta
from model.peft.layout import MODULES, in_out, peft_key, rows_from_hf, rows_to_hf, target_list

# peft config fields whose non-default values change the math in ways this implementation does not do
_UNSUPPORTED = (
    "use_dora",
    "lora_bias",
    "use_qalora",
    "fan_in_fan_out",
    "modules_to_save",
    "layers_to_transform",
    "rank_pattern",
    "alpha_pattern",
    "trainable_token_indices",
    "layer_replication",
)


@dataclass
class LoRAConfig:
    r: int = 8
    lora_alpha: float = 8
    lora_dropout: float = 0.0
    target_modules: tuple[str, ...] = ("q_proj", "v_proj")
    use_rslora: bool = False

    def __post_init__(self) -> None:
        if not isinstance(self.r, int) or self.r <= 0:
            raise ValueError(f"LoRAConfig: r={self.r!r} must be a positive int")
        if not isinstance(self.lora_alpha, (int, float)) or self.lora_alpha <= 0:
            raise ValueError(f"LoRAConfig: lora_alpha={self.lora_alpha!r} must be a positive number")
        if not isinstance(self.lora_dropout, (int, float)) or not 0 <= self.lora_dropout < 1:
            raise ValueError(f"LoRAConfig: lora_dropout={self.lora_dropout!r} must lie in [0, 1)")
        self.target_modules = target_list(self.target_modules, tuple(MODULES), "LoRAConfig: target_modules")

    @property
    def scaling(self) -> float:
        return self.lora_alpha / (math.sqrt(self.r) if self.use_rslora else self.r)


class LoRAPair(nn.Module):
    def __init__(self, fan_in: int, fan_out: int, r: int) -> None:
        super().__init__()
        self.lora_A = nn.Linear(fan_in, r, bias=False)  # nn.Linear's init: kaiming_uniform_(a=√5), peft's too
        self.lora_B = nn.Linear(r, fan_out, bias=False)
        nn.init.zeros_(self.lora_B.weight)


class LoRAAdapter(Adapter):
    """State dict names `layers.{i}.{module}.lora_A.weight` (r, in) / `lora_B.weight` (out, r), Meta row order."""

    method = "lora"
    low_rank = True

    def __init__(self, args: ModelArgs, config: LoRAConfig | None = None) -> None:
        super().__init__(args, config or LoRAConfig())
        r = self.config.r
        self.layers = nn.ModuleList(
            nn.ModuleDict({m: LoRAPair(*in_out(args, m), r) for m in self.config.target_modules})
            for _ in range(args.n_layers)
        )

    def deltas(self, i: int) -> dict[str, LoRADelta]:
        p = self.config.lora_dropout if self.training else 0.0
        s = self.config.scaling
        return {
            MODULES[m][1]: LoRADelta(ab.lora_A.weight, ab.lora_B.weight, s, None, p) for m, ab in self.layers[i].items()
        }

    def file_tensors(self) -> dict[str, torch.Tensor]:
        out = {}
        for i, layer in enumerate(self.layers):
            for m, ab in layer.items():
                out[peft_key(i, m, "lora_A.weight")] = ab.lora_A.weight.detach()
                out[peft_key(i, m, "lora_B.weight")] = rows_to_hf(ab.lora_B.weight.detach(), self.args, m)
        return out

    def file_config(self) -> dict[str, Any]:
        c = self.config
        return {
            "peft_type": "LORA",
            "task_type": "CAUSAL_LM",
            "r": c.r,
            "lora_alpha": c.lora_alpha,
            "lora_dropout": c.lora_dropout,
            "target_modules": list(c.target_modules),
            "use_rslora": c.use_rslora,
            "bias": "none",
            "fan_in_fan_out": False,
            "init_lora_weights": True,
            "inference_mode": True,
            "modules_to_save": None,
            "base_model_name_or_path": None,
        }

    @classmethod
    def from_file(cls, args: ModelArgs, config: dict[str, Any], where: Path) -> LoRAAdapter:
        used = [k for k in _UNSUPPORTED if config.get(k)]
        if config.get("bias", "none") != "none":
            used.append(f"bias={config['bias']!r}")
        if used:
            raise AdapterError(f"{where}: LoRA options not supported: {', '.join(used)}")
        try:
            cfg = LoRAConfig(
                r=config["r"],
                lora_alpha=config.get("lora_alpha", 8),
                lora_dropout=config.get("lora_dropout", 0.0),
                target_modules=config.get("target_modules") or LoRAConfig.target_modules,
                use_rslora=bool(config.get("use_rslora", False)),
            )
        except KeyError as e:
            raise AdapterError(f"{where}: field {e.args[0]!r} is missing") from None
        except ValueError as e:
            raise AdapterError(f"{where}: {e}") from None
        return cls(args, cfg)

    def load_file_tensors(self, tensors: dict[str, torch.Tensor], where: Path) -> None:
        with torch.no_grad():
            for i, layer in enumerate(self.layers):
                for m, ab in layer.items():
                    ab.lora_A.weight.copy_(tensors[peft_key(i, m, "lora_A.weight")])
                    ab.lora_B.weight.copy_(rows_from_hf(tensors[peft_key(i, m, "lora_B.weight")], self.args, m))
