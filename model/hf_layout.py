"""The two row orders of a RoPE projection (wq, wk and anything shaped like their outputs).

Meta's RoPE rotates interleaved pairs (x[2i], x[2i+1]); HF's rotates halves (x[i], x[i + hd/2]). HF's
conversion script therefore permutes wq / wk rows per head, and peft's LoRA B / (IA)³ vectors of q_proj and
k_proj live in that order too. parallama keeps Meta's order: these convert at the file boundary.
"""

from __future__ import annotations

import torch


def rows_to_hf(t: torch.Tensor, heads: int) -> torch.Tensor:
    """Rows (dim 0) from Meta's interleaved pairs to HF's rotate-half order: HF's `permute`, per head."""
    # (heads, hd/2, 2, ...) → (heads, 2, hd/2, ...)
    return t.reshape(heads, -1, 2, *t.shape[1:]).transpose(1, 2).reshape(t.shape)


def rows_from_hf(t: torch.Tensor, heads: int) -> torch.Tensor:
    """Inverse of `rows_to_hf`."""
    # (heads, 2, hd/2, ...) → (heads, hd/2, 2, ...)
    return t.reshape(heads, 2, -1, *t.shape[1:]).transpose(1, 2).reshape(t.shape)
