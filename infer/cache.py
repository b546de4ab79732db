"""Paged KV cache: one block pool for all layers, a reference-counted block allocator, block tables.

K and V live in two tensors shaped (n_layers, num_blocks, block_size, n_kv_heads, head_dim),
allocated once from a budget; a sequence owns a list of block ids (its block table). One more block
than the allocator hands out, `pad_block`, is never owned: the padded rows of a fixed-shape step (a
CUDA-graph bucket) write their K/V there and attend to it alone. Forked
sequences (beams, n samples) share blocks by reference count, and the first write into a shared
block copies it (copy-on-write), so a fork costs nothing until the branches diverge.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field

import torch

from model.args import ModelArgs
from model.step import StepBatch


class CacheFullError(RuntimeError):
    """No free block: the scheduler preempts or waits; a request that can never fit is rejected."""


class BlockAllocator:
    def __init__(self, num_blocks: int) -> None:
        if num_blocks < 1:
            raise ValueError(f"num_blocks must be >= 1, got {num_blocks}")
        self.num_blocks = num_blocks
        self.free_ids = list(range(num_blocks - 1, -1, -1))  # a stack: low ids are handed out first
        self.refcount = [0] * num_blocks

    @property
    def num_free(self) -> int:
        return len(self.free_ids)

    def allocate(self) -> int:
        if not self.free_ids:
            raise CacheFullError("KV cache is full")
        block = self.free_ids.pop()
        self.refcount[block] = 1
        return block

    def share(self, block: int) -> int:
        assert self.refcount[block] > 0, f"sharing free block {block}"
        self.refcount[block] += 1
        return block

    def release(self, block: int) -> None:
        assert self.refcount[block] > 0, f"double free of block {block}"
        self.refcount[block] -= 1
        if self.refcount[block] == 0:
            self.free_ids.append(block)


@dataclass
class BlockTable:
    """The blocks of one sequence and how many token slots of them are filled."""

    blocks: list[int] = field(default_factory=list)
    num_tokens: int = 0


def _contiguous(table: BlockTable) -> tuple[int, int] | None:
    """(first block, tokens) when the table's blocks are consecutive ids, else None."""
    b = table.blocks
    return (b[0], table.num_tokens) if b == list(range(b[0], b[0] + len(b))) else None


class PagedKVCache:
    def __init__(
        self,
        args: ModelArgs,
        num_blocks: int,
        block_size: int = 16,
        dtype: torch.dtype = torch.float32,
        device: torch.device | str = "cpu",
    ) -> None:
        if block_size < 1:
            raise ValueError(f"block_size must be >= 1, got {block_size}")
        self.block_size = block_size
        self.allocator = BlockAllocator(num_blocks)
        self.pad_block = num_blocks  # the extra block: see the module docstring
        shape = (args.n_layers, num_blocks + 1, block_size, args.n_kv_heads, args.head_dim)
        self.k = torch.zeros(shape, dtype=dtype, device=device)
        self.v = torch.zeros(shape, dtype=dtype, device=device)
        self.on_copy: Callable[[int, int], None] | None = None

    @staticmethod
    def blocks_for_budget(args: ModelArgs, block_size: int, budget_bytes: int, dtype: torch.dtype) -> int:
        per_block = 2 * args.n_layers * block_size * args.kv_dim * torch.empty((), dtype=dtype).element_size()
        return max(1, budget_bytes // per_block)

    @property
    def num_blocks(self) -> int:
        return self.allocator.num_blocks

    @property
    def bytes(self) -> int:
        return self.k.numel() * self.k.element_size() * 2

    def blocks_needed(self, table: BlockTable, new_tokens: int) -> int:
        """Blocks to allocate before `new_tokens` more tokens fit (a shared last block counts: CoW)."""
        total = -(-(table.num_tokens + new_tokens) // self.block_size)
        need = total - len(table.blocks)
        if table.num_tokens % self.block_size and self.allocator.refcount[table.blocks[-1]] > 1 and new_tokens:
            need += 1
        return max(need, 0)

    def reserve(self, table: BlockTable, new_tokens: int) -> torch.Tensor:
        """Make room for `new_tokens` and return their flat slot ids (block * block_size + offset).

        Copies a shared partially-filled last block before it is written. Raises CacheFullError
        without changing anything when the blocks are not there.
        """
        if self.blocks_needed(table, new_tokens) > self.allocator.num_free:
            raise CacheFullError("KV cache is full")
        bs = self.block_size
        if table.num_tokens % bs and new_tokens and self.allocator.refcount[table.blocks[-1]] > 1:
            old = table.blocks[-1]
            new = self.allocator.allocate()
            self.copy_block(old, new)
            self.allocator.release(old)
            table.blocks[-1] = new
        while len(table.blocks) * bs < table.num_tokens + new_tokens:
            table.blocks.append(self.allocator.allocate())
        pos = torch.arange(table.num_tokens, table.num_tokens + new_tokens)
        blocks = torch.tensor(table.blocks, dtype=torch.long)
        table.num_tokens += new_tokens
        return blocks[pos // bs] * bs + pos % bs

    def copy_block(self, src: int, dst: int) -> None:
        """Copy one block's K/V (every layer); `on_copy` sees it (a tensor-parallel driver repeats it on the
        other ranks: infer/tp_engine.py)."""
        self.k[:, dst].copy_(self.k[:, src])
        self.v[:, dst].copy_(self.v[:, src])
        if self.on_copy is not None:
            self.on_copy(src, dst)

    def fork(self, table: BlockTable) -> BlockTable:
        """A child table sharing every block of the parent."""
        return BlockTable([self.allocator.share(b) for b in table.blocks], table.num_tokens)

    def free(self, table: BlockTable) -> None:
        # last block first: the free stack then hands the blocks out again in ascending order, so a
        # lone sequence's blocks stay consecutive (the cpu backend attends over them without a gather)
        for b in reversed(table.blocks):
            self.allocator.release(b)
        table.blocks.clear()
        table.num_tokens = 0

    def prepare_step(
        self, tables: list[BlockTable], num_new: list[int], all_logits: bool = False, on_host: bool = False
    ) -> StepBatch:
        """Reserve slots for each sequence's new tokens and describe the packed step to the model.

        Reserves for all sequences or raises CacheFullError having reserved none. `on_host` leaves the
        tensors on the CPU (a CUDA-graph step copies them into its static buffers in one transfer).
        """
        if sum(self.blocks_needed(t, n) for t, n in zip(tables, num_new)) > self.allocator.num_free:
            raise CacheFullError("KV cache is full")
        starts = [t.num_tokens for t in tables]
        slots = torch.cat([self.reserve(t, n) for t, n in zip(tables, num_new)])
        counts = torch.tensor(num_new)
        row_to_seq = torch.repeat_interleave(torch.arange(len(tables)), counts)
        first_row = torch.cumsum(counts, 0) - counts
        row_index = torch.arange(len(row_to_seq)) - first_row[row_to_seq]
        positions = torch.tensor(starts)[row_to_seq] + row_index
        width = max(len(t.blocks) for t in tables)
        block_tables = torch.tensor([t.blocks + [t.blocks[0]] * (width - len(t.blocks)) for t in tables])
        dev = torch.device("cpu") if on_host else self.k.device
        return StepBatch(
            positions=positions.to(dev),
            row_to_seq=row_to_seq.to(dev),
            row_index=row_index.to(dev),
            slots=slots.to(dev),
            block_tables=block_tables.to(dev),
            seq_lens=torch.tensor([t.num_tokens for t in tables], device=dev),
            max_rows=max(num_new),
            logit_rows=None if all_logits else (first_row + counts - 1).to(dev),
            contiguous_kv=_contiguous(tables[0]) if len(tables) == 1 else None,
        )
