"""The engine across tensor-parallel ranks: rank 0 schedules and samples, every rank runs every step.

Under `torchrun --nproc-per-node N`, each rank loads its shard (`Llama.from_pretrained(..., tp=N)`) and builds a
`TPEngine` over it; the KV pool and the adapter scale pools of each rank hold only its heads and columns. Rank 0
(the driver) is an ordinary `Engine`, except that before each model step it broadcasts what the step needs (the
packed tokens, the `StepBatch` tensors, which adapters own which rows, the copy-on-write block copies and the pool
rows admitted requests took); the other ranks (workers) rebuild the step over their own pools and run
`forward_step` with it, which is where the model's all-reduces and the logits all-gather meet. Only rank 0 samples.

Two ways to drive it, both with the same code on every rank up to this point:

    outs = engine.generate(prompts, params)   # every rank calls it; rank 0 schedules, the others follow it,
                                              # and every rank returns rank 0's outputs
or, for a server (infer.serve) or a streaming CLI, vLLM's split:

    if engine.is_driver:
        ...engine.add_request / step / stream / generate, as with Engine...; engine.close()
    else:
        engine.run_worker()                   # until rank 0 closes the engine (at the latest when it exits)

Adapters: `add_adapter` on every rank before that split (a whole adapter is sliced here, a shard from
`weights.load_adapter` is taken as it is); while workers run `run_worker`, the driver adds or removes one for
every rank with `share_adapter(name, whole_adapter)` / `unshare_adapter(name)`.
"""

from __future__ import annotations

import atexit
import copy
import math
import pickle
from dataclasses import fields
from types import SimpleNamespace
from typing import Any

import numpy as np
import torch
import torch.distributed as dist

from infer.cache import PagedKVCache
from infer.engine import Engine, GenerationOutput, _free_memory_bytes
from model import Llama
from model.peft import Adapter
from model.step import AdapterStep, StepBatch
from model.tp import COMM


class TPEngine(Engine):
    def __init__(
        self,
        model: Llama,
        *,
        num_blocks: int | None = None,
        block_size: int = 16,
        memory_fraction: float = 0.05,
        max_batch: int = 32,
    ) -> None:
        """As `Engine`; collective (every rank builds one). Every rank's pool gets the same number of blocks:
        the smallest any rank's `memory_fraction` of free memory allows, unless `num_blocks` is given."""
        self.tp = model.tp
        self.is_driver = self.tp.rank == 0
        weight = model.tok_embeddings.weight
        self._device = weight.device
        if num_blocks is None:
            args = model.local_args
            budget = int(_free_memory_bytes(weight.device) * memory_fraction)
            num_blocks = PagedKVCache.blocks_for_budget(args, block_size, budget, weight.dtype)
            num_blocks = min(num_blocks, max_batch * math.ceil(args.max_seq_len / block_size))
        n = torch.tensor([num_blocks], device=self._device)
        if self.tp.size > 1:
            dist.all_reduce(n, op=dist.ReduceOp.MIN, group=self.tp.group)
        # no CUDA graphs: a replayed decode step would skip the broadcast that keeps the other ranks in step
        super().__init__(model, num_blocks=int(n), block_size=block_size, max_batch=max_batch, cuda_graphs=False)
        self._copies: list[tuple[int, int]] = []  # driver: block copies and slot takes since the last step
        self._takes: list[tuple[int, str]] = []
        self._closed = False
        if self.is_driver:
            self.cache.on_copy = lambda src, dst: self._copies.append((src, dst))
            self.model = _Driving(model, self)  # type: ignore[assignment]  # forward_step: broadcast, then run
            atexit.register(self.close)  # workers are released however the driver's program ends

    # ---- adapters ----------------------------------------------------------------------------------
    def add_adapter(self, name: str, adapter: Adapter) -> None:
        """Register on this rank (every rank does, with the same names): a whole adapter is cut to this
        rank's shard (model/tp.py); a shard (weights.load_adapter under tp) is taken as it is."""
        super().add_adapter(name, self.tp.shard_adapter(adapter, self.model.args))

    def share_adapter(self, name: str, adapter: Adapter) -> None:
        """Driver only, while the workers run `run_worker`: register a whole adapter on every rank."""
        if getattr(adapter, "tp_shard", None) is not None:
            raise ValueError(f"share_adapter({name!r}) needs the whole adapter, not a rank's shard")
        self._driver_only("share_adapter")
        self.add_adapter(name, adapter)
        self._send({"op": "add", "name": name, "adapter": copy.deepcopy(adapter).cpu()})  # not on rank 0's GPU

    def unshare_adapter(self, name: str) -> None:
        """Driver only, while the workers run `run_worker`: remove an adapter on every rank."""
        self._driver_only("unshare_adapter")
        self.remove_adapter(name)
        self._send({"op": "remove", "name": name})

    def _take_slot(self, req: Any) -> None:
        super()._take_slot(req)
        if self.is_driver and req.slot:
            self._takes.append((req.slot, req.adapter))  # the workers write the same pool row next step

    # ---- driving -----------------------------------------------------------------------------------
    def generate(self, prompts: Any, params: Any = None, adapters: Any = None) -> list[GenerationOutput]:
        """`Engine.generate`, called on every rank: rank 0 schedules, the others run its steps until it is done;
        every rank returns rank 0's outputs (or raises its error)."""
        if not self.is_driver:
            return self._follow()
        try:
            outs = super().generate(prompts, params, adapters)
        except BaseException as e:
            self._send({"op": "raise", "error": _picklable(e)})
            raise
        self._send({"op": "return", "value": outs})
        return outs

    def close(self) -> None:
        """Driver: stop the workers' loops (once; also at exit)."""
        if self.is_driver and not self._closed and self.tp.size > 1 and dist.is_initialized():
            self._closed = True
            self._send({"op": "stop"})

    def _driver_only(self, what: str) -> None:
        if not self.is_driver:
            raise RuntimeError(f"{what} is rank 0's (the driver's) to call")

    def _send_step(self, tokens: torch.Tensor, step: StepBatch) -> None:
        names = {id(a): n for n, a in self.adapters.items()}
        ad = step.adapters
        adapters = None
        if ad is not None:
            adapters = {
                "scaled": bool(ad.pools),
                "row_slots": _np(ad.row_slots),
                "row_to_seq": _np(ad.row_to_seq),
                "compute": [(names[id(a)], _np(rows), _np(slots)) for a, rows, slots in ad.compute],
                "lora": [(names[id(a)], _np(rows)) for a, rows in ad.lora],
            }
        batch = {f.name: _np(getattr(step, f.name)) for f in fields(StepBatch) if f.name != "adapters"}
        msg = {"op": "step", "tokens": _np(tokens), "batch": batch, "adapters": adapters}
        msg.update(copies=self._copies, takes=self._takes)
        self._copies, self._takes = [], []
        self._send(msg)

    # ---- following ---------------------------------------------------------------------------------
    def run_worker(self) -> int:
        """A worker's loop: run rank 0's steps until it closes the engine. Returns 0 (an exit status)."""
        self._workers_only("run_worker")
        while True:
            msg = self._recv()
            if msg["op"] == "stop":
                return 0
            self._handle(msg)  # a driver-side generate's "return" / "raise" concern only rank 0's caller

    def _follow(self) -> list[GenerationOutput]:
        while True:
            msg = self._recv()
            if msg["op"] == "return":
                return msg["value"]
            if msg["op"] == "raise":
                raise msg["error"]
            if msg["op"] == "stop":
                raise RuntimeError("rank 0 closed the engine during generate")
            self._handle(msg)

    def _workers_only(self, what: str) -> None:
        if self.is_driver:
            raise RuntimeError(f"{what} is for ranks other than 0 (rank 0 drives)")

    def _handle(self, msg: dict[str, Any]) -> None:
        if msg["op"] == "add":
            self.add_adapter(msg["name"], msg["adapter"])
        elif msg["op"] == "remove":
            self.remove_adapter(msg["name"])
        elif msg["op"] == "step":
            self._run_step(msg)

    @torch.inference_mode()
    def _run_step(self, msg: dict[str, Any]) -> None:
        for src, dst in msg["copies"]:  # copy-on-write of blocks shared by beams, as rank 0 did
            self.cache.copy_block(src, dst)
        for slot, name in msg["takes"]:  # the pool row rank 0 gave an admitted request: write this rank's part
            self.free_slots.append(slot)  # `_take_slot` pops it again (the worker's free list is otherwise unused)
            Engine._take_slot(self, SimpleNamespace(adapter=name, slot=0))
        dev = self._device
        step = StepBatch(**{k: _tensor(v, dev) for k, v in msg["batch"].items()})
        a = msg["adapters"]
        if a is not None:
            step.adapters = AdapterStep(
                pools=self.pools if a["scaled"] else {},
                row_slots=_tensor(a["row_slots"], dev),
                row_to_seq=_tensor(a["row_to_seq"], dev),
                compute=[(self.adapters[n], _tensor(r, dev), _tensor(s, dev)) for n, r, s in a["compute"]],
                lora=[(self.adapters[n], _tensor(rows, dev)) for n, rows in a["lora"]],
            )
        self.model.forward_step(_tensor(msg["tokens"], dev), step, self.cache.k, self.cache.v)

    # ---- transport: one pickled message per broadcast, sized first ----------------------------------
    def _send(self, msg: dict[str, Any]) -> None:
        data = pickle.dumps(msg)
        size = torch.tensor([len(data)], dtype=torch.long, device=self._device)
        dist.broadcast(size, 0, group=self.tp.group)
        # a tensor of its own memory: one over Python's bytes would make gloo's thread touch a Python object
        buf = torch.frombuffer(bytearray(data), dtype=torch.uint8).to(self._device, copy=True)
        dist.broadcast(buf, 0, group=self.tp.group)
        COMM.add("broadcast", len(data) + size.element_size())

    def _recv(self) -> dict[str, Any]:
        size = torch.zeros(1, dtype=torch.long, device=self._device)
        dist.broadcast(size, 0, group=self.tp.group)
        buf = torch.empty(int(size), dtype=torch.uint8, device=self._device)
        dist.broadcast(buf, 0, group=self.tp.group)
        return pickle.loads(buf.cpu().numpy().tobytes())  # from rank 0 of this job: trusted


class _Driving:
    """The model as the driver's scheduler sees it: each `forward_step` first sends the step to the workers.
    Everything else is the model's own."""

    def __init__(self, model: Llama, engine: TPEngine) -> None:
        self._model, self._engine = model, engine

    def __getattr__(self, name: str) -> Any:
        return getattr(self._model, name)

    def forward_step(
        self, tokens: torch.Tensor, step: StepBatch, k_cache: torch.Tensor, v_cache: torch.Tensor
    ) -> torch.Tensor:
        self._engine._send_step(tokens, step)
        return self._model.forward_step(tokens, step, k_cache, v_cache)


def _np(v: Any) -> Any:
    """Tensors travel as numpy arrays (pickling a torch tensor runs torch.save's zip writer: slow per step)."""
    return v.cpu().numpy() if isinstance(v, torch.Tensor) else v


def _tensor(v: Any, device: torch.device) -> Any:
    return torch.from_numpy(v).to(device) if isinstance(v, np.ndarray) else v


def _picklable(e: BaseException) -> BaseException:
    try:
        pickle.dumps(e)
        return e
    except Exception:
        return RuntimeError(f"rank 0: {type(e).__name__}: {e}")


def make_engine(model: Llama, **kwargs: Any) -> Engine:
    """`TPEngine` for a tensor-parallel shard, a plain `Engine` otherwise."""
    return TPEngine(model, **kwargs) if model.tp.size > 1 else Engine(model, **kwargs)
