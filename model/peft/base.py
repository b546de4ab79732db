"""The one interface every adapter method implements, and what the model asks of it.

An adapter never patches modules. For layer i it hands the model either per-sequence scales of the
projection outputs ("q", "k", "v", "u" = FFN up) or unmerged low-rank updates of projections
("q", "k", "v", "o", "gate", "up", "down"); the ops take them as arguments. Scales of a prompt-aware
method (PARA) come from the layer's input at each row's last prompt token; the others are constant.
"""

from __future__ import annotations

from abc import ABCMeta, abstractmethod
from pathlib import Path
from typing import Any, ClassVar, NamedTuple

import torch
import torch.nn as nn

from model.args import ModelArgs


class LoRADelta(NamedTuple):
    """An unmerged low-rank update of one projection: y[rows] += dropout(x[rows]) @ aᵀ @ bᵀ · scaling."""

    a: torch.Tensor  # (r, in)
    b: torch.Tensor  # (out, r)
    scaling: float
    rows: torch.Tensor | None = None  # packed rows this adapter owns (None: every row)
    dropout: float = 0.0  # training-time dropout on the LoRA input


class AdapterError(ValueError):
    """A bad adapter file or config: the message names the file and the field or tensor."""


class Adapter(nn.Module, metaclass=ABCMeta):
    method: ClassVar[str]  # "para" | "ia3" | "lora", the name in adapter files
    prompt_aware: ClassVar[bool] = False  # scales depend on the prompt: computed once at prefill
    low_rank: ClassVar[bool] = False  # gives per-projection low-rank updates (`deltas`), paid every step

    def __init__(self, args: ModelArgs, config: Any) -> None:
        super().__init__()
        self.args, self.config = args, config
        self.scale_targets: tuple[str, ...] = ()  # which of "q", "k", "v", "u" `scales` returns
        self.base_fingerprint: dict[str, Any] | None = None  # of the model it was made for (saved in files)

    # ---- what the model asks ------------------------------------------------------------------------
    def scales(self, i: int, pooled: torch.Tensor | None) -> dict[str, torch.Tensor]:
        """Layer i's scale vectors {target: (B, width)} from pooled inputs (B, d) (prompt-aware methods),
        or {target: (1, width)} shared by every row when `pooled` is None."""
        return {}

    def deltas(self, i: int) -> dict[str, LoRADelta]:
        """Layer i's unmerged low-rank updates {projection: LoRADelta} (rows=None: every row)."""
        return {}

    def layer(
        self, i: int, h: torch.Tensor, prompt_lens: torch.Tensor
    ) -> tuple[dict[str, torch.Tensor], dict[str, list[LoRADelta]]]:
        """Everything layer i needs in the no-cache forward; h: (B, T, d) the layer's input."""
        pooled = None
        if self.prompt_aware:  # the residual stream before attention_norm, at the last prompt token
            pooled = h[torch.arange(h.shape[0], device=h.device), prompt_lens.to(h.device) - 1]  # (B, d)
        return self.scales(i, pooled), {p: [d] for p, d in self.deltas(i).items()}

    # ---- training ------------------------------------------------------------------------------------
    def trainable_parameters(self) -> list[nn.Parameter]:
        return [p for p in self.parameters() if p.requires_grad]

    def num_trainable(self) -> int:
        return sum(p.numel() for p in self.trainable_parameters())

    # ---- files ---------------------------------------------------------------------------------------
    @abstractmethod
    def file_tensors(self) -> dict[str, torch.Tensor]:
        """The tensors as `save` writes them (peft's names and layout for LoRA and (IA)³)."""

    @abstractmethod
    def file_config(self) -> dict[str, Any]:
        """adapter_config.json without the base-model fingerprint."""

    @classmethod
    @abstractmethod
    def from_file(cls, args: ModelArgs, config: dict[str, Any], where: Path) -> Adapter:
        """A fresh adapter with the hyper-parameters of a file's config (tensors are loaded after)."""

    @abstractmethod
    def load_file_tensors(self, tensors: dict[str, torch.Tensor], where: Path) -> None:
        """Adopt tensors in file layout; names and shapes were checked against `file_tensors()`."""
