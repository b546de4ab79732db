"""Checks with one-line errors: a set of tensors before any is adopted (model weights, adapter files, PILLOW
matchers), the model's `prompt_lens` argument, and an adapter against the model it is used with."""

from __future__ import annotations

from collections.abc import Callable, Mapping

import torch

from model.args import ModelArgs
from model.peft.base import Adapter


def check_tensors(
    got: Mapping[str, torch.Tensor | None],
    expected: Mapping[str, torch.Tensor],
    where: str,
    error: Callable[[str], Exception] = ValueError,
) -> None:
    """`got` holds exactly `expected`'s names (None counts as missing), each with the expected shape."""
    missing = [k for k in expected if got.get(k) is None]
    if missing:
        more = f" (+{len(missing) - 1} more)" if len(missing) > 1 else ""
        raise error(f"{where}: tensor {missing[0]} is missing{more}")
    unexpected = sorted(set(got) - set(expected))
    if unexpected:
        more = f" (+{len(unexpected) - 1} more)" if len(unexpected) > 1 else ""
        raise error(f"{where}: unexpected tensor {unexpected[0]}{more}")
    for k, want in expected.items():
        if tuple(got[k].shape) != tuple(want.shape):
            raise error(f"{where}: tensor {k} has shape {tuple(got[k].shape)}, this model needs {tuple(want.shape)}")


def check_prompt_lens(prompt_lens: torch.Tensor, B: int, T: int) -> None:
    if not isinstance(prompt_lens, torch.Tensor) or prompt_lens.shape != (B,) or prompt_lens.is_floating_point():
        shape = tuple(prompt_lens.shape) if isinstance(prompt_lens, torch.Tensor) else type(prompt_lens).__name__
        raise ValueError(f"prompt_lens must be an integer tensor of shape ({B},), got {shape}")
    if B and (int(prompt_lens.min()) < 1 or int(prompt_lens.max()) > T):
        raise ValueError(f"prompt_lens must lie in [1, {T}], got {prompt_lens.tolist()}")


def check_adapter(adapter: Adapter, args: ModelArgs) -> None:
    """`adapter` is a model.peft adapter made for a model of `args`' shape."""
    if not isinstance(adapter, Adapter):
        raise ValueError(f"adapter must be a model.peft adapter, got {type(adapter).__name__}")
    a, b = adapter.args, args
    if (a.n_layers, a.dim, a.q_dim, a.kv_dim, a.ffn_dim) != (b.n_layers, b.dim, b.q_dim, b.kv_dim, b.ffn_dim):
        raise ValueError(
            f"{adapter.method} adapter was built for a model of another shape (n_layers, dim, q/kv/ffn widths "
            f"{a.n_layers}, {a.dim}, {a.q_dim}/{a.kv_dim}/{a.ffn_dim}; this model has "
            f"{b.n_layers}, {b.dim}, {b.q_dim}/{b.kv_dim}/{b.ffn_dim})"
        )
