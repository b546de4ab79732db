"""A CPU model's weights moved into one memory arena the kernel is asked to back with 2 MiB pages.

Batch-1 decode streams every weight from memory once per token. With 4 KiB pages that is one TLB entry per
4 KiB read (~130 k per step for SmolLM2); with transparent huge pages, one per 2 MiB. torch's CPU allocator
does not ask for them (unless THP_MEM_ALLOC_ENABLE=1 is set before torch starts), so `load_model` copies the
large parameters into an anonymous mapping advised MADV_HUGEPAGE. Where the kernel has THP off, or the
platform has no madvise, the weights stay where they are. PARALLAMA_HUGEPAGES=0 turns it off.
"""

from __future__ import annotations

import ctypes
import mmap
import os

import torch
from torch import nn

HUGE = 2 << 20  # the x86-64 / arm64 huge page size
ALIGN = 64  # each tensor starts on a cache line


def to_huge_pages(model: nn.Module, min_bytes: int = HUGE // 2) -> int:
    """Moves `model`'s CPU parameters of at least `min_bytes` into one MADV_HUGEPAGE arena (tied parameters stay
    tied: they are one Parameter). Returns the bytes moved (0 when disabled or unsupported)."""
    if os.environ.get("PARALLAMA_HUGEPAGES", "1") == "0" or not hasattr(mmap, "MADV_HUGEPAGE"):
        return 0
    params = [p for p in model.parameters() if p.device.type == "cpu" and p.is_contiguous() and p.nbytes >= min_bytes]
    if not params:
        return 0
    offsets, total = [], 0
    for p in params:
        offsets.append(total)
        total += -(-p.nbytes // ALIGN) * ALIGN
    try:
        # private anonymous memory (the default, shared, is shmem: no THP there), committed as it is written;
        # + HUGE so the first tensor can start on a huge-page boundary
        arena = mmap.mmap(-1, total + HUGE, flags=mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS)
        arena.madvise(mmap.MADV_HUGEPAGE)
    except (OSError, ValueError):
        return 0
    start = -ctypes.addressof(ctypes.c_char.from_buffer(arena)) % HUGE
    for p, off in zip(params, offsets):
        # frombuffer keeps the mapping alive for as long as any tensor views it
        t = torch.frombuffer(arena, dtype=p.dtype, count=p.numel(), offset=start + off).view(p.shape)
        t.copy_(p.detach())
        p.data = t
    return total
