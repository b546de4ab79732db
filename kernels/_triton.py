"""Launch helpers shared by the Triton kernels (no kernels here).

CUDA tensors run the compiled kernel (autotuned unless a config is forced); CPU tensors run in Triton's
interpreter, which needs TRITON_INTERPRET=1 in the environment before triton is first imported.
"""

from __future__ import annotations

import torch
import triton


def interpreter_ready(kernel) -> bool:
    """True when `kernel` runs in Triton's interpreter: TRITON_INTERPRET=1 was set before triton was imported.

    (Triton decides at import time: its own `tl.zeros`, `tl.sum`, ... are interpreter-ready only then.)
    """
    from triton.runtime.interpreter import InterpretedFunction

    return isinstance(kernel, InterpretedFunction)


def launch(
    kernel,
    tuned,
    grid,
    args: tuple,
    constexprs: dict,
    config: triton.Config | dict | None,
    device_tensor: torch.Tensor,
):
    """Run `kernel` on `grid`: interpreted for CPU tensors, else the autotuner `tuned` or a forced config.

    `config` (a triton.Config or a dict of its kwargs) pins the block sizes; under the interpreter the
    launch options (num_warps, num_stages) mean nothing and are dropped.
    """
    if isinstance(config, triton.Config):
        opts = {"num_warps": config.num_warps, "num_stages": config.num_stages}
        config = dict(config.kwargs)
    else:
        opts = {}
    if device_tensor.device.type != "cuda":
        if not interpreter_ready(kernel):
            raise RuntimeError(
                "Triton kernels on CPU tensors need the interpreter: set TRITON_INTERPRET=1 before triton is imported"
            )
        kernel[grid](*args, **constexprs, **(config or {}))
    elif config is not None:
        kernel[grid](*args, **constexprs, **config, **opts)
    else:
        tuned[grid](*args, **constexprs)


def bucket(m: int, cap: int = 1024) -> int:
    """Autotune key for a row count: the next power of two, capped (decode and prefill tune apart)."""
    return min(triton.next_power_of_2(max(m, 1)), cap)
