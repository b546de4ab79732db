"""The step protocol between the engine (infer/) and the model: what one cached step carries.

The engine packs the new tokens of S sequences into M rows and describes them with a `StepBatch` (positions,
cache slots, block tables); adapters ride along as an `AdapterStep` (pools of scale vectors, one row per
slot, and per-adapter LoRA rows). `Llama.forward_step` reads both; nothing here touches weights or files.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

from model.args import ModelArgs
from model.peft.base import Adapter, LoRADelta


def scale_columns(args: ModelArgs) -> dict[str, tuple[str, slice]]:
    """Where each adapter scale lives: (pool, column slice); q, k, v share the fused QKV projection's
    columns in that order, u has a pool of its own. Widths: `ModelArgs.scale_width`."""
    cols, start = {}, 0
    for t in "qkv":
        width = args.scale_width(t)
        cols[t] = ("qkv", slice(start, start + width))
        start += width
    cols["u"] = ("u", slice(0, args.scale_width("u")))
    return cols


@dataclass
class AdapterStep:
    """Adapters on the cached path.

    Scale adapters (PARA, (IA)³) live in two pools, the fused QKV columns and the FFN up columns, one
    row per slot (slot 0 stays 1, the identity, for rows without one): PARA vectors are computed once,
    in the prefill step, from each sequence's last prompt row; (IA)³ vectors are written when the
    request is admitted; every later step only gathers. LoRA rows are grouped per adapter and pay their
    low-rank matmuls every step.
    """

    pools: dict[str, torch.Tensor]  # "qkv" (q | k | v columns) / "u" → (n_layers, n_slots, width)
    row_slots: torch.Tensor  # (M,) the pool row each packed row reads, or (1,): one row for all
    # (adapter, packed rows holding each sequence's last prompt token (n,), their slots (n,))
    compute: list[tuple[Adapter, torch.Tensor, torch.Tensor]] = field(default_factory=list)
    lora: list[tuple[Adapter, torch.Tensor | None]] = field(default_factory=list)  # (adapter, its rows | None: all)
    # prefill packs each sequence's rows together: row_slots then holds one slot per sequence (S,) and this
    # maps packed rows to them (M,), so a layer's scales are (S, width), never expanded to every row
    row_to_seq: torch.Tensor | None = None

    @staticmethod
    def make_pool(
        args: ModelArgs, pool: str, n_slots: int, dtype: torch.dtype = torch.float32, device: torch.device | str = "cpu"
    ) -> torch.Tensor:
        """An all-ones (identity) pool, stacked over layers: "qkv" scales the fused Q|K|V projection's
        columns, "u" the FFN up projection's."""
        width = max(cols.stop for p, cols in scale_columns(args).values() if p == pool)
        return torch.ones(args.n_layers, n_slots, width, dtype=dtype, device=device)

    def layer(
        self, i: int, h: torch.Tensor, gathered: dict[str, torch.Tensor] | None
    ) -> tuple[dict[str, torch.Tensor], dict[str, list[LoRADelta]]]:
        """Layer i's scales and LoRA deltas: per row (M, width), or per sequence (S, width) with "rows" the
        (M,) row → sequence map (`row_to_seq`). Prefill first writes the vectors computed from this layer's
        input h; decode reads `gathered`, taken once per step for all layers."""
        if gathered is not None:
            scales = {t: g[i] for t, g in gathered.items()}
        else:
            for adapter, rows, slots in self.compute:  # pool at each sequence's last prompt row
                where = scale_columns(adapter.args)
                for t, vec in adapter.scales(i, h[rows]).items():
                    pool, cols = where[t]
                    self.pools[pool][i, slots, cols] = vec.to(self.pools[pool].dtype)
            scales = {t: p[i, self.row_slots] for t, p in self.pools.items()}
        if scales and self.row_to_seq is not None:
            scales["rows"] = self.row_to_seq
        lora: dict[str, list[LoRADelta]] = {}
        for adapter, rows in self.lora:
            for proj, d in adapter.deltas(i).items():
                lora.setdefault(proj, []).append(d._replace(rows=rows))
        return scales, lora


@dataclass
class StepBatch:
    """One cached step over the packed rows of S sequences: prefill chunks, decode rows, or both.

    Row m is the `row_index[m]`-th new token of sequence `row_to_seq[m]`, at absolute position
    `positions[m]`; its K/V go to cache slot `slots[m]` (block * block_size + offset).
    """

    positions: torch.Tensor  # (M,)
    row_to_seq: torch.Tensor  # (M,)
    row_index: torch.Tensor  # (M,)
    slots: torch.Tensor  # (M,)
    block_tables: torch.Tensor  # (S, max_blocks), padded with any valid block id
    seq_lens: torch.Tensor  # (S,) context length after this step's writes
    max_rows: int  # most new rows any sequence has in this step (1 for pure decode)
    logit_rows: torch.Tensor | None = None  # rows whose logits are returned (None: all)
    adapters: AdapterStep | None = None  # per-row adapters (None: no row has one)
    # one sequence whose blocks are consecutive ids: (first block, context length); its K/V are then a
    # slice of the pool, which backends may read in place (decided once per step, not per layer)
    contiguous_kv: tuple[int, int] | None = None
