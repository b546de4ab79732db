"""ModelArgs: the architecture hyper-parameters of a LLaMA-family model.

Every weight format is translated to this one dataclass by its loader in weights/ (params.json,
HF config.json, GGUF metadata), so the model never sees format details.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, fields
from typing import Any


@dataclass
class ModelArgs:
    dim: int = 4096
    n_layers: int = 32
    n_heads: int = 32
    n_kv_heads: int | None = None  # None = n_heads (no GQA)
    vocab_size: int = 32000
    multiple_of: int = 256  # Meta's FFN size rounding
    ffn_dim_multiplier: float | None = None
    hidden_dim: int | None = None  # explicit FFN width (HF/GGUF state it); None = Meta's formula
    head_dim: int | None = None  # None = dim // n_heads
    norm_eps: float = 1e-5
    rope_theta: float = 10000.0
    # Llama 3.1/3.2 rope scaling ("use_scaled_rope" in params.json, rope_type "llama3" in HF)
    use_scaled_rope: bool = False
    rope_scale_factor: float = 8.0  # 8 for Llama 3.1, 32 for Llama 3.2
    rope_low_freq_factor: float = 1.0
    rope_high_freq_factor: float = 4.0
    rope_original_max_seq_len: int = 8192
    max_seq_len: int = 2048
    tie_embeddings: bool = False

    def __post_init__(self) -> None:
        if self.n_kv_heads is None:
            self.n_kv_heads = self.n_heads
        if self.head_dim is None:
            if self.dim % self.n_heads:
                raise ValueError(f"ModelArgs: dim={self.dim} is not divisible by n_heads={self.n_heads}")
            self.head_dim = self.dim // self.n_heads
        if self.head_dim % 2:
            raise ValueError(f"ModelArgs: head_dim={self.head_dim} must be even for RoPE")
        if self.n_heads % self.n_kv_heads:
            raise ValueError(f"ModelArgs: n_heads={self.n_heads} is not a multiple of n_kv_heads={self.n_kv_heads}")
        for name in ("dim", "n_layers", "n_heads", "vocab_size", "max_seq_len"):
            if getattr(self, name) <= 0:
                raise ValueError(f"ModelArgs: {name}={getattr(self, name)} must be positive")

    @property
    def ffn_dim(self) -> int:
        """FFN width: explicit, or Meta's rule (2/3 of 4·dim, times the multiplier, rounded up)."""
        if self.hidden_dim is not None:
            return self.hidden_dim
        hidden = int(2 * 4 * self.dim / 3)
        if self.ffn_dim_multiplier is not None:
            hidden = int(self.ffn_dim_multiplier * hidden)
        return self.multiple_of * math.ceil(hidden / self.multiple_of)

    @property
    def q_dim(self) -> int:
        return self.n_heads * self.head_dim

    @property
    def kv_dim(self) -> int:
        return self.n_kv_heads * self.head_dim

    def scale_width(self, target: str) -> int:
        """Width of an adapter's scale vector for a projection output: "q", "k", "v" or "u" (FFN up)."""
        return {"q": self.q_dim, "k": self.kv_dim, "v": self.kv_dim, "u": self.ffn_dim}[target]

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> ModelArgs:
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(d) - known)
        if unknown:
            raise ValueError(f"ModelArgs: unknown field(s) {', '.join(unknown)}")
        return cls(**d)

    def num_params(self) -> int:
        """Parameter count from the shapes alone (tied embeddings counted once)."""
        d = self.dim
        attn = d * self.q_dim + 2 * d * self.kv_dim + self.q_dim * d
        ffn = 3 * d * self.ffn_dim
        per_layer = attn + ffn + 2 * d
        emb = self.vocab_size * d
        return self.n_layers * per_layer + d + emb * (1 if self.tie_embeddings else 2)
