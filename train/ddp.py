"""Data parallelism for adapter training with torch.distributed (gloo on CPU, nccl on CUDA).

Under `torchrun --nproc_per_node N` (WORLD_SIZE > 1 in the environment) every rank holds the whole frozen
base model and an adapter; each rank takes its slice of every global micro-batch, and after the last
micro-batch of an optimizer step the adapter gradients (only those: the base is frozen and never
communicated) are summed across ranks in one flat all-reduce. The loss is normalised by the global
number of target tokens, so the summed gradient is exactly the single-process gradient of the same
global batch. Without WORLD_SIZE everything here is a no-op for a world of one.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch
import torch.distributed as dist


@dataclass
class World:
    rank: int = 0
    size: int = 1
    device: torch.device = torch.device("cpu")
    owns_group: bool = False  # this module created the process group (and destroys it in `close`)

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    def all_reduce_(self, t: torch.Tensor) -> torch.Tensor:
        """Sum `t` over ranks, in place."""
        if self.size > 1:
            dist.all_reduce(t)
        return t

    def barrier(self) -> None:
        if self.size > 1:
            dist.barrier()

    def broadcast_(self, tensors: Sequence[torch.Tensor]) -> None:
        """Rank 0's values into every rank's tensors."""
        if self.size > 1:
            with torch.no_grad():
                for t in tensors:
                    dist.broadcast(t.data, src=0)

    def gather(self, obj: Any) -> list[Any]:
        """Every rank's `obj`, in rank order (picklable objects; small ones only)."""
        if self.size == 1:
            return [obj]
        out: list[Any] = [None] * self.size
        dist.all_gather_object(out, obj)
        return out

    def sync_grads(self, params: Sequence[torch.nn.Parameter], extra: torch.Tensor) -> torch.Tensor:
        """Sum the gradients of `params` and the small tensor `extra` over ranks in one all-reduce; a rank
        that saw no example (grad None) adds zeros. Returns the summed `extra`."""
        if self.size == 1:
            return extra
        grads = [p.grad if p.grad is not None else torch.zeros_like(p) for p in params]
        flat = torch.cat([g.reshape(-1) for g in grads] + [extra.to(grads[0]).reshape(-1)])
        dist.all_reduce(flat)
        offset = 0
        for p in params:
            p.grad = flat[offset : offset + p.numel()].view_as(p)
            offset += p.numel()
        return flat[offset:].view_as(extra).to(extra.dtype)

    def close(self) -> None:
        if self.owns_group and dist.is_initialized():
            dist.destroy_process_group()
            self.owns_group = False


def setup(device: str | None = None) -> World:
    """The world this process is part of (WORLD_SIZE / RANK / LOCAL_RANK as torchrun sets them) and its device:
    `device` if given, else cuda:LOCAL_RANK when CUDA is available, else cpu."""
    size = int(os.environ.get("WORLD_SIZE", "1"))
    rank = int(os.environ.get("RANK", "0"))
    local = int(os.environ.get("LOCAL_RANK", "0"))
    if device is None:
        dev = torch.device(f"cuda:{local}" if torch.cuda.is_available() else "cpu")
    else:
        dev = torch.device(device)
        if dev.type == "cuda" and dev.index is None:
            dev = torch.device(f"cuda:{local}")
    if dev.type == "cuda":
        torch.cuda.set_device(dev)
    owns = False
    if size > 1 and not dist.is_initialized():
        dist.init_process_group(backend="nccl" if dev.type == "cuda" else "gloo")
        owns = True
    return World(rank, size, dev, owns)
