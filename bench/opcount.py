"""The op budget of a decode step: how many torch calls (cpu / torch backends) or kernel launches (triton) each
layer costs. On a GPU every launch costs microseconds; on a CPU every top-level torch call costs dispatcher and
Python time, and after a GEMV has streamed megabytes of weights each one runs with cold caches.

Counted with a `TorchFunctionMode`, which sees top-level torch calls only (a call made inside another torch
call is not seen). Metadata queries (`size`, `dim`, `stride`, ...) are not ops. On the triton backend a fused
kernel counts as one launch and what its host wrapper does is not counted; the twins it falls back to count
their compute calls (views launch nothing).
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import Any

from torch.overrides import TorchFunctionMode

from kernels.ops import TorchOps

# Answers about a tensor, not work on it.
METADATA = frozenset(
    {"size", "dim", "numel", "stride", "storage_offset", "is_contiguous", "data_ptr", "element_size", "__len__"}
    | {"__get__", "shape", "dtype", "device", "is_floating_point", "requires_grad", "__bool__", "__index__"}
)
# Calls that make a view or hand memory over without touching the data: work for the dispatcher, not a kernel.
VIEWS = frozenset(
    {"view", "reshape", "unflatten", "flatten", "split", "__getitem__", "transpose", "permute", "unsqueeze"}
    | {"squeeze", "expand", "as_strided", "narrow", "select", "detach", "view_as_complex", "view_as_real"}
    | {"numpy", "from_numpy", "chunk", "unbind", "t"}
)


def _name(func: Any) -> str:
    return getattr(func, "__name__", None) or str(func)


class OpCounter(TorchFunctionMode):
    """Counts top-level torch calls by name while active (`with counter:`), except while `paused`."""

    def __init__(self) -> None:
        super().__init__()
        self.calls: Counter[str] = Counter()
        self.kernels: Counter[str] = Counter()  # fused Triton ops, one launch each
        self.paused = 0

    def __torch_function__(self, func: Any, types: Any, args: tuple = (), kwargs: dict | None = None) -> Any:
        name = _name(func)
        if not self.paused and name not in METADATA:
            self.calls[name] += 1
        return func(*args, **(kwargs or {}))

    def summary(self, n_layers: int) -> dict[str, Any]:
        views = sum(n for name, n in self.calls.items() if name in VIEWS)
        torch_ops = sum(self.calls.values())
        launches = torch_ops - views + sum(self.kernels.values())
        return {
            "torch_ops": torch_ops,
            "views": views,
            "kernels": sum(self.kernels.values()),
            "launches": launches,
            "torch_ops_per_layer": torch_ops / n_layers,
            "launches_per_layer": launches / n_layers,
            "by_op": dict(self.calls.most_common()),
        }


def _fused_ops(ops: Any) -> list[str]:
    """The ops a triton backend binds to a Triton kernel (everything it does not inherit from the twins)."""
    if ops.backend != "triton":
        return []
    return [n for n in vars(TorchOps) if not n.startswith("_") and getattr(type(ops), n) is not getattr(TorchOps, n)]


@contextmanager
def counting(model: Any) -> Iterator[OpCounter]:
    """Count the torch calls and Triton launches `model` makes inside the block."""
    counter = OpCounter()
    ops = model.ops
    fused = _fused_ops(ops)
    saved = {n: getattr(ops, n) for n in fused}

    def one_launch(name: str, fn: Callable[..., Any]) -> Callable[..., Any]:
        def op(*args: Any, **kwargs: Any) -> Any:
            counter.kernels[name] += 1
            counter.paused += 1
            try:
                return fn(*args, **kwargs)
            finally:
                counter.paused -= 1

        return op

    for n in fused:  # an instance attribute shadows the class's for this model's (shared) ops object
        setattr(ops, n, one_launch(n, saved[n]))
    try:
        with counter:
            yield counter
    finally:
        for n in fused:
            delattr(ops, n)


def decode_step_ops(engine: Any, prompt: list[int], params: Any, adapter: str | None = None) -> dict[str, Any]:
    """The op budget of one decode step of `prompt` (batch 1, with the engine's adapter named `adapter`):
    its model's `forward_step` for the second new token is counted (the first step is the prefill)."""
    model = engine.model
    own = vars(model).get("forward_step")  # set on the instance already (bench --compile)
    step = model.forward_step
    seen: list[dict[str, Any]] = []

    def counted(*args: Any, **kwargs: Any) -> Any:
        if len(seen) != 1:  # the prefill (not counted) and the steps after the counted one
            seen.append({})
            return step(*args, **kwargs)
        with counting(model) as c:
            out = step(*args, **kwargs)
        seen.append(c.summary(model.args.n_layers))
        return out

    model.forward_step = counted
    try:
        engine.generate([prompt], params, adapters=[adapter])
    finally:
        if own is None:
            del model.forward_step  # the bound method again
        else:
            model.forward_step = own
    if len(seen) < 2:
        raise ValueError("decode_step_ops: the generation ended before a decode step (raise max_new_tokens)")
    return seen[1]


# Budgets for one batch-1 decode step, PARA included: top-level torch calls per layer on the cpu backend (its
# cost is per call), kernel launches per layer on triton (a launch costs microseconds on a GPU).
BUDGETS = {"cpu": ("torch_ops_per_layer", 12), "triton": ("launches_per_layer", 8)}


def budget_targets(ops: dict[str, dict[str, Any]], backend: str) -> list[dict[str, Any]]:
    """{method: decode_step_ops(...)} as targets: the backend's budget as a goal, the other count reported."""
    out = []
    for method, c in ops.items():
        for key in ("torch_ops_per_layer", "launches_per_layer"):
            goal = BUDGETS[backend][1] if BUDGETS.get(backend, (None,))[0] == key else None
            what = key.replace("_per_layer", "").replace("_", " ")
            out.append(
                {
                    "target": f"decode {what} per layer ({backend} backend, {method}, batch 1)",
                    "ratio": c[key],
                    "goal": goal,
                    "at_most": True,
                    "met": None if goal is None else c[key] <= goal,
                }
            )
    return out
