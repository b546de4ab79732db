"""PARA (Prompt Aware Representation Adjustment): per-layer, per-sequence scale vectors for Q, V and FFN-up.

Each layer ℓ owns a vector generator VG_ℓ: a bottleneck MLP that reads one hidden state of the prompt
and emits l = act(pool · W_downᵀ) · W_upᵀ + b_up, split into l_q (H·hd), l_v (H_kv·hd) and l_u (d_ffn).
The model then uses Q' = l_q ⊙ (x W_qᵀ) before RoPE, V' = l_v ⊙ (x W_vᵀ) and U' = l_u ⊙ (x W_3ᵀ);
K and the gate are never scaled. W_up = 0 and b_up = 1 at init, so a fresh adapter is the identity.

`PARAConfig.pool_norm` (default True) makes VG read pool / rms(pool), a parameter-free RMS normalisation
(the model's norm_eps), instead of the raw residual stream. The raw stream's RMS grows with depth (SmolLM2:
~0.1 at layer 0, ~28 at layer 29), so in the paper's form (pool_norm=False) the deep layers' vectors move
hundreds of times faster per optimizer step than the shallow ones', and PARA diverges at learning rates
LoRA trains well at (bench/results/lr_sweep_cpu/). Files without the field load as the paper's form.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import torch.nn as nn
import torch.nn.functional as F

from kernels import reference
from model.args import ModelArgs
from model.peft.base import Adapter, AdapterError

ACTIVATIONS: dict[str, Callable[[torch.Tensor], torch.Tensor]] = {
    "gelu": F.gelu,  # exact erf GELU (torch's default), as in the paper
    "relu": F.relu,
    "silu": F.silu,
    "tanh": torch.tanh,
}
TARGETS = ("q", "v", "u")  # the order in which l is split


@dataclass
class PARAConfig:
    r: int = 12
    activation: str = "gelu"
    adjust: tuple[str, ...] = ("q", "v", "u")
    pool_norm: bool = True  # VG reads pool / rms(pool); False: the paper's raw pool

    def __post_init__(self) -> None:
        if not isinstance(self.r, int) or self.r <= 0:
            raise ValueError(f"PARAConfig: r={self.r!r} must be a positive int")
        if self.activation not in ACTIVATIONS:
            raise ValueError(f"PARAConfig: activation={self.activation!r} is not one of {', '.join(ACTIVATIONS)}")
        if isinstance(self.adjust, str):
            raise ValueError(f"PARAConfig: adjust={self.adjust!r} must be a tuple of targets, e.g. ('q', 'v', 'u')")
        adjust = tuple(self.adjust)
        bad = [t for t in adjust if t not in TARGETS]
        if bad or not adjust or len(set(adjust)) != len(adjust):
            raise ValueError(f"PARAConfig: adjust={adjust!r} must be a non-empty subset of ('q', 'v', 'u')")
        if not isinstance(self.pool_norm, bool):
            raise ValueError(f"PARAConfig: pool_norm={self.pool_norm!r} must be true or false")
        self.adjust = tuple(t for t in TARGETS if t in adjust)  # canonical q, v, u order


class VectorGenerator(nn.Module):
    """VG_ℓ: pool (B, d) → l (B, n_out) = act(pool · downᵀ) · upᵀ + b."""

    def __init__(self, dim: int, r: int, n_out: int, activation: str) -> None:
        super().__init__()
        self.act = ACTIVATIONS[activation]
        self.down = nn.Linear(dim, r, bias=False)
        self.up = nn.Linear(r, n_out, bias=True)
        with torch.no_grad():
            self.down.weight.normal_(0.0, 0.02)
            self.up.weight.zero_()
            self.up.bias.fill_(1.0)  # W_up = 0, b = 1: l ≡ 1, the identity

    def forward(self, pooled: torch.Tensor) -> torch.Tensor:
        return self.up(self.act(self.down(pooled)))


class PARAAdapter(Adapter):
    """One VG per layer; state dict names `layers.{i}.para.{down.weight, up.weight, up.bias}`."""

    method = "para"
    prompt_aware = True

    def __init__(self, args: ModelArgs, config: PARAConfig | None = None) -> None:
        super().__init__(args, config or PARAConfig())
        # v is n_kv_heads·hd under GQA
        self.sizes = {t: args.scale_width(t) for t in self.config.adjust}
        self.scale_targets = tuple(self.sizes)
        n_out = sum(self.sizes.values())
        self.layers = nn.ModuleList(
            nn.ModuleDict({"para": VectorGenerator(args.dim, self.config.r, n_out, self.config.activation)})
            for _ in range(args.n_layers)
        )

    def scales(self, i: int, pooled: torch.Tensor | None) -> dict[str, torch.Tensor]:
        """Layer i's vectors from the pooled layer inputs (B, d) → {"q": (B, q_dim), "v": (B, kv_dim), "u": (B, ffn)}.

        Pooler choice (PARA.md §2): the layer's INPUT, i.e. the residual stream before attention_norm,
        at each row's last prompt token (the caller pools: `Adapter.layer` or the engine's prefill).
        The one place every path (no-cache forward, engine prefill, tensor-parallel shards) goes through,
        so `pool_norm` applies alike everywhere.
        """
        if pooled is None:
            raise ValueError("PARA vectors need the pooled prompt hidden states")
        if self.config.pool_norm:  # parameter-free RMS normalisation, in fp32 like the model's RMSNorm
            pooled = reference.rms_norm(pooled, None, self.args.norm_eps)
        l = self.layers[i]["para"](pooled)  # (B, n_out)
        return dict(zip(self.sizes, l.split(list(self.sizes.values()), dim=-1)))

    def file_tensors(self) -> dict[str, torch.Tensor]:
        return dict(self.state_dict())

    def file_config(self) -> dict[str, Any]:
        c = self.config
        return {
            "method": self.method,
            "r": c.r,
            "activation": c.activation,
            "adjust": list(c.adjust),
            "pool_norm": c.pool_norm,
        }

    @classmethod
    def from_file(cls, args: ModelArgs, config: dict[str, Any], where: Path) -> PARAAdapter:
        try:
            cfg = PARAConfig(
                r=config["r"],
                activation=config["activation"],
                adjust=tuple(config["adjust"]),
                pool_norm=config.get("pool_norm", False),  # files from before the field: the paper's form
            )
        except KeyError as e:
            raise AdapterError(f"{where}: field {e.args[0]!r} is missing") from None
        except (ValueError, TypeError) as e:
            raise AdapterError(f"{where}: {e}") from None
        return cls(args, cfg)

    def load_file_tensors(self, tensors: dict[str, torch.Tensor], where: Path) -> None:
        self.load_state_dict(tensors)
