"""PARA (Prompt Aware Representation Adjustment): per-layer, per-sequence scale vectors for Q, V and FFN-up.

Each layer ℓ owns a vector generator VG_ℓ: a bottleneck MLP that reads one hidden state of the prompt
and emits l = act(pool · W_downᵀ) · W_upᵀ + b_up, split into l_q (H·hd), l_v (H_kv·hd) and l_u (d_ffn).
The model then uses Q' = l_q ⊙ (x W_qᵀ) before RoPE, V' = l_v ⊙ (x W_vᵀ) and U' = l_u ⊙ (x W_3ᵀ);
K and the gate are never scaled. W_up = 0 and b_up = 1 at init, so a fresh adapter is the identity.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING

import torch
import torch.nn as nn
import torch.nn.functional as F

from model.args import ModelArgs

if TYPE_CHECKING:
    from model.llama import Llama

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


class PARAAdapter(nn.Module):
    """One VG per layer; state dict names `layers.{i}.para.{down.weight, up.weight, up.bias}`."""

    def __init__(self, args: ModelArgs, config: PARAConfig | None = None) -> None:
        super().__init__()
        self.args, self.config = args, config or PARAConfig()
        sizes = {"q": args.q_dim, "v": args.kv_dim, "u": args.ffn_dim}  # v is n_kv_heads·hd under GQA
        self.sizes = {t: sizes[t] for t in self.config.adjust}
        n_out = sum(self.sizes.values())
        self.layers = nn.ModuleList(
            nn.ModuleDict({"para": VectorGenerator(args.dim, self.config.r, n_out, self.config.activation)})
            for _ in range(args.n_layers)
        )

    def vectors(self, i: int, h: torch.Tensor, prompt_lens: torch.Tensor) -> dict[str, torch.Tensor]:
        """Layer i's scale vectors from its input h (B, T, d) → {"q": (B, q_dim), "v": (B, kv_dim), "u": (B, ffn)}.

        Pooler choice (PARA.md §2): h is the layer's INPUT, i.e. the residual stream before
        attention_norm, taken at each row's last prompt token `prompt_lens - 1`.
        """
        B = h.shape[0]
        pooled = h[torch.arange(B, device=h.device), prompt_lens.to(h.device) - 1]  # (B, d)
        return self.vectors_from_pooled(i, pooled)

    def vectors_from_pooled(self, i: int, pooled: torch.Tensor) -> dict[str, torch.Tensor]:
        """Layer i's vectors from already pooled hidden states (B, d); the cached path pools itself."""
        l = self.layers[i]["para"](pooled)  # (B, n_out)
        return dict(zip(self.sizes, l.split(list(self.sizes.values()), dim=-1)))

    def trainable_parameters(self) -> list[nn.Parameter]:
        return [p for p in self.parameters() if p.requires_grad]

    def num_trainable(self) -> int:
        return sum(p.numel() for p in self.trainable_parameters())


def create_adapter(model: Llama, config: PARAConfig | None = None) -> PARAAdapter:
    """A fresh (identity) PARA adapter for `model`, on the model's device and dtype."""
    w = model.tok_embeddings.weight
    with torch.device(w.device):
        adapter = PARAAdapter(model.args, config)
    return adapter.to(dtype=w.dtype)
