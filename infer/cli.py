"""What every command line here shares: bad arguments exit 2 with one line (argparse's usage block is noise),
and the --device / --dtype pair of the commands that load a model."""

from __future__ import annotations

import argparse
from typing import NoReturn

import torch

EXIT_BAD_INPUT = 2  # a bad flag, file or setting (argparse's own code)
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


class ArgumentParser(argparse.ArgumentParser):
    def error(self, message: str) -> NoReturn:
        self.exit(EXIT_BAD_INPUT, f"error: {message}\n")


def add_device_args(p: argparse.ArgumentParser) -> None:
    """--device and --dtype, as Llama.from_pretrained takes them."""
    p.add_argument("--device", default="cpu", help="cpu, cuda or cuda:N (default cpu)")
    p.add_argument("--dtype", default="float32", choices=list(DTYPES), help="weights and KV cache dtype")


def device_and_dtype(a: argparse.Namespace) -> tuple[torch.device, torch.dtype]:
    """The parsed pair, checked before the (slow) model load; ValueError with one line when unusable."""
    try:
        device = torch.device(a.device)
    except RuntimeError:
        raise ValueError(f"--device {a.device!r}: not a device (cpu, cuda, cuda:N)") from None
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ValueError(f"--device {a.device}: CUDA is not available to this torch build / machine")
    if device.type not in ("cpu", "cuda"):
        raise ValueError(f"--device {a.device}: only cpu and cuda are supported")
    return device, DTYPES[a.dtype]
