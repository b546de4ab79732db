"""Decode benchmark in the PARA paper's Table-4 method: prompt 274 tokens, 32 new tokens, batch 1.

    python bench/decode.py [--runs 5] [--beams 1 3] [--methods base para ia3 lora mixed] [--batch 1 8]
                           [--tenants 8] [--device cpu|cuda] [--dtype float32|bfloat16|float16]
                           [--model default|DIR|FILE.gguf] [--backend auto] [--compile] [--no-peers]
                           [--json out.json] [--plot out.png] [--quick]

Methods run on fresh adapters (PARA r=12 on q/v/u, (IA)³ on k/v/down, LoRA r=8 on q/v, unmerged);
"mixed" gives the requests of a batch base, PARA, (IA)³ and LoRA in turn. `--tenants N` adds three
parallama rows (N requests with N different PARA adapters in one batch, the same batch with one
adapter, the N requests one after another) and the peft peer of the first (N LoRA adapters on one
PeftModel, one mixed batch through `adapter_names`) against the same batch on the plain model.

tokens/s = new tokens / wall time including prefill (the paper's figure); decode tok/s excludes
the prefill: parallama times the engine's pure decode steps, the peers (transformers `generate` on
the same weights, peft LoRA / (IA)³ on that model) the steps inside `generate` (a no-op logits
processor notes when each step's logits arrive); the peers' prefill is the time of a 1-token generate.
Every row reports the median of --runs after a warm-up (parallama rows of one beams × batch setting, and
the tenant rows, are run interleaved, round by round, so a drifting machine shifts them alike), the peak
memory growth around its set-up and warm-up run, and its KV bytes; the machine's memory bandwidth is
measured before and after the runs and each row's decode bytes/s is reported as a fraction of it. A
summary lists the issue's targets as ratios.
"""

from __future__ import annotations

import argparse
import json
import math
import platform
import re
import resource
import shutil
import statistics
import sys
import time
import warnings
from collections.abc import Callable, Iterable, Sequence
from pathlib import Path
from typing import Any

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from infer.engine import Engine  # noqa: E402
from infer.sampling import SamplingParams  # noqa: E402
from model import Llama  # noqa: E402
from model.peft import Adapter, IA3Config, LoRAConfig, PARAConfig, create_adapter  # noqa: E402

TEXT = (
    "The history of science is the study of the development of science and scientific knowledge, including both "
    "the natural and social sciences. Science is a body of empirical, theoretical, and practical knowledge about "
    "the natural world, produced by scientists who emphasize the observation, explanation, and prediction of "
    "real-world phenomena. "
)
METHODS = ("base", "para", "ia3", "lora")
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
# The JSON schema other tools read: every row carries these keys with these types (extra keys are allowed).
ROW_SCHEMA: dict[str, type] = {
    "engine": str,
    "method": str,
    "beams": int,
    "batch": int,
    "tenants": int,
    "prompt_len": int,
    "new_tokens": int,
    "tps": float,
    "decode_tps": float,
    "prefill_tps": float,
    "peak_mem_mib": float,
    "kv_bytes": int,
}
MPL_MISSING = "matplotlib is not installed; skipping --plot"

_T0 = time.perf_counter()


def log(msg: str) -> None:
    """Progress on stderr (stdout holds the table), stamped with the seconds since start."""
    print(f"[{time.perf_counter() - _T0:6.1f}s] {msg}", file=sys.stderr, flush=True)


def make_prompt(tokenizer: Any, n: int) -> list[int]:
    ids: list[int] = []
    while len(ids) < n:
        ids += tokenizer.encode(TEXT, bos=False)
    return ids[:n]


# ---- measurement ------------------------------------------------------------------------------------


def sync(device: torch.device | str) -> None:
    """Wait for queued GPU work, so a wall-clock reading covers it (a no-op on CPU)."""
    if torch.device(device).type == "cuda":
        torch.cuda.synchronize()


def timed(fn: Callable[[], Any], runs: int, device: torch.device | str = "cpu") -> float:
    """Median wall time of `runs` calls after one warm-up call."""
    fn()
    times = []
    for _ in range(runs):
        sync(device)
        t = time.perf_counter()
        fn()
        sync(device)
        times.append(time.perf_counter() - t)
    return statistics.median(times)


def _proc_status_kib(field: str) -> int | None:
    try:
        m = re.search(rf"^{field}:\s+(\d+) kB", Path("/proc/self/status").read_text(), re.M)
    except OSError:
        return None
    return int(m.group(1)) if m else None


class PeakMemory:
    """Peak memory growth over a `with` block, in MiB (`.mib` after the block).

    CUDA: torch.cuda.max_memory_allocated above what was allocated at entry (the peak stats are reset
    there), so the weights of models already loaded do not count. CPU: the process's RSS high-water mark
    above its RSS at entry; Linux resets the mark through /proc/self/clear_refs, so each block reads its
    own peak. Where that is impossible it falls back to the growth of ru_maxrss (0 when an earlier, larger
    peak hides this one).
    """

    def __init__(self, device: torch.device | str) -> None:
        self.cuda = torch.device(device).type == "cuda"
        self.mib = 0.0

    def __enter__(self) -> PeakMemory:
        if self.cuda:
            torch.cuda.synchronize()
            torch.cuda.reset_peak_memory_stats()
            self.base = torch.cuda.memory_allocated()
            return self
        self.hwm = False
        try:
            Path("/proc/self/clear_refs").write_text("5")  # "5": reset the peak RSS to the current RSS
            self.hwm = _proc_status_kib("VmHWM") is not None
        except OSError:
            pass
        self.base = _proc_status_kib("VmRSS") if self.hwm else resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
        return self

    def __exit__(self, *exc: object) -> None:
        if self.cuda:
            torch.cuda.synchronize()
            self.mib = (torch.cuda.max_memory_allocated() - self.base) / 2**20
            return
        peak = _proc_status_kib("VmHWM") if self.hwm else resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
        self.mib = max(0, (peak or 0) - (self.base or 0)) / 1024  # both in KiB on Linux


def l3_bytes() -> int | None:
    """The CPU's last-level cache size from sysfs, or None where it is not exposed."""
    for idx in (3, 2):
        p = Path(f"/sys/devices/system/cpu/cpu0/cache/index{idx}/size")
        try:
            text = p.read_text().strip()
        except OSError:
            continue
        m = re.fullmatch(r"(\d+)([KMG]?)", text)
        if m:
            return int(m.group(1)) * {"": 1, "K": 2**10, "M": 2**20, "G": 2**30}[m.group(2)]
    return None


def bandwidth_buffer_bytes(weight_bytes: int, l3: int | None) -> int:
    """At least 512 MiB, 8× the last-level cache and the model's weights: a read that cannot hit in cache,
    as large as what a decode step streams."""
    return max(512 * 2**20, 8 * (l3 or 0), weight_bytes)


def measure_bandwidth(device: torch.device | str, nbytes: int, reads: int = 5) -> list[float]:
    """Samples of the device's memory bandwidth in GB/s, one per pass over an nbytes buffer.

    CPU: streaming read bandwidth; each sample is the better of a torch sum and a BLAS GEMV (numpy
    `A @ v`, the call the cpu backend's decode GEMVs make) over the buffer: bytes read / time.
    CUDA: a device-to-device `copy_`, counted as bytes read + bytes written / time (what HBM moves,
    the figure a copy benchmark reports).
    """
    n = nbytes // 4
    if torch.device(device).type == "cuda":
        src = torch.ones(n, device=device)
        dst = torch.empty_like(src)
        dst.copy_(src)  # warm-up
        out = []
        for _ in range(reads):
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            dst.copy_(src)
            end.record()
            end.synchronize()
            out.append(2 * n * 4 / (start.elapsed_time(end) / 1e3) / 1e9)
        del src, dst
        return out
    buf = torch.ones(n // 1024, 1024)
    a, v = buf.numpy(), torch.ones(1024).numpy()
    buf.sum()
    _ = a @ v  # warm-up: pages are touched by ones(), this warms the code paths
    out = []
    for _ in range(reads):
        best = math.inf
        for f in (buf.sum, lambda: a @ v):
            t = time.perf_counter()
            f()
            best = min(best, time.perf_counter() - t)
        out.append(n * 4 / best / 1e9)
    return out


def bandwidth_summary(before: Sequence[float], after: Sequence[float]) -> dict[str, Any]:
    """Both sets of samples and their spread. "max" is the roof every row is compared with: the best rate
    the machine showed in this run (others share the machine, so a slower sample is contention, not
    the hardware); "median" shows how steady it was."""
    samples = [*before, *after]
    return {
        "before": [round(x, 2) for x in before],
        "after": [round(x, 2) for x in after],
        "median": statistics.median(samples),
        "max": max(samples),
        "min": min(samples),
        "used": "max",
    }


def weight_bytes(model: Llama) -> int:
    return sum(p.numel() * p.element_size() for p in model.parameters())  # parameters() dedups tied weights


def kv_bytes_per_token(model: Llama) -> int:
    """K and V of every layer for one token, in the cache's dtype (the weights')."""
    return 2 * model.args.n_layers * model.args.kv_dim * model.tok_embeddings.weight.element_size()


def bytes_per_decode_step(model: Llama, context: int, rows: int) -> int:
    """What one decode step must read at least: every weight once (tied embeddings once) plus each row's K/V."""
    return weight_bytes(model) + rows * kv_bytes_per_token(model) * context


# ---- rows -----------------------------------------------------------------------------------------------


def row(
    engine: str,
    method: str,
    *,
    beams: int,
    batch: int,
    prompt_len: int,
    new_tokens: int,
    t_total: float,
    t_prefill: float,
    kv_bytes: int,
    peak_mem_mib: float,
    tenants: int = 1,
    requests: int | None = None,
    mode: str = "batched",
    decode_tps: float | None = None,
    prefill_tps: float | None = None,
) -> dict[str, Any]:
    """One result row in the JSON schema (ROW_SCHEMA keys first).

    `requests` requests (default: batch) of new_tokens each took t_total, of which t_prefill was the
    prefill; decode/prefill tok/s default to what those two times imply (measured figures override them).
    mode: "batched" (the requests ran together) or "sequential" (one after another, batch 1 each).
    """
    n = batch if requests is None else requests
    return {
        "engine": engine,
        "method": method,
        "beams": int(beams),
        "batch": int(batch),
        "tenants": int(tenants),
        "prompt_len": int(prompt_len),
        "new_tokens": int(new_tokens),
        "tps": float(n * new_tokens / t_total),
        "decode_tps": float(
            decode_tps if decode_tps is not None else n * (new_tokens - 1) / max(t_total - t_prefill, 1e-9)
        ),
        "prefill_tps": float(prefill_tps if prefill_tps is not None else n * prompt_len / t_prefill),
        "peak_mem_mib": float(peak_mem_mib),
        "kv_bytes": int(kv_bytes),
        "requests": int(n),
        "mode": mode,
    }


def add_roof(rows: Iterable[dict[str, Any]], bandwidth_gbs: float) -> None:
    """roof_frac = the decode bytes/s a row achieved over the measured bandwidth (where decode_gbs is known)."""
    for r in rows:
        if "decode_gbs" in r and bandwidth_gbs > 0:
            r["roof_frac"] = r["decode_gbs"] / bandwidth_gbs


def find(rows: Sequence[dict[str, Any]], **keys: Any) -> dict[str, Any] | None:
    """The first row whose fields equal `keys`; tenants=1 and mode="batched" unless given."""
    want = {"tenants": 1, "mode": "batched", **keys}
    return next((r for r in rows if all(r.get(k) == v for k, v in want.items())), None)


def _target(
    name: str, num: dict | None, den: dict | None, key: str, goal: float | None, at_most: bool = False
) -> dict[str, Any] | None:
    """num[key] / den[key] against the goal. Rows timed in the same interleaved rounds (both carry
    `runs_{key}` of one length) give the median of the per-round ratios instead ("paired"): each round's
    two runs were back to back, so the machine's drift between rounds cancels."""
    if num is None or den is None or not den[key]:
        return None
    a, b = num.get(f"runs_{key}"), den.get(f"runs_{key}")
    paired = bool(a and b and len(a) == len(b) and all(b))
    ratio = statistics.median(x / y for x, y in zip(a, b)) if paired else num[key] / den[key]
    met = None if goal is None else (ratio <= goal if at_most else ratio >= goal)
    return {"target": name, "ratio": ratio, "goal": goal, "at_most": at_most, "met": met, "paired": paired}


def summarize(
    rows: Sequence[dict[str, Any]], kv: dict[str, Any] | None = None, tenants: int = 0
) -> list[dict[str, Any]]:
    """The issue's targets as measured ratios, each {"target", "ratio", "goal", "at_most", "met"}; only
    targets whose rows were run appear. goal None marks an informational ratio (met None)."""
    out: list[dict[str, Any] | None] = []
    beams_seen = sorted({r["beams"] for r in rows})
    batches = sorted({r["batch"] for r in rows})
    for b in beams_seen:
        p = find(rows, engine="parallama", method="base", beams=b, batch=1)
        t = find(rows, engine="transformers", method="base", beams=b, batch=1)
        out.append(_target(f"decode tok/s vs transformers (beams {b})", p, t, "decode_tps", 2.5))
        out.append(_target(f"prefill tok/s vs transformers (beams {b})", p, t, "prefill_tps", 1.5))
        out.append(_target(f"tok/s vs transformers (beams {b})", p, t, "tps", None))
        if b == 1 and p is not None and "roof_frac" in p:
            rf = p["roof_frac"]
            out.append({"target": "decode bandwidth / measured roof (beams 1, batch 1)", "ratio": rf,
                        "goal": 0.6, "at_most": False, "met": rf >= 0.6})  # fmt: skip
        for n in batches:
            where = f"beams {b}, batch {n}"
            base, para = (find(rows, engine="parallama", method=m, beams=b, batch=n) for m in ("base", "para"))
            lora, ia3 = (find(rows, engine="parallama", method=m, beams=b, batch=n) for m in ("lora", "ia3"))
            out.append(_target(f"PARA / base tok/s ({where})", para, base, "tps", 0.98))
            out.append(_target(f"PARA / LoRA-unmerged tok/s ({where})", para, lora, "tps", 1.25))
            for m, mine in (("lora", lora), ("ia3", ia3)):
                theirs = find(rows, engine="peft", method=m, beams=b, batch=n)
                out.append(_target(f"parallama / peft {m} tok/s ({where})", mine, theirs, "tps", None))
    if tenants > 1:
        for b in beams_seen:
            where = f"{tenants} tenants, beams {b}"
            mixed = find(rows, engine="parallama", method="para", beams=b, batch=tenants, tenants=tenants)
            one = find(rows, engine="parallama", method="para", beams=b, batch=tenants)
            seq = find(rows, engine="parallama", method="para", beams=b, tenants=tenants, mode="sequential")
            peft_mixed = find(rows, engine="peft", method="lora", beams=b, batch=tenants, tenants=tenants)
            hf_base = find(rows, engine="transformers", method="base", beams=b, batch=tenants)
            out.append(_target(f"{where}: {tenants} PARA adapters / one adapter tok/s", mixed, one, "tps", 0.95))
            out.append(_target(f"{where}: parallama mixed PARA / peft mixed LoRA tok/s", mixed, peft_mixed, "tps", 3))
            out.append(_target(f"{where}: peft mixed LoRA / its base batch tok/s", peft_mixed, hf_base, "tps", None))
            out.append(_target(f"{where}: one batch / {tenants} sequential runs tok/s", mixed, seq, "tps", None))
    if kv:
        out.append({"target": "paged KV bytes / bytes the tokens need (ragged batch)",
                    "ratio": kv["paged_bytes"] / kv["needed_bytes"], "goal": 1.05, "at_most": True,
                    "met": kv["paged_bytes"] <= 1.05 * kv["needed_bytes"]})  # fmt: skip
    return [t for t in out if t is not None]


def format_summary(targets: Sequence[dict[str, Any]]) -> str:
    lines = ["| target | measured | goal | |", "|---|---|---|---|"]
    for t in targets:
        goal = "-" if t["goal"] is None else f"{'≤' if t['at_most'] else '≥'} {t['goal']:g}"
        met = "-" if t["met"] is None else "met" if t["met"] else "not met"
        how = " (median of per-round ratios)" if t.get("paired") else ""
        lines.append(f"| {t['target']} | {t['ratio']:.3f}{how} | {goal} | {met} |")
    return "\n".join(lines)


def format_table(rows: Sequence[dict[str, Any]]) -> str:
    lines = [
        "| engine | method | beams | batch | tenants | mode | tok/s | decode tok/s | prefill tok/s | peak MiB "
        "| KV MiB | decode vs base | of roof |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        base_engine = "transformers" if r["engine"] == "peft" else r["engine"]
        b = find(rows, engine=base_engine, method="base", beams=r["beams"], batch=r["batch"])
        rel = f"{r['decode_tps'] / b['decode_tps']:.3f}x" if b and b["decode_tps"] and r["mode"] == "batched" else "-"
        roof = f"{r['roof_frac']:.0%}" if "roof_frac" in r else "-"
        lines.append(
            f"| {r['engine']} | {r['method']} | {r['beams']} | {r['batch']} | {r['tenants']} | {r['mode']} "
            f"| {r['tps']:.1f} | {r['decode_tps']:.1f} | {r['prefill_tps']:.0f} | {r['peak_mem_mib']:.0f} "
            f"| {r['kv_bytes'] / 2**20:.1f} | {rel} | {roof} |"
        )
    return "\n".join(lines)


def plot(rows: Sequence[dict[str, Any]], path: Path) -> bool:
    """A bar chart of tok/s and decode tok/s per row; matplotlib is optional (imported only here)."""
    try:
        import matplotlib

        matplotlib.use("Agg")  # no display needed
        import matplotlib.pyplot as plt
    except ImportError:
        print(MPL_MISSING)
        return False
    labels = [
        f"{r['engine']} {r['method']}\nbeams {r['beams']} batch {r['batch']}"
        + (f"\n{r['tenants']} tenants" if r["tenants"] > 1 else "")
        + (" seq" if r["mode"] == "sequential" else "")
        for r in rows
    ]
    x = range(len(rows))
    fig, ax = plt.subplots(figsize=(max(6.0, 1.1 * len(rows)), 4.5))
    ax.bar([i - 0.2 for i in x], [r["tps"] for r in rows], 0.4, label="tok/s (incl. prefill)")
    ax.bar([i + 0.2 for i in x], [r["decode_tps"] for r in rows], 0.4, label="decode tok/s")
    ax.set_xticks(list(x), labels, rotation=40, ha="right", fontsize=7)
    ax.set_ylabel("tokens / s")
    ax.set_title(f"decode benchmark: prompt {rows[0]['prompt_len']}, {rows[0]['new_tokens']} new")
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return True


# ---- parallama ---------------------------------------------------------------------------------------------


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
        """(wall time, first steps = prefill + one decode, decode tok/s of the later steps) of all requests."""
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
            wall, first, decode_time = wall + t2 - t0, first + t1 - t0, decode_time + t2 - t1
            decoded += len(group) * steps
        return wall, first, decoded / max(decode_time, 1e-9)

    def run(self) -> None:
        self.results.append(self._run())

    def row(self) -> dict[str, Any]:
        t_total, t_first, decode_tps = (statistics.median(r[i] for r in self.results) for i in range(3))
        model, ids, batch = self.model, self.ids, self.batch
        out = row(
            "parallama", self.method, beams=self.beams, batch=1 if self.sequential else batch, prompt_len=len(ids),
            new_tokens=self.new, t_total=t_total, t_prefill=t_first, tenants=self.tenants, requests=batch,
            mode="sequential" if self.sequential else "batched",
            # steps after the first are pure decode (one token per sequence), measured directly
            decode_tps=decode_tps,
            prefill_tps=batch * len(ids) / t_first,  # a lower bound: the first step also decodes once
            kv_bytes=self.engine.peak_blocks_used * self.engine.cache.block_size * kv_bytes_per_token(model),
            peak_mem_mib=self.peak_mem_mib,
        )  # fmt: skip
        # per run, in round order: run_interleaved's cases share rounds, so their ratios can be paired
        out["runs_tps"] = [batch * self.new / r[0] for r in self.results]
        out["runs_decode_tps"] = [r[2] for r in self.results]
        step_bytes = bytes_per_decode_step(model, len(ids) + self.new // 2, self.live * self.beams)  # mid-generation
        out["decode_gbs"] = step_bytes * decode_tps / self.live / 1e9  # a step gives each live request one token
        return out


def run_interleaved(cases: Sequence[ParallamaCase], runs: int) -> list[dict[str, Any]]:
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


# ---- peers: transformers and peft ---------------------------------------------------------------------------


def load_hf_peer(source: str, dtype: torch.dtype, device: str) -> tuple[Any, str]:
    """(transformers model on the same weights, "") or (None, why it is skipped): the peer runs on the
    default GGUF (transformers' own GGUF loader) or an HF directory, nothing else."""
    try:
        import transformers
        from transformers import AutoModelForCausalLM
    except ImportError:
        return None, "transformers is not installed; peers skipped"
    transformers.utils.logging.disable_progress_bar()
    if source == "default":
        from weights.default import default_gguf_path

        gguf = default_gguf_path()
        hf = AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name, dtype=dtype)
    elif Path(source).is_dir() and (Path(source) / "config.json").exists():
        hf = AutoModelForCausalLM.from_pretrained(source, dtype=dtype)
    else:
        return None, f"transformers peers skipped: they run on the default model or an HF directory, not {source}"
    return hf.to(device).eval(), ""


def hf_kv_bytes_per_token(hf: Any) -> int:
    cfg = hf.config
    hd = getattr(cfg, "head_dim", None) or cfg.hidden_size // cfg.num_attention_heads
    return 2 * cfg.num_hidden_layers * cfg.num_key_value_heads * hd * next(hf.parameters()).element_size()


class StepClock:
    """A logits processor that changes nothing and notes when each step's logits arrive: the first call
    follows the prefill forward, each later one a decode forward (plus that step's sampling and cache
    update), so decode tok/s = requests × (calls − 1) / (last − first), as parallama counts its steps."""

    def __init__(self, device: torch.device | str = "cpu") -> None:
        self.device = device
        self.times: list[float] = []

    def __call__(self, input_ids: torch.Tensor, scores: torch.Tensor) -> torch.Tensor:
        sync(self.device)
        self.times.append(time.perf_counter())
        return scores

    def decode_tps(self, requests: int) -> float:
        if len(self.times) < 2:
            return 0.0
        return requests * (len(self.times) - 1) / max(self.times[-1] - self.times[0], 1e-9)


def bench_hf(
    hf: Any,
    ids: list[int],
    new: int,
    beams: int,
    runs: int,
    *,
    batch: int = 1,
    engine: str = "transformers",
    method: str = "base",
    tenants: int = 1,
    weights: int = 0,
    generate_kwargs: dict[str, Any] | None = None,
) -> dict[str, Any]:
    """A transformers / peft row: greedy `generate` of `batch` copies of the prompt. The prefill is the time
    of a 1-token generate; decode tok/s comes from the step times inside the full generate (`StepClock`), not
    from subtracting the two timings, which goes negative when the machine is shared. `weights`: the bytes
    a decode step reads (for decode_gbs; 0 = skip)."""
    from transformers import LogitsProcessorList

    device = next(hf.parameters()).device
    x = torch.tensor([ids] * batch, device=device)
    mask = torch.ones_like(x)
    eos = getattr(hf.generation_config, "eos_token_id", None)
    pad = (eos[0] if isinstance(eos, list) else eos) if eos is not None else 0

    def run(n: int, clock: StepClock | None = None) -> None:
        extra = {"logits_processor": LogitsProcessorList([clock])} if clock else {}
        with torch.no_grad():
            hf.generate(
                x, attention_mask=mask, max_new_tokens=n, min_new_tokens=n, do_sample=False, num_beams=beams,
                pad_token_id=pad, **extra, **(generate_kwargs or {}),
            )  # fmt: skip

    with PeakMemory(device) as mem:
        t_prefill = timed(lambda: run(1), runs, device)
        run(new)  # warm-up
        full = []
        for _ in range(runs):
            clock = StepClock(device)
            sync(device)
            t0 = time.perf_counter()
            run(new, clock)
            sync(device)
            full.append((time.perf_counter() - t0, clock.decode_tps(batch)))
    t_total, decode_tps = (statistics.median(r[i] for r in full) for i in range(2))
    per_token = hf_kv_bytes_per_token(hf)
    out = row(
        engine, method, beams=beams, batch=batch, tenants=tenants, prompt_len=len(ids), new_tokens=new,
        t_total=t_total, t_prefill=t_prefill, kv_bytes=per_token * (len(ids) + new) * beams * batch,
        peak_mem_mib=mem.mib, decode_tps=decode_tps,
    )  # fmt: skip
    if weights:  # as parallama's: weights + every beam's K/V mid-generation, per step; a step = batch tokens
        step_bytes = weights + batch * beams * per_token * (len(ids) + new // 2)
        out["decode_gbs"] = step_bytes * out["decode_tps"] / batch / 1e9
    return out


def peft_model(hf: Any, method: str, n: int = 1, seed: int = 0) -> Any:
    """hf wrapped in peft (in place; `.unload()` gives the plain model back): LoRA r=8 on q/v, or (IA)³
    with peft's llama defaults (k/v/down). n > 1 LoRA adapters "t0".."t{n-1}" get seeded random B, so each
    tenant really differs (B = 0, peft's init, is the same no-op update for all)."""
    from peft import IA3Config as PeftIA3
    from peft import LoraConfig, get_peft_model

    def cfg() -> Any:
        if method == "lora":
            return LoraConfig(r=8, lora_alpha=8, lora_dropout=0.0, target_modules=["q_proj", "v_proj"])
        return PeftIA3(task_type="CAUSAL_LM")

    pm = get_peft_model(hf, cfg(), adapter_name="t0" if n > 1 else "default")
    for i in range(1, n):
        pm.add_adapter(f"t{i}", cfg())
    if n > 1:
        g = torch.Generator().manual_seed(seed)
        with torch.no_grad():
            for m in pm.modules():
                for lin in getattr(m, "lora_B", {}).values():
                    lin.weight.copy_(torch.randn(lin.weight.shape, generator=g) * 0.01)
    return pm.eval()


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
    return {"lens": lens, "new_tokens": new, "needed_bytes": needed, "paged_bytes": paged,
            "contiguous_batch_max_bytes": padded, "contiguous_max_seq_len_bytes": full}  # fmt: skip


# ---- main ------------------------------------------------------------------------------------------------------


def machine_info(device: str, dtype: str, backend: str) -> dict[str, Any]:
    info: dict[str, Any] = {
        "python": platform.python_version(),
        "torch": torch.__version__,
        "cpu": platform.processor(),
        "threads": torch.get_num_threads(),
        "device": device,
        "dtype": dtype,
        "backend": backend,
        "compilers": {c: shutil.which(c) for c in ("gcc", "g++", "cc")},
    }
    try:
        m = re.search(r"^model name\s*:\s*(.+)$", Path("/proc/cpuinfo").read_text(), re.M)
        info["cpu"] = m.group(1).strip() if m else info["cpu"]
    except OSError:
        pass
    if device == "cuda":
        info["gpu"] = torch.cuda.get_device_name()
    for lib in ("transformers", "peft"):
        try:
            info[lib] = __import__(lib).__version__
        except ImportError:
            pass
    return info


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--runs", type=int, default=5, help="measured runs per row (median), after one warm-up")
    ap.add_argument("--prompt-len", type=int, default=274)
    ap.add_argument("--new-tokens", type=int, default=32)
    ap.add_argument("--beams", type=int, nargs="+", default=[1])
    ap.add_argument("--methods", nargs="+", default=["base"], choices=[*METHODS, "mixed"])
    ap.add_argument("--batch", type=int, nargs="+", default=[1], help="requests generated together")
    ap.add_argument("--tenants", type=int, default=0, help="N requests with N different PARA adapters (0: off)")
    ap.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    ap.add_argument("--dtype", default="float32", choices=list(DTYPES))
    ap.add_argument("--model", default="default", help="default | a Meta or HF directory | a .gguf file")
    ap.add_argument("--backend", default="auto", help="auto | torch | cpu | triton (kernels/ops.py)")
    ap.add_argument("--compile", action="store_true", help="run the engine's step through torch.compile")
    ap.add_argument("--no-peers", action="store_true", help="skip transformers and peft")
    ap.add_argument("--json", type=Path, help="write the results here")
    ap.add_argument("--plot", type=Path, help="bar chart of the rows (needs matplotlib)")
    ap.add_argument("--quick", action="store_true", help="base and PARA vs transformers, beams 1, batch 1, 3 runs")
    a = ap.parse_args(argv)
    if a.quick:
        a.runs, a.beams, a.batch, a.methods = 3, [1], [1], ["base", "para"]
    if a.device == "cuda" and not torch.cuda.is_available():
        ap.error("--device cuda: CUDA is not available to this torch build / machine")
    if a.tenants == 1 or a.tenants < 0:
        ap.error("--tenants needs N >= 2 (0 = off)")
    if min(a.runs, *a.beams, *a.batch, a.prompt_len, a.new_tokens) < 1:
        ap.error("--runs, --beams, --batch, --prompt-len and --new-tokens must be >= 1")
    return a


def main(argv: Sequence[str] | None = None) -> int:
    a = parse_args(argv)
    warnings.filterwarnings("ignore", category=FutureWarning)  # transformers / peft deprecation notes, not results
    torch.manual_seed(0)
    log(f"loading {a.model} ({a.dtype}, {a.device}, backend {a.backend})")
    model = Llama.from_pretrained(a.model, dtype=DTYPES[a.dtype], device=a.device, backend=a.backend)
    model.requires_grad_(False)
    ids = make_prompt(model.tokenizer, a.prompt_len)
    machine = machine_info(a.device, a.dtype, model.ops.backend)
    step: CompiledStep | None = None
    if a.compile:
        if a.device == "cpu" and not any(machine["compilers"].values()):
            log("--compile: no C++ compiler (gcc/g++/cc) found; inductor will likely fail and fall back")
        step = CompiledStep(model)
        model.forward_step = step  # set on the instance: the engine calls model.forward_step

    # one short generation first: the weights' first-touch page faults (they are mmapped), thread pools and,
    # with --compile, the compilation then count for no row
    log("warm-up generation" + (" (compiling)" if step else ""))
    Engine(model, num_blocks=math.ceil((len(ids) + 2) / 16) + 1).generate(
        [ids], SamplingParams(max_new_tokens=2, ignore_eos=True)
    )
    weights = weight_bytes(model)
    bw_bytes = bandwidth_buffer_bytes(weights, None if a.device == "cuda" else l3_bytes())
    log(f"memory bandwidth before the runs ({bw_bytes / 2**20:.0f} MiB buffer)")
    bw_before = measure_bandwidth(a.device, bw_bytes)

    rows: list[dict[str, Any]] = []

    def add(r: dict[str, Any]) -> None:
        rows.append(r)
        log(f"  -> {r['tps']:.1f} tok/s, decode {r['decode_tps']:.1f}, prefill {r['prefill_tps']:.0f}, "
            f"peak +{r['peak_mem_mib']:.0f} MiB")  # fmt: skip

    for beams in a.beams:
        for batch in a.batch:
            methods = [m for m in a.methods if not (m == "mixed" and batch < len(METHODS))]  # mixed: one per method
            log(f"parallama {', '.join(methods)} beams={beams} batch={batch} ({a.runs} interleaved runs)")
            cases = [ParallamaCase(model, ids, a.new_tokens, beams, m, batch) for m in methods]
            for r in run_interleaved(cases, a.runs):
                add(r)
        if a.tenants:
            n = a.tenants
            regs = tenant_adapters(model, n)
            log(f"parallama tenants: {n} PARA adapters in one batch, one adapter in the same batch, "
                f"{n} sequential runs; beams={beams} ({a.runs} interleaved runs)")  # fmt: skip
            cases = [
                ParallamaCase(model, ids, a.new_tokens, beams, "para", n, adapters=regs, assign=assign, tenants=t,
                              sequential=seq)
                for assign, t, seq in (([f"para{i}" for i in range(n)], n, False), (["para0"] * n, 1, False),
                                       ([f"para{i}" for i in range(n)], n, True))
            ]  # fmt: skip
            for r in run_interleaved(cases, a.runs):
                add(r)

    hf, why = (None, "peers off (--no-peers)") if a.no_peers else load_hf_peer(a.model, DTYPES[a.dtype], a.device)
    if hf is None:
        log(why)
    else:
        try:
            import peft  # noqa: F401

            have_peft = True
        except ImportError:
            have_peft = False
            log("peft is not installed; peft peers skipped")
        for beams in a.beams:
            for batch in a.batch:
                log(f"transformers base beams={beams} batch={batch} ({a.runs} runs)")
                add(bench_hf(hf, ids, a.new_tokens, beams, a.runs, batch=batch, weights=weights))
                for method in ("lora", "ia3"):
                    if method in a.methods and have_peft:
                        log(f"peft {method} beams={beams} batch={batch} ({a.runs} runs)")
                        pm = peft_model(hf, method)
                        add(bench_hf(pm, ids, a.new_tokens, beams, a.runs, batch=batch, engine="peft",
                                     method=method, weights=weights))  # fmt: skip
                        hf = pm.unload()  # the plain model again, for the next peer
            if a.tenants:
                n = a.tenants
                if find(rows, engine="transformers", method="base", beams=beams, batch=n) is None:
                    log(f"transformers base beams={beams} batch={n} ({a.runs} runs)")
                    add(bench_hf(hf, ids, a.new_tokens, beams, a.runs, batch=n, weights=weights))
                if have_peft:
                    log(f"peft tenants: {n} LoRA adapters, one mixed batch (adapter_names) beams={beams}")
                    pm = peft_model(hf, "lora", n)
                    kw = {"adapter_names": [f"t{i}" for i in range(n)]}
                    add(bench_hf(pm, ids, a.new_tokens, beams, a.runs, batch=n, engine="peft", method="lora",
                                 tenants=n, weights=weights, generate_kwargs=kw))  # fmt: skip
                    hf = pm.unload()
        del hf

    log("paged KV memory of a ragged batch")
    kv = kv_memory_ragged(model, [17, 80, 150, 274, 33], a.new_tokens)
    log("memory bandwidth after the runs")
    bw_after = measure_bandwidth(a.device, bw_bytes)
    bw = bandwidth_summary(bw_before, bw_after)
    bandwidth = bw[bw["used"]]  # the max: the best rate this machine showed in this run
    add_roof(rows, bandwidth)
    if step is not None:
        machine["compile"] = "eager fallback: " + step.error if step.error else "torch.compile (inductor)"

    print(f"\n{a.model} {a.dtype} {a.device}, backend {model.ops.backend}, prompt {a.prompt_len}, "
          f"{a.new_tokens} new, median of {a.runs}{', compiled' if step and not step.error else ''}\n")  # fmt: skip
    print(format_table(rows))
    for beams in a.beams:
        p = find(rows, engine="parallama", method="base", beams=beams, batch=1)
        t = find(rows, engine="transformers", method="base", beams=beams, batch=1)
        if p and t:
            ratios = {k: p[k] / t[k] for k in ("tps", "decode_tps", "prefill_tps")}
            print(f"\nbeams={beams}: parallama/transformers tok/s {ratios['tps']:.2f}x, "
                  f"decode {ratios['decode_tps']:.2f}x, prefill {ratios['prefill_tps']:.2f}x")  # fmt: skip
    kind = "copy (read + write)" if a.device == "cuda" else "read"
    print(
        f"\nmeasured {kind} bandwidth {bandwidth:.1f} GB/s (max of {len(bw_before) + len(bw_after)} samples; "
        f"median {bw['median']:.1f}, spread {bw['min']:.1f}-{bw['max']:.1f}; before {bw['before']}, after "
        f"{bw['after']}); weights {weights / 1e6:.0f} MB per decode step -> batch-1 roof "
        f"{bandwidth * 1e9 / weights:.0f} tok/s ('of roof': decode bytes/s over the bandwidth)"
    )
    mib = 1 / 2**20
    print(f"\nKV for ragged batch {kv['lens']} + {kv['new_tokens']} new: needed {kv['needed_bytes'] * mib:.1f} MiB, "
          f"paged peak {kv['paged_bytes'] * mib:.1f} MiB ({kv['paged_bytes'] / kv['needed_bytes']:.3f}x), "
          f"contiguous padded-to-longest {kv['contiguous_batch_max_bytes'] * mib:.1f} MiB, "
          f"contiguous max_seq_len {kv['contiguous_max_seq_len_bytes'] * mib:.0f} MiB")  # fmt: skip
    targets = summarize(rows, kv, a.tenants)
    print("\nTargets (ratios measured in this run; '-' = reported, no goal):\n")
    print(format_summary(targets))
    if a.json:
        a.json.write_text(json.dumps({
            "machine": machine, "bandwidth_gbs": bandwidth, "bandwidth": bw, "rows": rows, "kv_ragged": kv,
            "targets": targets, "args": {k: str(v) if isinstance(v, Path) else v for k, v in vars(a).items()},
        }, indent=1))  # fmt: skip
        log(f"wrote {a.json}")
    if a.plot and plot(rows, a.plot):
        log(f"wrote {a.plot}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
