"""Tensor parallelism over torch.distributed (Megatron's layout, as gpt-fast's tp.py and vLLM use it).

With `size` ranks, rank k keeps:
- column-parallel wq | wk | wv and w1 | w3: its rows (its query heads, its KV heads, its FFN columns), so the
  fused QKV and gate/up GEMMs stay one GEMM each on a (rows / size, d) shard;
- row-parallel wo and w2: the matching input columns; their partial outputs are summed by one all-reduce each;
- the embedding: its vocab rows (vocab-parallel: a masked lookup + one all-reduce), or, for Meta Llama 1/2
  shards that split it on the model width, its columns (one all-gather), so a rank reads only its own file;
- the output projection: its vocab rows; the logits are all-gathered (every rank returns the full logits);
- norms: replicated.
KV heads are split when n_kv_heads % size == 0; otherwise (size a multiple of n_kv_heads) each KV head is
replicated on size / n_kv_heads ranks, as vLLM does. Adapters follow the columns they scale (`shard_adapter`).
The same layout tells weights/ which slice of each checkpoint tensor a rank reads (`spec`).
Every collective goes through this file and is counted in `COMM`. Inference only: the collectives carry no
gradient.
"""

from __future__ import annotations

import atexit
import dataclasses
import math
import os
from collections import Counter
from dataclasses import dataclass, field
from datetime import timedelta
from typing import Any

import torch
import torch.distributed as dist
import torch.nn as nn
import torch.nn.functional as F

from model.args import ModelArgs
from model.peft.base import Adapter

# Meta parameter (within a layer) → the output columns it holds: "q" query heads, "k"/"v" KV heads, "u" FFN
COLUMN = {"attention.wq": "q", "attention.wk": "k", "attention.wv": "v", "feed_forward.w1": "u", "feed_forward.w3": "u"}
ROW = {"attention.wo": "q", "feed_forward.w2": "u"}
# adapters: peft module → the model columns it touches, and whether the module is row-parallel
LORA_COLUMNS = {"q_proj": "q", "k_proj": "k", "v_proj": "v", "gate_proj": "u", "up_proj": "u"}
LORA_ROWS = {"o_proj": "q", "down_proj": "u"}
IA3_COLUMNS = {"q_proj": "q", "k_proj": "k", "v_proj": "v", "up_proj": "u", "down_proj": "u"}


@dataclass
class CommCounter:
    """Calls and payload bytes per collective (each rank's own tensor: an all-gather's input, not its output)."""

    calls: Counter = field(default_factory=Counter)
    bytes: Counter = field(default_factory=Counter)

    def add(self, op: str, nbytes: int) -> None:
        self.calls[op] += 1
        self.bytes[op] += nbytes

    def reset(self) -> None:
        self.calls.clear()
        self.bytes.clear()


COMM = CommCounter()


@dataclass(frozen=True)
class Spec:
    """The part of a full tensor a rank keeps: [start, stop) along `dim`, zero-padded to `size` there."""

    dim: int
    start: int
    stop: int
    size: int


def valid_sizes(args: ModelArgs) -> list[int]:
    """Every tp that fits the model: it divides n_heads and the FFN width, and divides or is a multiple of
    n_kv_heads (KV heads split, or replicated as vLLM does)."""
    kv = args.n_kv_heads
    return [
        t
        for t in range(1, args.n_heads + 1)
        if args.n_heads % t == 0 and args.ffn_dim % t == 0 and (kv % t == 0 or t % kv == 0)
    ]


def check_size(args: ModelArgs, tp: int) -> None:
    """A one-line ValueError naming --tp and the values that work."""
    ok = valid_sizes(args)
    if tp not in ok:
        raise ValueError(
            f"--tp {tp} does not fit this model (n_heads={args.n_heads}, n_kv_heads={args.n_kv_heads}, "
            f"ffn_dim={args.ffn_dim}: tp must divide n_heads and ffn_dim and divide or be a multiple of "
            f"n_kv_heads); values that work: {', '.join(map(str, ok))}"
        )


@dataclass(frozen=True)
class TensorParallel:
    rank: int = 0
    size: int = 1
    embedding: str = "vocab"  # "vocab": rows split (VocabParallelEmbedding); "dim": columns (ParallelEmbedding)
    group: Any = None  # the process group (None: the default one)

    # ---- layout ----------------------------------------------------------------------------------
    def kv_replicas(self, args: ModelArgs) -> int:
        """Ranks sharing one KV head (1 when KV heads are split)."""
        return 1 if args.n_kv_heads % self.size == 0 else self.size // args.n_kv_heads

    def columns(self, args: ModelArgs, target: str) -> tuple[int, int]:
        """[start, stop) of this rank's output columns of a projection: "q", "k", "v" or "u" (FFN)."""
        if target in "kv" and self.kv_replicas(args) > 1:
            head = self.rank // self.kv_replicas(args)
            return head * args.head_dim, (head + 1) * args.head_dim
        width = args.scale_width(target)
        per = width // self.size
        return self.rank * per, (self.rank + 1) * per

    def vocab_rows(self, args: ModelArgs) -> tuple[int, int, int]:
        """(start, stop, padded rows): the vocab is cut in equal pieces of ceil(V / size), the last zero-padded."""
        per = math.ceil(args.vocab_size / self.size)
        start = min(self.rank * per, args.vocab_size)
        return start, min(start + per, args.vocab_size), per

    def local_args(self, args: ModelArgs) -> ModelArgs:
        """The shapes this rank's layers see: its heads and FFN columns (vocab, dim, layers unchanged)."""
        if self.size == 1:
            return args
        check_size(args, self.size)
        kv = args.n_kv_heads // self.size if self.kv_replicas(args) == 1 else 1
        return dataclasses.replace(
            args,
            n_heads=args.n_heads // self.size,
            n_kv_heads=kv,
            head_dim=args.head_dim,
            hidden_dim=args.ffn_dim // self.size,
        )

    def spec(self, args: ModelArgs, name: str) -> Spec | None:
        """Which slice of the full Meta-named tensor `name` this rank keeps; None: the whole (replicated)."""
        if self.size == 1:
            return None
        if name in ("tok_embeddings.weight", "output.weight"):
            if name == "tok_embeddings.weight" and self.embedding == "dim":
                per = args.dim // self.size
                return Spec(1, self.rank * per, (self.rank + 1) * per, per)
            start, stop, per = self.vocab_rows(args)
            return Spec(0, start, stop, per)
        parts = name.split(".")
        if parts[0] != "layers" or len(parts) != 5:
            return None
        module = ".".join(parts[2:4])
        if module in COLUMN:
            start, stop = self.columns(args, COLUMN[module])
            return Spec(0, start, stop, stop - start)
        if module in ROW:
            start, stop = self.columns(args, ROW[module])
            return Spec(1, start, stop, stop - start)
        return None

    def shard(self, args: ModelArgs, name: str, full: torch.Tensor) -> torch.Tensor:
        """This rank's part of a full tensor (a copy; zero rows pad the last vocab piece)."""
        s = self.spec(args, name)
        return full.clone() if s is None else pad_to(full.narrow(s.dim, s.start, s.stop - s.start), s)

    # ---- modules and collectives -----------------------------------------------------------------
    def make_embedding(self, args: ModelArgs) -> nn.Embedding:
        if self.size == 1:
            return nn.Embedding(args.vocab_size, args.dim)
        if self.embedding == "dim":
            return ParallelEmbedding(self, args)
        return VocabParallelEmbedding(self, args)

    def all_reduce(self, x: torch.Tensor) -> torch.Tensor:
        """Sum the ranks' partial outputs (after a row-parallel projection); identity for one rank."""
        if self.size == 1:
            return x
        x = x.contiguous()
        COMM.add("all_reduce", x.numel() * x.element_size())
        dist.all_reduce(x, group=self.group)
        return x

    def gather_last(self, x: torch.Tensor, full: int) -> torch.Tensor:
        """The ranks' pieces of the last dim side by side, cut to `full` (the vocab padding dropped)."""
        if self.size == 1:
            return x
        x = x.contiguous()
        parts = [torch.empty_like(x) for _ in range(self.size)]
        COMM.add("all_gather", x.numel() * x.element_size())
        dist.all_gather(parts, x, group=self.group)
        return torch.cat(parts, -1)[..., :full]

    def _gather(self, x: torch.Tensor) -> list[torch.Tensor]:
        parts = [torch.empty_like(x) for _ in range(self.size)]
        dist.all_gather(parts, x.contiguous(), group=self.group)
        return parts

    # ---- adapters --------------------------------------------------------------------------------
    def shard_adapter(self, adapter: Adapter, args: ModelArgs) -> Adapter:
        """This rank's part of a full adapter for a model of `args`: PARA's W_down replicated and W_up / b_up
        rows cut to the rank's q / v / u columns; (IA)³ vectors cut; LoRA's B cut (A whole) for column-parallel
        targets, A's columns cut (B whole) for wo / w2, whose partial outputs the all-reduce then sums."""
        if self.size == 1 or getattr(adapter, "tp_shard", None) is not None:
            return adapter
        local = self.local_args(args)
        with torch.device("meta"):
            shard = type(adapter)(local, adapter.config)
        sd = {k: self._adapter_tensor(adapter, args, k, v.detach()) for k, v in adapter.state_dict().items()}
        shard.load_state_dict(sd, assign=True)
        shard.base_fingerprint = adapter.base_fingerprint
        shard.tp_shard = (self.rank, self.size)  # a shard is not a file: save_adapter refuses it
        return shard.train(adapter.training)

    def _adapter_tensor(self, adapter: Adapter, args: ModelArgs, key: str, t: torch.Tensor) -> torch.Tensor:
        parts = key.split(".")  # layers.{i}.para.up.weight | layers.{i}.{module}[.lora_A.weight]
        if adapter.method == "para":
            if parts[3] != "up":
                return t.clone()  # W_down: replicated
            idx, offset = [], 0
            for target, width in adapter.sizes.items():  # l = [l_q | l_v | l_u] (the adjusted ones)
                start, stop = self.columns(args, target)
                idx.append(torch.arange(offset + start, offset + stop))
                offset += width
            return t[torch.cat(idx).to(t.device)].clone()
        if adapter.method == "ia3":
            start, stop = self.columns(args, IA3_COLUMNS[parts[2]])
            return t[start:stop].clone()
        module, which = parts[2], parts[3]
        if module in LORA_COLUMNS and which == "lora_B":
            start, stop = self.columns(args, LORA_COLUMNS[module])
            return t[start:stop].clone()
        if module in LORA_ROWS and which == "lora_A":
            start, stop = self.columns(args, LORA_ROWS[module])
            return t[:, start:stop].clone()
        return t.clone()

    # ---- the base fingerprint -----------------------------------------------------------------------
    def fingerprint_tensors(self, model: Any, n: int = 4096) -> tuple[torch.Tensor, ...]:
        """The first n values of the full tok_embeddings, layer 0's wqkv and the last w2 (what
        `model_fingerprint` hashes), rebuilt from the ranks' pieces once (a collective) and cached, so that
        an adapter's base-model check sees the same weights as in one process."""
        cached = model.__dict__.get("_tp_fingerprint")
        if cached is not None:
            return cached
        args = model.args
        rows = math.ceil(n / args.dim)
        emb = model.tok_embeddings.weight.detach()
        if self.embedding == "dim":
            head = torch.cat(self._gather(emb[:rows]), 1)
        else:
            start, stop, _ = self.vocab_rows(args)
            head = self._prefix(emb, rows, stop - start)
        wq, wk, wv = model.layers[0].attention.wqkv.detach().split(model.layers[0].attention.split)
        qkv = [self._prefix(wq, rows, wq.shape[0])]
        if args.q_dim < rows:  # a model so small that wk / wv reach into the first n values too
            keep = wk.shape[0] if self.rank % self.kv_replicas(args) == 0 else 0  # each KV head once
            qkv += [self._prefix(wk, rows, keep), self._prefix(wv, rows, keep)]
        w2 = model.layers[-1].feed_forward.w2.weight.detach()
        down = torch.cat(self._gather(w2[:rows]), 1)  # (rows, ffn): the full rows
        out = tuple(t.flatten()[:n] for t in (head, torch.cat(qkv), down))
        model.__dict__["_tp_fingerprint"] = out
        return out

    def _prefix(self, local: torch.Tensor, rows: int, real: int) -> torch.Tensor:
        """The first `rows` rows of the full tensor whose rank pieces are stacked by rows (`real`: this rank's
        rows without padding; 0 to leave a replica out)."""
        pieces = self._gather(local[:rows])
        reals = self._gather(torch.tensor([real], device=local.device))
        return torch.cat([p[: int(r)] for p, r in zip(pieces, reals)])[:rows]


SINGLE = TensorParallel()


def pad_to(t: torch.Tensor, s: Spec) -> torch.Tensor:
    """`t` (stop - start along s.dim) zero-padded to s.size there, as a fresh contiguous tensor."""
    if t.shape[s.dim] == s.size:
        return t.contiguous().clone()
    shape = list(t.shape)
    shape[s.dim] = s.size
    out = t.new_zeros(shape)
    out.narrow(s.dim, 0, t.shape[s.dim]).copy_(t)
    return out


class VocabParallelEmbedding(nn.Embedding):
    """The rank's vocab rows; a token outside them contributes zeros, so one all-reduce assembles the rows exactly."""

    def __init__(self, tp: TensorParallel, args: ModelArgs) -> None:
        start, stop, per = tp.vocab_rows(args)
        super().__init__(per, args.dim)
        self.tp, self.start, self.real = tp, start, stop - start

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        local = tokens - self.start
        outside = (local < 0) | (local >= self.real)
        x = F.embedding(local.masked_fill(outside, 0), self.weight)  # (..., d)
        return self.tp.all_reduce(x.masked_fill(outside[..., None], 0))


class ParallelEmbedding(nn.Embedding):
    """Meta's Llama 1/2 layout: the rank's d / size embedding columns; one all-gather assembles the width."""

    def __init__(self, tp: TensorParallel, args: ModelArgs) -> None:
        super().__init__(args.vocab_size, args.dim // tp.size)
        self.tp, self.dim = tp, args.dim

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        return self.tp.gather_last(F.embedding(tokens, self.weight), self.dim)  # (..., d)


def join(size: int, device: torch.device | str = "cpu") -> tuple[TensorParallel, torch.device]:
    """This process's place in a tp-way group started by torchrun (WORLD_SIZE == size), and its device
    (cuda:LOCAL_RANK for a bare "cuda"). Starts the default process group when none is: NCCL on CUDA,
    gloo on CPU."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world != size:
        raise ValueError(
            f"--tp {size} needs {size} processes (torchrun --nproc-per-node {size} ...); "
            f"this run has WORLD_SIZE={world}"
        )
    dev = torch.device(device)
    if dev.type == "cuda" and dev.index is None:
        dev = torch.device("cuda", int(os.environ.get("LOCAL_RANK", "0")))
    if dev.type == "cuda":
        torch.cuda.set_device(dev)
    if not dist.is_initialized():
        dist.init_process_group(backend="nccl" if dev.type == "cuda" else "gloo")
        atexit.register(_destroy)
    return TensorParallel(dist.get_rank(), size), dev


def _destroy() -> None:
    """At exit, while the interpreter is whole: gloo's threads must not outlive it (they hold tensors). The ranks
    first wait for one another, so none tears its connections down under a peer's last collective."""
    if not dist.is_initialized():
        return
    try:
        if dist.get_backend() == "gloo":
            dist.monitored_barrier(timeout=timedelta(seconds=60))  # a dead peer: an error, not a hang
    except RuntimeError:
        pass
    dist.destroy_process_group()
