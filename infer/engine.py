"""Continuous-batching engine over the paged KV cache.

One request's path: tokens → Request (its sequences, sampling params, adapter) → admitted when its
prompt's blocks fit → prefill (one packed step for every admitted prompt) → sample → decode steps
(one row per running sequence) → stop checks → blocks freed → text. When the pool runs dry the
youngest request is preempted (blocks freed, recomputed later from its tokens), so a request that
fits the pool alone always finishes and no other sequence is ever touched.
"""

from __future__ import annotations

import math
import os
import time
from collections import deque
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from itertools import count

import torch

from infer.beam import BeamSearch
from infer.cache import BlockTable, CacheFullError, PagedKVCache
from infer.graphs import DecodeGraphs
from infer.sampling import SamplingParams, sample_token
from infer.text import TextStream
from model import Llama
from model.peft import Adapter
from model.step import AdapterStep, scale_columns


@dataclass
class GenerationOutput:
    prompt_ids: list[int]
    token_ids: list[int]  # new tokens, a final stop token included
    text: str  # new text, stop tokens left out and cut before a stop string
    finish_reason: str  # "stop" (eos or stop string), "length" or "abort" (Engine.abort)


@dataclass
class SeqState:
    """One row of the batch: its tokens (the last one not yet in the cache) and its blocks."""

    tokens: list[int]
    table: BlockTable = field(default_factory=BlockTable)
    score: float = 0.0  # beam search: accumulated log-probability


class Request:
    """Everything one request carries through the engine; per-row data lives in its SeqStates."""

    def __init__(self, rid: int, prompt_ids: list[int], params: SamplingParams, adapter: str | None) -> None:
        self.id = rid
        self.prompt_ids = prompt_ids
        self.params = params
        self.adapter = adapter
        self.generator = torch.Generator().manual_seed(params.seed) if params.seed is not None else None
        self.output_ids: list[int] = []
        self.finish_reason: str | None = None
        self.text = ""
        self.beam: BeamSearch | None = None
        self.slot = 0  # row of the engine's scale pools (0 = identity), held while admitted
        self.first_token_time: float | None = None  # time.perf_counter() when its prefill's token was sampled
        self.restart()

    def restart(self) -> None:
        """(Re)start from the prompt and what was generated; beam search starts over (it is deterministic)."""
        if self.params.beams > 1:
            self.output_ids = []
            self.beam = None
        self.seqs = [SeqState(self.prompt_ids + self.output_ids)]

    @property
    def finished(self) -> bool:
        return self.finish_reason is not None


def _free_memory_bytes(device: torch.device) -> int:
    if device.type == "cuda":
        return torch.cuda.mem_get_info(device)[0]
    return os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")


class Engine:
    def __init__(
        self,
        model: Llama,
        *,
        num_blocks: int | None = None,
        block_size: int = 16,
        memory_fraction: float = 0.05,
        max_batch: int = 32,
        cuda_graphs: bool | None = None,
    ) -> None:
        """`num_blocks` sizes the KV pool directly; otherwise it takes `memory_fraction` of free memory
        (capped at what `max_batch` full-length sequences could use). Allocated once, here.
        `cuda_graphs`: replay decode steps as CUDA graphs (infer/graphs.py); None = on when the model is on CUDA."""
        self.model = model
        self.tokenizer = model.tokenizer
        self.max_batch = max_batch
        args = model.local_args  # this rank's KV heads under tensor parallelism (infer/tp_engine.py); else args
        weight = model.tok_embeddings.weight
        if num_blocks is None:
            budget = int(_free_memory_bytes(weight.device) * memory_fraction)
            num_blocks = PagedKVCache.blocks_for_budget(args, block_size, budget, weight.dtype)
            num_blocks = min(num_blocks, max_batch * math.ceil(args.max_seq_len / block_size))
        self.cache = PagedKVCache(args, num_blocks, block_size, dtype=weight.dtype, device=weight.device)
        self.adapters: dict[str, Adapter] = {}
        # PARA / (IA)³ vectors: "qkv" / "u" pools (n_layers, max_batch + 1, width); slot 0 = identity
        self.pools: dict[str, torch.Tensor] = {}
        self.free_slots = list(range(max_batch, 0, -1))
        if cuda_graphs is None:
            cuda_graphs = weight.device.type == "cuda"
        self.graphs = DecodeGraphs(model, self.cache, self.pools, max_batch) if cuda_graphs else None
        self.waiting: deque[Request] = deque()
        self.running: list[Request] = []
        self._ids = count()
        self.num_preemptions = 0
        self.peak_blocks_used = 0

    # ---- adapters ----------------------------------------------------------------------------------
    def add_adapter(self, name: str, adapter: Adapter) -> None:
        """Register an adapter under `name`; requests then name it. Allowed while the engine runs."""
        if name in self.adapters:
            raise ValueError(f"an adapter named {name!r} is already registered")
        self.model.check_adapter(adapter)
        w = self.model.tok_embeddings.weight
        where = scale_columns(self.model.local_args)  # pools hold this rank's columns
        for pool in {where[t][0] for t in adapter.scale_targets}:  # ones: other adapters' rows stay unscaled
            if pool not in self.pools:
                self.pools[pool] = AdapterStep.make_pool(
                    self.model.local_args, pool, self.max_batch + 1, w.dtype, w.device
                )
        self.adapters[name] = adapter.to(device=w.device, dtype=w.dtype).eval()

    def remove_adapter(self, name: str) -> None:
        if name not in self.adapters:
            raise ValueError(f"no adapter named {name!r} is registered")
        users = sum(r.adapter == name for r in [*self.waiting, *self.running])
        if users:
            raise ValueError(f"adapter {name!r} is used by {users} unfinished request(s)")
        self.adapters.pop(name)

    def _take_slot(self, req: Request) -> None:
        """A pool row for a request whose adapter scales projections: PARA fills it at prefill,
        (IA)³'s fixed vectors are written now."""
        adapter = self.adapters.get(req.adapter) if req.adapter is not None else None
        if adapter is None or not adapter.scale_targets:
            return
        req.slot = self.free_slots.pop()
        for p in self.pools.values():
            p[:, req.slot] = 1  # adapters that scale a subset leave the rest at the identity
        if not adapter.prompt_aware:
            where = scale_columns(self.model.local_args)
            for i in range(self.model.args.n_layers):
                for t, vec in adapter.scales(i, None).items():  # (1, width)
                    pool, cols = where[t]
                    self.pools[pool][i, req.slot, cols] = vec[0]

    def _release_slot(self, req: Request) -> None:
        if req.slot:
            self.free_slots.append(req.slot)
            req.slot = 0

    def _adapter_step(
        self, reqs: list[Request], counts: list[int], compute: bool, row_to_seq: torch.Tensor | None = None
    ) -> AdapterStep | None:
        """Per-row adapters for a step over `reqs` (counts[j] packed rows each): pool slots, LoRA row
        groups, and with `compute`, the rows of each PARA sequence's last prompt token. row_to_seq: the
        step's row → request map when each request is one sequence (prefill): scales then stay per request."""
        if not any(r.adapter is not None for r in reqs):
            return None
        dev = self.cache.k.device
        slots, prompt_rows, lora_rows = [], {}, {}
        first = 0
        for r, n in zip(reqs, counts):
            slots += [r.slot] * n  # beams share their request's slot
            adapter = self.adapters.get(r.adapter) if r.adapter is not None else None
            if adapter is not None and adapter.prompt_aware and compute:
                rows, sl = prompt_rows.setdefault(r.adapter, ([], []))
                rows.append(first + len(r.prompt_ids) - 1)
                sl.append(r.slot)
            if adapter is not None and adapter.low_rank:
                lora_rows.setdefault(r.adapter, []).extend(range(first, first + n))
            first += n
        todo = [
            (self.adapters[a], torch.tensor(rw, device=dev), torch.tensor(sl, device=dev))
            for a, (rw, sl) in prompt_rows.items()
        ]
        # a LoRA that owns every row skips the gather / index_add (rows=None)
        lora = [
            (self.adapters[a], None if len(rw) == first else torch.tensor(rw, device=dev))
            for a, rw in lora_rows.items()
        ]
        scaled = any(slots) or todo
        pools = self.pools if scaled else {}  # no scaled row: skip the identity multiplies
        rows = None
        if len(set(slots)) == 1:  # one slot for every row (a lone prompt, its beams): (1, width) scales broadcast
            slots = slots[:1]
        elif row_to_seq is not None and len(slots) > len(reqs):  # prefill: one slot per sequence, not per row
            slots, rows = [r.slot for r in reqs], row_to_seq
        return AdapterStep(
            pools=pools, row_slots=torch.tensor(slots, device=dev), row_to_seq=rows, compute=todo, lora=lora
        )

    # ---- submission ----------------------------------------------------------------------------
    def _encode(self, prompt: str | Sequence[int]) -> list[int]:
        if isinstance(prompt, str):
            if self.tokenizer is None:
                raise ValueError("this model has no tokenizer: pass prompts as token-id lists")
            return self.tokenizer.encode(prompt)
        ids = [int(t) for t in prompt]
        bad = [t for t in ids if not 0 <= t < self.model.args.vocab_size]
        if bad:
            raise ValueError(
                f"prompt token id {bad[0]} is outside the vocabulary (0..{self.model.args.vocab_size - 1})"
            )
        return ids

    def add_request(
        self, prompt: str | Sequence[int], params: SamplingParams | None = None, adapter: str | None = None
    ) -> Request:
        params = params or SamplingParams()
        ids = self._encode(prompt)
        if not ids:
            raise ValueError("prompt is empty")
        limit = self.model.args.max_seq_len
        if len(ids) + params.max_new_tokens > limit:
            raise ValueError(
                f"prompt of {len(ids)} tokens + max_new_tokens {params.max_new_tokens} exceeds the context ({limit})"
            )
        need = math.ceil((len(ids) + params.max_new_tokens) / self.cache.block_size) * params.beams
        if need > self.cache.num_blocks:
            raise ValueError(
                f"the KV pool ({self.cache.num_blocks} blocks of {self.cache.block_size}) cannot hold this request "
                f"({need} blocks); raise num_blocks or memory_fraction"
            )
        if adapter is not None and adapter not in self.adapters:
            raise ValueError(f"no adapter named {adapter!r} is registered")
        req = Request(next(self._ids), ids, params, adapter)
        self.waiting.append(req)
        return req

    # ---- the loop --------------------------------------------------------------------------------
    @torch.inference_mode()
    def step(self) -> list[Request]:
        """Admit what fits and prefill it, then one decode step for every running sequence.
        Returns the requests that finished in this step."""
        finished = self._prefill(self._admit())
        used_before_retire = self.cache.num_blocks - self.cache.allocator.num_free
        finished += self._decode()
        used = max(used_before_retire, self.cache.num_blocks - self.cache.allocator.num_free)
        self.peak_blocks_used = max(self.peak_blocks_used, used)
        return finished

    def has_unfinished(self) -> bool:
        return bool(self.waiting or self.running)

    def abort(self, req: Request) -> None:
        """Finish a waiting or running request now (finish_reason "abort"): its blocks and pool slot are
        free on return. Call it between steps (the server's engine thread does); a finished request is left as is."""
        if req.finished:
            return
        if req in self.waiting:  # a waiting request holds no blocks (a preempted one freed them)
            self.waiting.remove(req)
            req.finish_reason = "abort"
            return
        self._finish(req, "abort")

    def _admit(self) -> list[Request]:
        admitted = []
        free = self.cache.allocator.num_free - sum(len(r.seqs) for r in self.running)  # a block of growth each
        n_rows = sum(len(r.seqs) for r in self.running)
        while self.waiting and n_rows + self.waiting[0].params.beams <= self.max_batch:
            need = math.ceil(len(self.waiting[0].seqs[0].tokens) / self.cache.block_size)
            if need > free and (self.running or admitted):
                break  # wait for blocks; an empty engine admits anyway (the request fits the pool by check)
            req = self.waiting.popleft()
            self._take_slot(req)
            free -= need
            n_rows += req.params.beams
            admitted.append(req)
            self.running.append(req)
        return admitted

    def _prefill(self, reqs: list[Request]) -> list[Request]:
        if not reqs:
            return []
        seqs = [r.seqs[0] for r in reqs]
        counts = [len(s.tokens) for s in seqs]
        step = self.cache.prepare_step([s.table for s in seqs], counts)
        step.adapters = self._adapter_step(reqs, counts, compute=True, row_to_seq=step.row_to_seq)
        tokens = torch.tensor([t for s in seqs for t in s.tokens], device=self.cache.k.device)
        logits = self.model.forward_step(tokens, step, self.cache.k, self.cache.v)  # (R, vocab)
        finished = [r for i, r in enumerate(reqs) if self._advance(r, logits[i : i + 1])]
        now = time.perf_counter()
        for r in reqs:  # the first prefill's (a preempted request prefills again)
            r.first_token_time = r.first_token_time or now
        return finished

    def _decode(self) -> list[Request]:
        while True:
            live = [r for r in self.running if not r.finished]
            if not live:
                return []
            seqs = [s for r in live for s in r.seqs]
            graph = self._graph_fits(live, len(seqs))
            try:
                step = self.cache.prepare_step([s.table for s in seqs], [1] * len(seqs), on_host=graph)
                break
            except CacheFullError:
                if len(live) == 1:
                    raise RuntimeError("KV pool exhausted by a single request (admission check failed)") from None
                self._preempt(live[-1])
        if graph:
            row_slots = [r.slot for r in live for _ in r.seqs]
            logits = self.graphs.run([s.tokens[-1] for s in seqs], step, row_slots)  # (rows, vocab)
        else:
            step.adapters = self._adapter_step(live, [len(r.seqs) for r in live], compute=False)
            tokens = torch.tensor([s.tokens[-1] for s in seqs], device=self.cache.k.device)
            logits = self.model.forward_step(tokens, step, self.cache.k, self.cache.v)  # (rows, vocab)
        done, row = [], 0
        for r in live:
            n = len(r.seqs)
            if self._advance(r, logits[row : row + n]):
                done.append(r)
            row += n
        return done

    def _graph_fits(self, live: list[Request], rows: int) -> bool:
        """A static-shape step serves this decode: graphs on, a bucket that holds the rows, no LoRA row."""
        if self.graphs is None or self.graphs.bucket(rows) is None:
            return False
        return not any(r.adapter is not None and self.adapters[r.adapter].low_rank for r in live)

    def _preempt(self, req: Request) -> None:
        self.num_preemptions += 1
        for s in req.seqs:
            self.cache.free(s.table)
        self._release_slot(req)  # vectors are recomputed with the prompt when it is admitted again
        req.restart()
        self.running.remove(req)
        self.waiting.appendleft(req)

    def _finish(self, req: Request, reason: str) -> None:
        req.finish_reason = reason
        for s in req.seqs:
            self.cache.free(s.table)
        self._release_slot(req)
        self.running.remove(req)

    def _stop_ids(self, req: Request) -> frozenset[int]:
        if req.params.ignore_eos or self.tokenizer is None:
            return frozenset()
        return self.tokenizer.stop_ids

    def _advance(self, req: Request, logits: torch.Tensor) -> bool:
        """Consume this step's logits for the request's rows; True when the request finished."""
        p = req.params
        if p.beams > 1:
            return self._advance_beams(req, logits)
        tok = sample_token(logits[0], p, req.generator)
        req.output_ids.append(tok)
        req.seqs[0].tokens.append(tok)
        stop_ids = self._stop_ids(req)
        reason = "stop" if tok in stop_ids else "length" if len(req.output_ids) >= p.max_new_tokens else None
        text, hit = self._cut_at_stop(req, stop_ids) if p.stop else (None, False)
        if hit:
            reason = "stop"
        if reason is None:
            return False
        req.text = text if text is not None else self._text(req.output_ids, stop_ids)
        self._finish(req, reason)
        return True

    def _cut_at_stop(self, req: Request, stop_ids: frozenset[int]) -> tuple[str, bool]:
        """The request's text cut before the first stop string, and whether one was found."""
        text = self._text(req.output_ids, stop_ids)
        cut = min((i for i in (text.find(s) for s in req.params.stop) if i >= 0), default=-1)
        return (text[:cut], True) if cut >= 0 else (text, False)

    def _advance_beams(self, req: Request, logits: torch.Tensor) -> bool:
        p = req.params
        if req.beam is None:
            req.beam = BeamSearch(p.beams, p.max_new_tokens, p.length_penalty, p.early_stopping, self._stop_ids(req))
        plen = len(req.prompt_ids)
        choices = req.beam.step(
            [s.tokens[plen:] for s in req.seqs], torch.tensor([s.score for s in req.seqs]), logits.log_softmax(-1)
        )
        if choices is None:
            req.output_ids = req.beam.best()
            stop_ids = self._stop_ids(req)
            req.text, hit = self._cut_at_stop(req, stop_ids)
            ended = hit or (req.output_ids and req.output_ids[-1] in stop_ids)
            self._finish(req, "stop" if ended else "length")
            return True
        old = req.seqs
        # children share their parent's blocks; the first write into a shared block copies it
        req.seqs = [SeqState(old[i].tokens + [t], self.cache.fork(old[i].table), score) for i, t, score in choices]
        for s in old:
            self.cache.free(s.table)
        return False

    def _text(self, ids: list[int], stop_ids: frozenset[int]) -> str:
        if self.tokenizer is None:
            return ""
        return self.tokenizer.decode([t for t in ids if t not in stop_ids])

    # ---- front doors -------------------------------------------------------------------------------
    def generate(
        self,
        prompts: str | Sequence[int] | Sequence[str | Sequence[int]],
        params: SamplingParams | Sequence[SamplingParams] | None = None,
        adapters: Sequence[str | None] | None = None,
    ) -> list[GenerationOutput]:
        """Generate for every prompt (batched continuously); one output per prompt, in order."""
        if isinstance(prompts, str) or (len(prompts) > 0 and isinstance(prompts[0], int)):
            prompts = [prompts]
        n = len(prompts)
        plist = list(params) if isinstance(params, (list, tuple)) else [params] * n
        alist = list(adapters) if adapters is not None else [None] * n
        if len(plist) != n or len(alist) != n:
            raise ValueError(f"{n} prompts but {len(plist)} params and {len(alist)} adapters")
        reqs = [self.add_request(pr, pa, ad) for pr, pa, ad in zip(prompts, plist, alist)]
        while not all(r.finished for r in reqs):
            self.step()
        return [GenerationOutput(r.prompt_ids, r.output_ids, r.text, r.finish_reason) for r in reqs]

    def stream(
        self, prompt: str | Sequence[int], params: SamplingParams | None = None, adapter: str | None = None
    ) -> Iterator[str]:
        """Yield the new text as it is produced; a piece never ends inside a UTF-8 character.
        The request is checked and queued at once; other requests progress while it is consumed."""
        return self.stream_request(self.add_request(prompt, params, adapter))

    def text_stream(self, req: Request) -> TextStream:
        """The new-text tracker of a queued request (what stream_request yields, polled after each step)."""
        return TextStream(req, self.tokenizer, self._stop_ids(req))

    def stream_request(self, req: Request) -> Iterator[str]:
        text = self.text_stream(req)
        while True:
            if not req.finished:
                self.step()
            piece = text.poll()
            if piece:
                yield piece
            if req.finished:
                return
