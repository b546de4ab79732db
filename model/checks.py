"""Names and shapes of a set of tensors, checked before any is adopted (model weights, adapter files,
PILLOW matchers): one line naming the first problem."""

from __future__ import annotations

from collections.abc import Callable, Mapping

import torch


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
