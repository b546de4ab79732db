"""Files → a ready model: read a checkpoint, build `Llama` on the meta device, adopt the weights. What
`Llama.from_pretrained` calls (model/ itself knows nothing of files)."""

from __future__ import annotations

import os
from typing import Any

import torch

from kernels.ops import resolve_backend
from model import Llama, ModelArgs
from weights import load_checkpoint
from weights.hugepages import to_huge_pages


def load_model(
    source: str | os.PathLike[str] = "default",
    dtype: torch.dtype = torch.float32,
    device: torch.device | str = "cpu",
    backend: str = "auto",
    tp: int = 1,
    **overrides: Any,
) -> Llama:
    """`Llama.from_pretrained`'s body: arguments as documented there."""
    backend = resolve_backend(backend, device)  # before the (slow) load: a bad backend answers at once
    if tp != 1:  # each rank reads only its slices: nothing below ever holds the whole model
        from weights.sharded import load_model_shard

        return load_model_shard(source, tp, dtype=dtype, device=device, backend=backend, **overrides)
    ckpt = load_checkpoint(source)
    args = ckpt.args
    if overrides:
        args = ModelArgs.from_dict({**args.to_dict(), **overrides})
    with torch.device("meta"):
        model = Llama(args, backend=backend)
    sd = {k: v.to(device=device, dtype=dtype) for k, v in ckpt.state_dict.items()}
    model.load_weights(sd, source=str(ckpt.path))
    del sd
    if torch.device(device).type == "cpu":
        to_huge_pages(model)  # decode streams every weight per token: fewer TLB misses (weights/hugepages.py)
    model.setup_rope(device)
    model.tokenizer = ckpt.tokenizer
    return model.eval()
