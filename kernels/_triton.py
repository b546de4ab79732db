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


def scale_args(
    scale: torch.Tensor | None,
    row_to_seq: torch.Tensor | None,
    lead: tuple[int, ...],
    M: int,
    N: int,
    dummy: torch.Tensor,
    name: str = "scale",
) -> tuple[torch.Tensor, torch.Tensor, int, int, int]:
    """(scale ptr, row_to_seq ptr, stride_s, stride_n, rows_per_seq) for a per-sequence column-scale epilogue,
    with `kernels.reference.linear_scale`'s broadcast rules; `dummy` stands in for absent pointers."""
    if scale is None:
        return dummy, dummy, 0, 0, 1
    assert scale.dim() == 2 and scale.shape[1] == N, f"{name} must be (S, {N}), got {tuple(scale.shape)}"
    S = scale.shape[0]
    stride_ss, stride_sn = scale.stride()
    if row_to_seq is not None:
        assert row_to_seq.shape == (M,), f"row_to_seq must be ({M},)"
        return scale, row_to_seq, stride_ss, stride_sn, 1
    if S == 1:
        return scale, dummy, 0, stride_sn, max(M, 1)
    assert len(lead) >= 1 and S == lead[0], f"{name} has {S} rows for x with leading dims {tuple(lead)}"
    return scale, dummy, stride_ss, stride_sn, max(M // S, 1)
