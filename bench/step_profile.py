"""Where a batch-1 decode step's time goes, and a prefill's: milliseconds by op, the rest being Python and glue.

Every op the model calls through its backend (`kernels/ops.py`) is timed by shadowing it on the model's ops
object for the duration (as `bench.opcount` counts them); the output projection is told apart from the layers'
projections by its weight. "outside ops" is the step's wall time minus the timed ops: the embedding, the
tables' gathers, module calls, the engine's bookkeeping and sampling. Wall-clock timing of each call needs
the device idle between calls, so on CUDA every op synchronises and the step is slower than untimed; the
split, not the sum, is the result there.
"""

from __future__ import annotations

import statistics
import time
from collections import Counter
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import Any

import torch

from kernels.ops import TorchOps

# decode_stack builds the compiled layers' structs (once per model and KV pool): not a step's op
OPS = [n for n in vars(TorchOps) if not n.startswith("_") and n not in ("backend", "scope", "decode_stack")]


@contextmanager
def _timed_ops(model: Any, spent: Counter[str], calls: Counter[str]) -> Iterator[None]:
    """Every op of the model's backend timed into spent / calls for the duration (the output projection as
    "lm_head"); the ops object is restored after."""
    ops = model.ops
    cuda = model.tok_embeddings.weight.device.type == "cuda"

    def timed(name: str, fn: Callable[..., Any]) -> Callable[..., Any]:
        def op(*args: Any, **kwargs: Any) -> Any:
            if cuda:
                torch.cuda.synchronize()
            t = time.perf_counter()
            out = fn(*args, **kwargs)
            if cuda:
                torch.cuda.synchronize()
            key = "lm_head" if name == "linear_scale" and args[1] is model.output.weight else name
            spent[key] += time.perf_counter() - t
            calls[key] += 1
            return out

        return op

    saved = dict(vars(ops))  # instance attributes (the cpu backend's compiled layer) are put back after
    for n in OPS:  # an instance attribute shadows the class's (shared ops object: removed after)
        if getattr(ops, n) is not None:  # None: the backend has no such op (the model checks)
            setattr(ops, n, timed(n, getattr(ops, n)))
    try:
        yield
    finally:
        for n in OPS:
            if n in vars(ops):
                delattr(ops, n)
        vars(ops).update(saved)


def _summary(steps: list[tuple[float, Counter[str], Counter[str]]], total: str) -> dict[str, Any]:
    names = sorted({k for _, c, _ in steps for k in c})
    ops_ms = {k: 1e3 * statistics.median(c[k] for _, c, _ in steps) for k in names}
    ms = 1e3 * statistics.median(s for s, _, _ in steps)
    return {
        total: ms,
        "ops_ms": dict(sorted(ops_ms.items(), key=lambda kv: -kv[1])),
        "outside_ops_ms": ms - sum(ops_ms.values()),
        "calls": {k: statistics.median(n[k] for _, _, n in steps) for k in names},  # per step
        "steps": len(steps),
    }


def decode_profile(engine: Any, prompt: list[int], params: Any, adapter: str | None = None) -> dict[str, Any]:
    """Median ms per decode step by op over one generation of `prompt` (its prefill and first step left out):
    {"step_ms", "ops_ms": {op: ms}, "outside_ops_ms", "calls": {op: calls per step}, "steps"}."""
    spent: Counter[str] = Counter()
    calls: Counter[str] = Counter()
    steps: list[tuple[float, Counter[str], Counter[str]]] = []
    with _timed_ops(engine.model, spent, calls):
        req = engine.add_request(prompt, params, adapter)
        engine.step()  # the prefill and the first decode step
        while not req.finished:
            spent.clear()
            calls.clear()
            t = time.perf_counter()
            engine.step()
            steps.append((time.perf_counter() - t, Counter(spent), Counter(calls)))
    if not steps:
        raise ValueError("decode_profile: the generation ended before a decode step (raise max_new_tokens)")
    return _summary(steps, "step_ms")


def prefill_profile(engine: Any, prompt: list[int], runs: int = 5) -> dict[str, Any]:
    """Median ms by op of a prefill of `prompt` (a 1-token request, after one warm-up): {"step_ms" (the
    prefill), "ops_ms", "outside_ops_ms", "calls", "steps"} as `decode_profile`."""
    from infer.sampling import SamplingParams

    params = SamplingParams(max_new_tokens=1, ignore_eos=True)
    spent: Counter[str] = Counter()
    calls: Counter[str] = Counter()
    steps: list[tuple[float, Counter[str], Counter[str]]] = []
    with _timed_ops(engine.model, spent, calls):
        for i in range(runs + 1):
            spent.clear()
            calls.clear()
            req = engine.add_request(prompt, params, None)
            t = time.perf_counter()
            while not req.finished:
                engine.step()
            if i:
                steps.append((time.perf_counter() - t, Counter(spent), Counter(calls)))
    return _summary(steps, "step_ms")


def prefill_flops(model: Any, prompt_len: int) -> int:
    """FLOPs of a prefill's projections: every layer matrix over the prompt, the output projection over one row."""
    layer = sum(p.numel() for layer in model.layers for p in layer.parameters() if p.dim() == 2)
    return 2 * prompt_len * layer + 2 * model.output.weight.numel()


def format_profile(p: dict[str, Any], what: str = "step") -> str:
    """One markdown table: ms per `what` (a decode step, a prefill) and share for each op, then what lies
    outside the ops."""
    lines = [f"| op | ms per {what} | share |", "|---|---|---|"]
    for name, ms in [*p["ops_ms"].items(), ("outside ops (Python, glue, sampling)", p["outside_ops_ms"])]:
        lines.append(f"| {name} | {ms:.2f} | {ms / p['step_ms']:.0%} |")
    lines.append(f"| **{what}** | **{p['step_ms']:.2f}** | median of {p['steps']} |")
    return "\n".join(lines)


# the ops that stream the weights (decode_layer: a whole compiled layer, its GEMVs and the small ops between)
GEMV_OPS = ("linear_scale", "gated_up", "lm_head", "decode_layer", "decode_layers", "decode_linear")


def remaining(profile: dict[str, Any], weight_bytes: int, peer_decode_tps: float | None, peer: str) -> list[str]:
    """The arithmetic of a decode-speed gap: this step's weight-streaming time and rate, the rest, and the
    peer's whole step at the same bytes."""
    gemv = sum(profile["ops_ms"].get(k, 0.0) for k in GEMV_OPS)
    step = profile["step_ms"]
    lines = [
        f"parallama step {step:.1f} ms (profiled): projections {gemv:.1f} ms = {weight_bytes / 1e6:.0f} MB at "
        f"{weight_bytes / gemv / 1e6:.1f} GB/s, everything else {step - gemv:.1f} ms ("
        + (f"attention {profile['ops_ms']['paged_attention']:.1f}, " if "paged_attention" in profile["ops_ms"] else "")
        + f"outside ops {profile['outside_ops_ms']:.1f})"
        + (
            " (decode_layer(s): each layer's GEMVs with its small ops)"
            if {"decode_layer", "decode_layers"} & set(profile["ops_ms"])
            else ""
        )
    ]
    if peer_decode_tps:
        peer_ms = 1e3 / peer_decode_tps
        lines.append(
            f"{peer} step {peer_ms:.1f} ms in all: the same {weight_bytes / 1e6:.0f} MB at "
            f"{weight_bytes / peer_ms / 1e6:.1f} GB/s or faster; parallama's projections alone take "
            f"{gemv / peer_ms:.2f}x that whole step, the other ops {(step - gemv) / peer_ms:.2f}x"
        )
    return lines


PREFILL_GEMM_OPS = ("linear_scale", "gated_up", "lm_head")


def prefill_remaining(
    profile: dict[str, Any], flops: int, peer_prefill_tps: float | None, peer: str, prompt_len: int, goal: float
) -> list[str]:
    """The arithmetic of a prefill-speed gap: the projections' time and FLOP rate, the rest by op, and what
    the goal against the peer's whole prefill leaves for everything but the projections."""
    gemm = sum(profile["ops_ms"].get(k, 0.0) for k in PREFILL_GEMM_OPS)
    total = profile["step_ms"]
    rest = ", ".join(f"{k} {v:.1f}" for k, v in profile["ops_ms"].items() if k not in PREFILL_GEMM_OPS and v >= 0.05)
    lines = [
        f"parallama prefill {total:.1f} ms (profiled): projections {gemm:.1f} ms = {flops / 1e9:.1f} GFLOP at "
        f"{flops / gemm / 1e6:.0f} GFLOP/s (with their epilogues), everything else {total - gemm:.1f} ms ({rest}, "
        f"outside ops {profile['outside_ops_ms']:.1f})"
    ]
    if peer_prefill_tps:
        peer_ms = 1e3 * prompt_len / peer_prefill_tps
        budget = peer_ms / goal
        lines.append(
            f"{peer} prefill {peer_ms:.1f} ms in all; {goal:g}x of it is {budget:.1f} ms, which leaves "
            f"{budget - gemm:.1f} ms beside these projections for what takes {total - gemm:.1f} ms now"
        )
    return lines
