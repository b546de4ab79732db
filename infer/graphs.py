"""The decode step at fixed shapes, captured as a CUDA graph once per batch bucket and replayed.

A batch-1 decode step of a small model is a few hundred short kernels; on a GPU their launch cost
exceeds their work unless the whole step is one graph launch (gpt-fast, vLLM). A graph replays fixed
addresses and shapes, so the step reads its inputs from static buffers padded to a bucket of 1, 2, 4,
8, 16 or 32 rows: tokens, positions, cache slots, seq lens, adapter pool rows and block tables padded
to the longest a sequence can have. Padded rows write their K/V into the cache's `pad_block` and
attend to that one key; their logits are dropped. The PARA / (IA)³ pool gathers run inside the graph;
a step with LoRA rows (per-adapter row groups, shapes that change with the batch) runs eagerly.

`static_decode_step` is the captured function: no host synchronisation and no data-dependent shape
(tests check it with torch.compile(fullgraph=True) on CPU). With `capture=False` the runner calls it
eagerly, which is how it is tested without a GPU.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

import torch

from infer.cache import PagedKVCache
from model import Llama
from model.step import AdapterStep, StepBatch

BUCKETS = (1, 2, 4, 8, 16, 32)


@dataclass
class StaticInputs:
    """One bucket's inputs, views into a single flat int64 buffer so the host fills them with one copy."""

    flat: torch.Tensor  # (6 B + B W,)
    tokens: torch.Tensor  # (B,)
    positions: torch.Tensor  # (B,)
    slots: torch.Tensor  # (B,) flat cache slot of each row's new K/V
    seq_lens: torch.Tensor  # (B,)
    row_slots: torch.Tensor  # (B,) adapter pool row (0 = identity)
    row_to_seq: torch.Tensor  # (B,) arange: one row per sequence
    block_tables: torch.Tensor  # (B, W)

    @staticmethod
    def allocate(rows: int, width: int, device: torch.device, pin: bool = False) -> StaticInputs:
        flat = torch.zeros(6 * rows + rows * width, dtype=torch.long, device=device, pin_memory=pin)
        cols = flat[: 6 * rows].view(6, rows)
        return StaticInputs(flat, *cols, flat[6 * rows :].view(rows, width))


def static_decode_step(
    model: Llama,
    inp: StaticInputs,
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    pools: dict[str, torch.Tensor],
    row_index: torch.Tensor,
) -> torch.Tensor:
    """One decode step over a bucket's static buffers → float32 logits (B, vocab). row_index: (B,) zeros."""
    adapters = AdapterStep(pools=pools, row_slots=inp.row_slots) if pools else None
    step = StepBatch(
        positions=inp.positions,
        row_to_seq=inp.row_to_seq,
        row_index=row_index,
        slots=inp.slots,
        block_tables=inp.block_tables,
        seq_lens=inp.seq_lens,
        max_rows=1,
        adapters=adapters,
    )
    return model.forward_step(inp.tokens, step, k_cache, v_cache)


class DecodeGraphs:
    """Static-buffer decode steps for up to `max_batch` rows: one CUDA graph per (bucket, pools present),
    captured the first time that bucket runs. `pools` is the engine's dict, read at each call (an adapter
    added later creates a pool, and so a new graph)."""

    def __init__(
        self, model: Llama, cache: PagedKVCache, pools: dict[str, torch.Tensor], max_batch: int, capture: bool = True
    ) -> None:
        self.model, self.cache, self.pools = model, cache, pools
        self.device = cache.k.device
        if capture and self.device.type != "cuda":
            raise ValueError(f"cuda_graphs=True needs the model on a CUDA device, not {self.device}")
        self.capture = capture
        self.buckets = [b for b in BUCKETS if b < max_batch] + [min(max_batch, BUCKETS[-1])]
        # the most blocks one sequence can own: the engine admits nothing longer than max_seq_len
        self.width = min(cache.num_blocks, math.ceil(model.args.max_seq_len / cache.block_size))
        self._inputs: dict[int, tuple[StaticInputs, StaticInputs, torch.Tensor]] = {}  # bucket → host, device, zeros
        self._graphs: dict[tuple[int, tuple[str, ...]], tuple[torch.cuda.CUDAGraph, torch.Tensor]] = {}
        self._mempool = torch.cuda.graph_pool_handle() if capture else None
        self.replays = 0

    def bucket(self, rows: int) -> int | None:
        return next((b for b in self.buckets if b >= rows), None)

    def run(self, tokens: Sequence[int], step: StepBatch, row_slots: Sequence[int]) -> torch.Tensor:
        """Logits (rows, vocab) of a decode step given by `step` (host tensors from prepare_step(on_host=True));
        a view of the graph's output, valid until the next call."""
        rows = len(tokens)
        bucket = self.bucket(rows)
        if bucket is None:
            raise ValueError(f"{rows} rows exceed the largest bucket ({self.buckets[-1]})")
        host, dev, row_index = self._buffers(bucket)
        pad = self.cache.pad_block
        host.tokens[:rows] = torch.as_tensor(tokens)
        host.positions[:rows] = step.positions
        host.slots[:rows] = step.slots
        host.seq_lens[:rows] = step.seq_lens
        host.row_slots[:rows] = torch.as_tensor(row_slots)
        # padded rows: token 0 at position 0, written to and attending to the pad block alone, no adapter
        for col in (host.tokens, host.positions, host.row_slots):
            col[rows:] = 0
        host.slots[rows:] = pad * self.cache.block_size
        host.seq_lens[rows:] = 1
        host.block_tables.fill_(pad)  # blocks past a sequence's length are masked; any valid id does
        host.block_tables[:rows, : step.block_tables.shape[1]] = step.block_tables
        dev.flat.copy_(host.flat)
        key = (bucket, tuple(sorted(self.pools)))
        if not self.capture:
            out = static_decode_step(self.model, dev, self.cache.k, self.cache.v, self.pools, row_index)
        else:
            if key not in self._graphs:
                self._graphs[key] = self._capture(dev, row_index)
            graph, out = self._graphs[key]
            graph.replay()
        self.replays += 1
        return out[:rows]

    def _buffers(self, bucket: int) -> tuple[StaticInputs, StaticInputs, torch.Tensor]:
        if bucket not in self._inputs:
            host = StaticInputs.allocate(bucket, self.width, torch.device("cpu"), pin=self.capture)
            host.row_to_seq.copy_(torch.arange(bucket))  # constant: every later fill leaves it alone
            dev = StaticInputs.allocate(bucket, self.width, self.device)
            self._inputs[bucket] = (host, dev, torch.zeros(bucket, dtype=torch.long, device=self.device))
        return self._inputs[bucket]

    def _capture(self, dev: StaticInputs, row_index: torch.Tensor) -> tuple[torch.cuda.CUDAGraph, torch.Tensor]:
        def fn() -> torch.Tensor:
            return static_decode_step(self.model, dev, self.cache.k, self.cache.v, self.pools, row_index)

        # warm up on a side stream first (Triton compiles and autotunes there); the buffers hold this
        # step's real inputs, so the warm-up writes the very K/V the replay writes again
        side = torch.cuda.Stream(self.device)
        side.wait_stream(torch.cuda.current_stream(self.device))
        with torch.cuda.stream(side):
            for _ in range(2):
                fn()
        torch.cuda.current_stream(self.device).wait_stream(side)
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph, pool=self._mempool):
            out = fn()
        return graph, out
