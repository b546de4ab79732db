"""(IA)³ as peft does it for LLaMA: learned vectors (init 1) scale the outputs of k_proj and v_proj and
the input of down_proj. Not prompt-aware: the same vectors for every sequence.

down_proj's input is silu(gate) ⊙ up, so scaling it equals scaling up's output: (IA)³ reuses the
"u" scale that PARA's l_u feeds, and every (IA)³ target is one of the model's scale epilogues.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import torch.nn as nn

from model.args import ModelArgs
from model.peft.base import Adapter, AdapterError
from model.peft.layout import in_out, peft_key, rows_from_hf, rows_to_hf, target_list

# peft module → the model's scale it becomes; down_proj must be a feed-forward (input-scaled) module
SCALES = {"q_proj": "q", "k_proj": "k", "v_proj": "v", "up_proj": "u", "down_proj": "u"}
FEEDFORWARD = ("down_proj",)


@dataclass
class IA3Config:
    target_modules: tuple[str, ...] = ("k_proj", "v_proj", "down_proj")
    feedforward_modules: tuple[str, ...] = ("down_proj",)

    def __post_init__(self) -> None:
        self.target_modules = target_list(self.target_modules, tuple(SCALES), "IA3Config: target_modules")
        ff = self.feedforward_modules or ()
        if ff:
            ff = target_list(ff, FEEDFORWARD, "IA3Config: feedforward_modules")
        if ("down_proj" in self.target_modules) != ("down_proj" in ff):
            raise ValueError(
                "IA3Config: down_proj is supported only as a feed-forward module (its input scaled): "
                "list it in both target_modules and feedforward_modules"
            )
        self.feedforward_modules = ff


class IA3Adapter(Adapter):
    """One vector per target module and layer; state dict names `layers.{i}.{module}` (Meta row order)."""

    method = "ia3"

    def __init__(self, args: ModelArgs, config: IA3Config | None = None) -> None:
        super().__init__(args, config or IA3Config())
        mods = self.config.target_modules
        self.scale_targets = tuple(dict.fromkeys(SCALES[m] for m in mods))
        self.layers = nn.ModuleList(
            nn.ParameterDict({m: nn.Parameter(torch.ones(self._width(m))) for m in mods}) for _ in range(args.n_layers)
        )

    def _width(self, module: str) -> int:
        fan_in, fan_out = in_out(self.args, module)
        return fan_in if module in FEEDFORWARD else fan_out

    def scales(self, i: int, pooled: torch.Tensor | None) -> dict[str, torch.Tensor]:
        """{"k": (1, kv_dim), "v": (1, kv_dim), "u": (1, ffn)}: the same for every row."""
        out: dict[str, torch.Tensor] = {}
        for m, vec in self.layers[i].items():
            t = SCALES[m]
            out[t] = vec if t not in out else out[t] * vec  # up_proj and down_proj both land on "u"
        return {t: v[None] for t, v in out.items()}

    def file_tensors(self) -> dict[str, torch.Tensor]:
        out = {}
        for i, layer in enumerate(self.layers):
            for m, vec in layer.items():
                v = rows_to_hf(vec.detach(), self.args, m)
                out[peft_key(i, m, "ia3_l")] = v[None] if m in FEEDFORWARD else v[:, None]  # peft: (1, in) | (out, 1)
        return out

    def file_config(self) -> dict[str, Any]:
        return {
            "peft_type": "IA3",
            "task_type": "CAUSAL_LM",
            "target_modules": list(self.config.target_modules),
            "feedforward_modules": list(self.config.feedforward_modules),
            "fan_in_fan_out": False,
            "init_ia3_weights": True,
            "inference_mode": True,
            "modules_to_save": None,
            "base_model_name_or_path": None,
        }

    @classmethod
    def from_file(cls, args: ModelArgs, config: dict[str, Any], where: Path) -> IA3Adapter:
        if config.get("fan_in_fan_out") or config.get("modules_to_save"):
            raise AdapterError(f"{where}: fan_in_fan_out / modules_to_save are not supported for LLaMA (IA)³")
        try:
            cfg = IA3Config(
                target_modules=config.get("target_modules") or IA3Config.target_modules,
                feedforward_modules=config.get("feedforward_modules") or (),
            )
        except ValueError as e:
            raise AdapterError(f"{where}: {e}") from None
        return cls(args, cfg)

    def load_file_tensors(self, tensors: dict[str, torch.Tensor], where: Path) -> None:
        with torch.no_grad():
            for i, layer in enumerate(self.layers):
                for m, vec in layer.items():
                    vec.copy_(rows_from_hf(tensors[peft_key(i, m, "ia3_l")].flatten(), self.args, m))
