"""llama.cpp's rows: the same prompt token ids through llama.cpp (its Python binding, `llama_cpp`, imported only
inside this module's functions) on a GGUF of the exact weights parallama runs (`bench/gguf_writer.py`).

A `LlamaCppCase` has ParallamaCase's interface (warm-up at construction, `run()`, `row()`), so it runs in the
same interleaved rounds as the parallama rows of its setting and pairs with them round by round. llama.cpp
runs base, beams 1, batch 1, on the CPU: the binding's `eval` feeds one sequence, and beam search, batching
and adapters are outside what it is compared on here.
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import numpy as np
import torch

from bench.gguf_writer import gguf_bytes, write_gguf
from bench.measure import PeakMemory
from bench.report import row
from model import Llama

MISSING = "llama.cpp: not installed (pip install llama-cpp-python); its rows are skipped"
_SIZES = {"F32": 4, "F16": 2, "BF16": 2}
PEAK_NOTE = (
    "RSS high-water growth around load and warm-up less the mmapped weights; llama.cpp's KV and compute "
    "buffers can reuse heap pages the process freed before, so it may read low"
)


def available() -> bool:
    try:
        import llama_cpp  # noqa: F401
    except ImportError:
        return False
    return True


def skip_reason(a: argparse.Namespace) -> str | None:
    """Why this run has no llama.cpp rows (one line), or None when it has."""
    if "llamacpp" not in a.peers:
        return "llama.cpp: off (--peers without llamacpp, or --no-peers)"
    if not available():
        return MISSING
    if a.device != "cpu":
        return "llama.cpp: its rows run on the CPU only; skipped with --device cuda"
    if 1 not in a.beams or 1 not in a.batch or "base" not in a.methods:
        return "llama.cpp: runs base at beams 1, batch 1 only; this run has no such setting, so its rows are skipped"
    return None


def tokenizer_gguf(source: str) -> Path | None:
    """The GGUF whose tokenizer llama.cpp's files copy: the model's own file; None (ids only) for directories."""
    if source == "default":
        from weights.default import default_gguf_path

        return default_gguf_path()
    return Path(source) if source.endswith(".gguf") else None


def gguf_types(dtype: torch.dtype) -> list[str]:
    """F32 always (a 16-bit model's weights widen to it exactly), plus the run's own 16-bit type."""
    return ["F32", *{torch.float16: ["F16"], torch.bfloat16: ["BF16"]}.get(dtype, [])]


@contextmanager
def gguf_files(model: Llama, types: list[str], tokenizer_from: str | Path | None) -> Iterator[dict[str, Path]]:
    """{type: GGUF of `model`'s weights}, in a temp dir deleted on exit."""
    with tempfile.TemporaryDirectory(prefix="parallama-gguf-") as d:
        yield {t: write_gguf(model, Path(d) / f"model-{t}.gguf", t, tokenizer_from=tokenizer_from) for t in types}


class LlamaCppCase:
    """llama.cpp's greedy generation of `new` tokens after `ids`, timed as ParallamaCase times its engine.

    The KV cache takes the file's type (F32 for the F32 file), as parallama's cache takes the weights'
    dtype: the rows then differ in the engine, not in the precision of attention. `has_vocab=False`: the
    file has no tokenizer (ids only), which llama.cpp accepts as a vocabulary of type "none".
    """

    def __init__(
        self,
        model: Llama,
        path: Path,
        ids: list[int],
        new: int,
        ftype: str = "F32",
        *,
        threads: int | None = None,
        has_vocab: bool = True,
    ) -> None:
        import gguf
        import llama_cpp

        self.ids, self.new, self.ftype = ids, new, ftype
        self.threads = threads or torch.get_num_threads()
        kv = int(gguf.GGMLQuantizationType[ftype])  # ggml's type ids, as llama.cpp numbers them
        self.weights = gguf_bytes(model, ftype)
        self.results: list[tuple[float, float, float]] = []
        with PeakMemory("cpu") as mem:
            self.llm = llama_cpp.Llama(
                model_path=str(path),
                n_ctx=len(ids) + new,
                n_batch=len(ids),  # the prompt in one llama_decode, as parallama prefills it in one forward
                n_ubatch=len(ids),
                n_threads=self.threads,
                n_threads_batch=self.threads,
                type_k=kv,
                type_v=kv,
                logits_all=False,  # only the last position's logits: all greedy decoding needs
                verbose=False,
                kv_overrides=None if has_vocab else {"tokenizer.ggml.model": "none"},
            )
            self.n_vocab = self.llm.n_vocab()
            self._run()  # warm-up
        # the growth includes the weights, mmapped and touched by the first run; the other rows' peaks
        # exclude their weights (loaded before), so they are taken off here
        self.peak_mem_mib = max(0.0, mem.mib - self.weights / 2**20)
        a = model.args
        # llama.cpp allocates K and V for all n_ctx cells (it pads n_ctx), every layer, in the file's type
        self.kv_per_token = 2 * a.n_layers * a.kv_dim * _SIZES[ftype]
        self.kv_bytes = self.llm.n_ctx() * self.kv_per_token

    def logits(self, tokens: list[int]) -> np.ndarray:
        """Feed tokens after those already fed; the last position's logits (a view llama.cpp overwrites)."""
        import llama_cpp

        self.llm.eval(tokens)
        return np.ctypeslib.as_array(llama_cpp.llama_get_logits_ith(self.llm.ctx, -1), shape=(self.n_vocab,))

    def _next(self, tokens: list[int]) -> int:
        return int(self.logits(tokens).argmax())  # greedy

    def _run(self) -> tuple[float, float, float]:
        """(wall time, time to the first token, decode tok/s after the second token): parallama's engine
        decodes once in the step that prefills, so both rows' decode rates start at the same token."""
        self.llm.reset()  # n_tokens = 0: the next eval drops the cached K/V and starts at position 0
        t0 = time.perf_counter()
        out = [self._next(self.ids)]
        t_first = time.perf_counter() - t0
        if self.new > 1:
            out.append(self._next(out[-1:]))
        t1 = time.perf_counter()
        while len(out) < self.new:
            out.append(self._next(out[-1:]))
        t2 = time.perf_counter()
        self.tokens = out
        return t2 - t0, t_first, max(len(out) - 2, 0) / max(t2 - t1, 1e-9)

    def run(self) -> None:
        self.results.append(self._run())

    def row(self) -> dict[str, Any]:
        t_total, t_first, decode_tps = (statistics.median(r[i] for r in self.results) for i in range(3))
        ids = self.ids
        out = row(
            "llama.cpp",
            "base",
            beams=1,
            batch=1,
            prompt_len=len(ids),
            new_tokens=self.new,
            t_total=t_total,
            t_prefill=t_first,
            decode_tps=decode_tps,
            prefill_tps=len(ids) / t_first,  # to the first token, as the other rows
            kv_bytes=self.kv_bytes,
            peak_mem_mib=self.peak_mem_mib,
        )
        out.update(gguf_type=self.ftype, kv_type=self.ftype, threads=self.threads, peak_mem_note=PEAK_NOTE)
        # per run, in round order: paired with the parallama rows of the same rounds
        out["runs_tps"] = [self.new / r[0] for r in self.results]
        out["runs_decode_tps"] = [r[2] for r in self.results]
        out["runs_prefill_tps"] = [len(ids) / r[1] for r in self.results]
        step_bytes = self.weights + self.kv_per_token * (len(ids) + self.new // 2)  # as parallama's, mid-generation
        out["decode_gbs"] = step_bytes * decode_tps / 1e9
        return out

    def close(self) -> None:
        self.llm.close()


@contextmanager
def cases(
    model: Llama,
    ids: list[int],
    new: int,
    dtype: torch.dtype,
    tokenizer_from: str | Path | None,
    threads: int | None = None,
) -> Iterator[list[LlamaCppCase]]:
    """One case per file type of `gguf_types(dtype)`, on GGUFs of `model`'s weights written for them (with the
    tokenizer of the GGUF `tokenizer_from`, or ids only); the files and the llama.cpp models go on exit."""
    with gguf_files(model, gguf_types(dtype), tokenizer_from) as files:
        vocab = tokenizer_from is not None
        made = [LlamaCppCase(model, p, ids, new, t, threads=threads, has_vocab=vocab) for t, p in files.items()]
        try:
            yield made
        finally:
            for c in made:
                c.close()
