"""Measurement for the decode benchmark: timing, peak memory, the machine's memory bandwidth, and the
bytes a decode step must read.

Timings sync CUDA around the clock (`sync`, `timed`); `PeakMemory` reads the peak memory growth over a block
(CUDA's allocator peak, or the CPU's RSS high-water mark); `measure_bandwidth` samples the roof every row's
decode bytes/s is compared with, over a buffer sized by `bandwidth_buffer_bytes`; `weight_bytes`,
`kv_bytes_per_token` and `bytes_per_decode_step` count what a decode step streams.
"""

from __future__ import annotations

import math
import re
import resource
import statistics
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import torch

from kernels import native
from model import Llama


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

    CPU: streaming read bandwidth; each sample is the best of a torch sum, a BLAS GEMV (numpy `A @ v`) and,
    when it built, the compiled decode layer's own GEMV (kernels/native.py, what the cpu backend's decode
    streams its weights with) over the buffer: bytes read / time.
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
    readers: list[Callable[[], Any]] = [buf.sum, lambda: a @ v]
    if native.available():
        x = torch.ones(1, 1024)
        readers.append(lambda: native.linear(x, buf))
        readers[-1]()
    out = []
    for _ in range(reads):
        best = math.inf
        for f in readers:
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
