"""Files → one tensor-parallel rank's model, reading only that rank's part of each tensor (model/tp.py's layout).

No rank ever holds the whole model: each tensor is read as the rank's slice (weights/sources.py) straight into a
fresh tensor of the model's dtype and device, one at a time. A Meta directory saved as as many shards as ranks
(or a multiple or divisor of that) is read shard by shard: rank k opens consolidated.k.pth and nothing else.
"""

from __future__ import annotations

import dataclasses
import os
from typing import Any

import torch

from model import Llama, ModelArgs
from model.tp import Spec, TensorParallel, check_size, join
from weights.sources import Source, open_source


def owned(t: torch.Tensor, spec: Spec | None, dtype: torch.dtype, device: torch.device | str) -> torch.Tensor:
    """A slice as a tensor of its own (no view into a file's memory map), zero-padded to spec.size."""
    shape = list(t.shape)
    if spec is not None:
        shape[spec.dim] = spec.size
    out = (torch.zeros if spec is not None and spec.size != t.shape[spec.dim] else torch.empty)(
        shape, dtype=dtype, device=device
    )
    (out if spec is None else out.narrow(spec.dim, 0, t.shape[spec.dim])).copy_(t)
    return out


def shard_state_dict(
    src: Source, args: ModelArgs, tp: TensorParallel, dtype: torch.dtype = torch.float32, device: Any = "cpu"
) -> dict[str, torch.Tensor]:
    """Every tensor of `src` as rank tp.rank keeps it (no process group needed: tests call it per rank)."""
    sd = {}
    for name in src.names():
        spec = tp.spec(args, name)
        sd[name] = owned(src.read(name, spec), spec, dtype, device)
    return sd


def embedding_layout(src: Source, args: ModelArgs, size: int) -> str:
    """ "dim" when Meta's shards split the embedding on the model width (Llama 1/2) and the head is not tied to
    it: each rank then reads its own shard's columns. Otherwise "vocab" (rows)."""
    if src.embedding_split == 1 and not args.tie_embeddings and args.dim % size == 0:
        return "dim"
    return "vocab"


def load_model_shard(
    source: str | os.PathLike[str],
    tp: int,
    dtype: torch.dtype = torch.float32,
    device: torch.device | str = "cpu",
    backend: str = "cpu",
    **overrides: Any,
) -> Llama:
    """This process's shard of the model, under torchrun with WORLD_SIZE == tp (`Llama.from_pretrained(tp=...)`).
    A tp the model's shapes do not allow is refused (one line listing the values that work) before any
    process group starts."""
    src = open_source(source)

    def with_overrides(args: ModelArgs) -> ModelArgs:
        return ModelArgs.from_dict({**args.to_dict(), **overrides}) if overrides else args

    check_size(with_overrides(src.args), tp)
    layout, dev = join(tp, device)
    src.bind(layout.rank, layout.size)
    args = with_overrides(src.args)
    layout = dataclasses.replace(layout, embedding=embedding_layout(src, args, tp))
    with torch.device("meta"):
        model = Llama(args, backend=backend, tp=layout)
    model.load_weights(shard_state_dict(src, args, layout, dtype, dev), source=str(src.path))
    model.setup_rope(dev)
    model.tokenizer = src.tokenizer
    layout.fingerprint_tensors(model)  # collective: once here, so adapter checks later never communicate
    return model.eval()
