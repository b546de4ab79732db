"""parallama's rows: each method's requests (fresh PARA, (IA)³ and LoRA adapters, or N seeded PARA
tenants) through an engine of their own, timed on the engine's steps: prefill to the first token (the
engine's `Request.first_token_time`), decode over the steps after the first (which prefills and decodes
once). Cases that are compared run interleaved, round by round. Also the paged KV memory of a ragged
batch, and `CompiledStep` for --compile.
"""

from __future__ import annotations

import math
import statistics
import sys
import time
from collections.abc import Sequence
from typing import Any, Protocol

import torch

from bench.measure import PeakMemory, bytes_per_decode_step, kv_bytes_per_token, sync
from bench.report import row
from infer.engine import Engine
from infer.sampling import SamplingParams
from model import Llama
from model.peft import Adapter, IA3Config, LoRAConfig, PARAConfig, create_adapter

METHODS = ("base", "para", "ia3", "lora")


def request_adapters(method: str, batch: int, tenants: int = 1) -> list[str | None]:
    """The adapter each request of a batch names: "mixed" cycles base / PARA / (IA)³ / LoRA, base is
    none, and `tenants` > 1 spreads the batch over the adapters f"{method}{i}" (i < tenants)."""
    if method == "mixed":
        return [None if (m := METHODS[i % len(METHODS)]) == "base" else m for i in range(batch)]
    if method == "base":
        return [None] * batch
    if tenants > 1:
        return [f"{method}{i % tenants}" for i in range(batch)]
    return [method] * batch


def tenant_adapters(model: Llama, n: int, seed: int = 0) -> dict[str, Adapter]:
    """n PARA adapters that really differ: seeded random W_down and W_up (a fresh one has W_up = 0, the
    identity for every prompt), small enough that the model still writes text."""
    g = torch.Generator().manual_seed(seed)
    out = {}
    for i in range(n):
        a = create_adapter(model, PARAConfig())
        with torch.no_grad():
            for layer in a.layers:  # both from g (W_down's init draws from the global RNG): reproducible
                for w in (layer["para"].down.weight, layer["para"].up.weight):
                    w.copy_(torch.randn(w.shape, generator=g) * 0.02)
        out[f"para{i}"] = a
    return out


class ParallamaCase:
    """One parallama row's set-up: `batch` requests (adapters per `assign`, default `request_adapters`)
    through an engine of their own, in one batch or, with `sequential`, one after another.

    Construction builds the engine and makes one warm-up run inside `PeakMemory` (the KV pool is
    allocated there, so it counts). `run()` times one more run; `row()` gives the median of the runs.
    Cases that are compared with each other are run interleaved (`run_interleaved`), so a machine
    whose speed drifts during the benchmark (a shared VM) shifts every case alike.
    """

    def __init__(
        self,
        model: Llama,
        ids: list[int],
        new: int,
        beams: int,
        method: str = "base",
        batch: int = 1,
        *,
        adapters: dict[str, Adapter] | None = None,
        assign: list[str | None] | None = None,
        tenants: int = 1,
        sequential: bool = False,
    ) -> None:
        self.model, self.ids, self.new, self.beams, self.method, self.batch = model, ids, new, beams, method, batch
        self.sequential = sequential
        self.device = model.tok_embeddings.weight.device
        self.results: list[tuple[float, float, float]] = []
        with PeakMemory(self.device) as mem:
            per_seq = math.ceil((len(ids) + new) / 16) + 2
            self.live = 1 if sequential else batch
            self.engine = Engine(model, num_blocks=per_seq * self.live * beams, max_batch=max(32, self.live * beams))
            registry = adapters or {}
            if not registry:
                cfgs = {"para": PARAConfig(), "ia3": IA3Config(), "lora": LoRAConfig()}
                registry = {k: create_adapter(model, c) for k, c in cfgs.items()}
            for name, a in registry.items():
                self.engine.add_adapter(name, a)
            names = assign if assign is not None else request_adapters(method, batch, tenants)
            self.tenants = len(set(names)) if method == "mixed" else tenants  # base rows share a mixed batch too
            self.groups = [[a] for a in names] if sequential else [names]
            self.params = SamplingParams(max_new_tokens=new, beams=beams, ignore_eos=True)
            self._run()  # warm-up
        self.peak_mem_mib = mem.mib

    def _run(self) -> tuple[float, float, float]:
        """(wall time, time to the first tokens (each group's prefill, its sampling included), decode tok/s
        of the steps after the first) of all requests."""
        wall = first = decode_time = 0.0
        decoded = 0
        for group in self.groups:
            reqs = [self.engine.add_request(self.ids, self.params, adapter=a) for a in group]
            sync(self.device)
            t0 = time.perf_counter()
            self.engine.step()
            sync(self.device)
            t1 = time.perf_counter()
            steps = 0
            while self.engine.has_unfinished():
                self.engine.step()
                steps += 1
            sync(self.device)
            t2 = time.perf_counter()
            assert all(len(r.output_ids) == self.new for r in reqs) or self.beams > 1
            ttft = max(r.first_token_time for r in reqs) - t0  # the first step's prefill part
            wall, first, decode_time = wall + t2 - t0, first + ttft, decode_time + t2 - t1
            decoded += len(group) * steps
        return wall, first, decoded / max(decode_time, 1e-9)

    def run(self) -> None:
        self.results.append(self._run())

    def row(self) -> dict[str, Any]:
        t_total, t_first, decode_tps = (statistics.median(r[i] for r in self.results) for i in range(3))
        model, ids, batch = self.model, self.ids, self.batch
        out = row(
            "parallama",
            self.method,
            beams=self.beams,
            batch=1 if self.sequential else batch,
            prompt_len=len(ids),
            new_tokens=self.new,
            t_total=t_total,
            t_prefill=t_first,
            tenants=self.tenants,
            requests=batch,
            mode="sequential" if self.sequential else "batched",
            # steps after the first are pure decode (one token per sequence), measured directly
            decode_tps=decode_tps,
            prefill_tps=batch * len(ids) / t_first,  # to the first token, as the peers
            kv_bytes=self.engine.peak_blocks_used * self.engine.cache.block_size * kv_bytes_per_token(model),
            peak_mem_mib=self.peak_mem_mib,
        )
        # per run, in round order: run_interleaved's cases share rounds, so their ratios can be paired
        out["runs_tps"] = [batch * self.new / r[0] for r in self.results]
        out["runs_decode_tps"] = [r[2] for r in self.results]
        out["runs_prefill_tps"] = [batch * len(ids) / r[1] for r in self.results]
        step_bytes = bytes_per_decode_step(model, len(ids) + self.new // 2, self.live * self.beams)  # mid-generation
        out["decode_gbs"] = step_bytes * decode_tps / self.live / 1e9  # a step gives each live request one token
        return out


class Case(Protocol):
    """What `run_interleaved` rounds: ParallamaCase, and the peers timed in the same rounds (LlamaCppCase)."""

    def run(self) -> None: ...

    def row(self) -> dict[str, Any]: ...


def run_interleaved(cases: Sequence[Case], runs: int) -> list[dict[str, Any]]:
    """`runs` rounds, each timing every case once (the order rotated each round, so no case always runs
    first), then each case's row (medians over its runs; its per-run figures kept for paired ratios)."""
    for i in range(runs):
        for case in [*cases[i % len(cases) :], *cases[: i % len(cases)]]:
            case.run()
    return [case.row() for case in cases]


def bench_parallama(
    model: Llama, ids: list[int], new: int, beams: int, runs: int, method: str = "base", batch: int = 1, **kw: Any
) -> dict[str, Any]:
    """One parallama row on its own (keywords as `ParallamaCase`)."""
    return run_interleaved([ParallamaCase(model, ids, new, beams, method, batch, **kw)], runs)[0]


class CompiledStep:
    """model.forward_step through torch.compile; the first failure (no compiler, an unsupported op)
    prints one line and every later step runs eagerly, so --compile never ends the benchmark."""

    def __init__(self, model: Llama) -> None:
        self.eager = model.forward_step
        self.compiled = torch.compile(self.eager, dynamic=True)
        self.error: str | None = None

    def __call__(self, *args: Any, **kwargs: Any) -> torch.Tensor:
        if self.error is None:
            try:
                return self.compiled(*args, **kwargs)
            except Exception as e:  # a compile error surfaces at the first call, not at torch.compile
                self.error = f"{type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}"[:200]
                print(f"--compile failed ({self.error}); running eager", file=sys.stderr, flush=True)
        return self.eager(*args, **kwargs)


# ---- paged KV memory -----------------------------------------------------------------------------------------


def kv_memory_ragged(model: Llama, lens: list[int], new: int, block_size: int = 16) -> dict[str, Any]:
    """Peak paged KV bytes for a ragged batch vs the bytes its tokens need and a contiguous cache."""
    engine = Engine(model, num_blocks=512, block_size=block_size)
    g = torch.Generator().manual_seed(0)
    prompts = [
        torch.randint(
            min(100, model.args.vocab_size // 2), min(40000, model.args.vocab_size), (n,), generator=g
        ).tolist()
        for n in lens
    ]
    engine.generate(prompts, SamplingParams(max_new_tokens=new, ignore_eos=True))
    per_token = kv_bytes_per_token(model)
    needed = sum(n + new for n in lens) * per_token
    paged = engine.peak_blocks_used * block_size * per_token
    padded = len(lens) * (max(lens) + new) * per_token
    full = len(lens) * model.args.max_seq_len * per_token
    return {
        "lens": lens,
        "new_tokens": new,
        "needed_bytes": needed,
        "paged_bytes": paged,
        "contiguous_batch_max_bytes": padded,
        "contiguous_max_seq_len_bytes": full,
    }
