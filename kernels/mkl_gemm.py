"""A prefill's GEMMs with each weight packed once: MKL's `cblas_sgemm_compute` over `cblas_sgemm_pack`'s form.

`F.linear` on CPU calls MKL's sgemm, which copies the weight operand into its panel layout in every call: for a
prompt of a few hundred tokens that copy is a sixth of the GEMM's time (bench/gemm_ab.py). Packed once, the
weight is reused by every prefill, whatever its row count (the packed size does not depend on it; torch's own
packed path, `torch.ops.mkl._mkl_linear`, only accepts the row count it was packed for). On a Xeon the products
equal `F.linear`'s bit for bit at every prefill row count tried (9-2000): the same kernels on the same panels.

The functions are MKL's own, in the libtorch_cpu.so that x86 torch wheels link MKL into statically, so they
run on the same OpenMP threads as every other torch op. A packed weight is cached per tensor (in a weak table,
not on the tensor: it is never pickled with it) and remade when its storage moves or torch sees it written in
place (`_version`: `copy_`, an optimizer's per-tensor or foreach step). Writes torch does not count (through
`.data`, a numpy view, a fused optimizer) need `invalidate(model)`. A packing costs about the weight's size
again in resident memory (SmolLM2's layers: +376 MiB after the first prefill; MKL reserves more address space
than it touches). Packings stop at a budget of resident bytes, a quarter of the machine's memory unless
PARALLAMA_PACKED_GEMM_MIB says otherwise: a model that large keeps `F.linear` for the weights past it rather
than doubling its footprint. PARALLAMA_PACKED_GEMM=0 turns the path off; without MKL's
symbols (another BLAS, another platform) it is off.
"""

from __future__ import annotations

import ctypes
import functools
import os
import weakref
from pathlib import Path

import torch
import torch.nn.functional as F
from torch.utils.weak import WeakTensorKeyDictionary

_ROW_MAJOR, _NO_TRANS, _TRANS, _PACKED, _B_MATRIX = 101, 111, 112, 151, 162  # mkl_cblas.h's enum values
# MKL picks the panel layout (and so the kernels) by the row count it is told at packing: a layout packed for
# 1, 17 or 4096 rows is no faster than F.linear on a prompt; any of 128-512 is 1.2-1.4x on 20-512 rows
PACK_ROWS = 256
_I, _P, _F = ctypes.c_int, ctypes.c_void_p, ctypes.c_float
_packed_bytes = 0  # the weights' bytes now held packed (a packing leaves with its tensor)
_packs: WeakTensorKeyDictionary = WeakTensorKeyDictionary()  # weight -> ((data_ptr, _version), packed buffer)


@functools.cache
def _mkl() -> ctypes.CDLL | None:
    """torch's libtorch_cpu.so with MKL's pack/compute symbols typed, or None where it has none."""
    if os.environ.get("PARALLAMA_PACKED_GEMM", "1") == "0" or not torch.backends.mkl.is_available():
        return None
    path = Path(torch.__file__).parent / "lib" / "libtorch_cpu.so"
    try:
        lib = ctypes.CDLL(str(path))  # already loaded by `import torch`: the same copy of MKL
        get_size, pack, compute = lib.cblas_sgemm_pack_get_size, lib.cblas_sgemm_pack, lib.cblas_sgemm_compute
    except (OSError, AttributeError):
        return None
    get_size.argtypes, get_size.restype = [_I, _I, _I, _I], ctypes.c_size_t
    pack.argtypes, pack.restype = [_I, _I, _I, _I, _I, _I, _F, _P, _I, _P], None
    compute.argtypes, compute.restype = [_I, _I, _I, _I, _I, _I, _P, _I, _P, _I, _F, _P, _I], None
    return lib


def available() -> bool:
    return _mkl() is not None


def pack(w: torch.Tensor) -> torch.Tensor:
    """w (N, K), contiguous fp32, as the packed B operand of x @ wᵀ (a flat fp32 buffer in MKL's own layout)."""
    lib = _mkl()
    if lib is None:
        raise RuntimeError("pack: MKL's packed GEMM is not available (PARALLAMA_PACKED_GEMM=0 or no MKL in torch)")
    if w.dim() != 2 or w.dtype != torch.float32 or not w.is_contiguous():
        raise ValueError(f"pack: the weight must be a contiguous 2-D fp32 tensor, got {w.dtype} {tuple(w.stride())}")
    n, k = w.shape
    size = lib.cblas_sgemm_pack_get_size(_B_MATRIX, PACK_ROWS, n, k)  # bytes; the same for every row count
    buf = torch.empty((size + 3) // 4, dtype=torch.float32)
    lib.cblas_sgemm_pack(_ROW_MAJOR, _B_MATRIX, _TRANS, PACK_ROWS, n, k, 1.0, w.data_ptr(), k, buf.data_ptr())
    return buf


def budget_bytes() -> int:
    """How many weight bytes may be held packed: PARALLAMA_PACKED_GEMM_MIB, else a quarter of MemTotal."""
    mib = os.environ.get("PARALLAMA_PACKED_GEMM_MIB")
    if mib is not None:
        try:
            return int(float(mib) * 2**20)
        except ValueError:
            raise ValueError(f"PARALLAMA_PACKED_GEMM_MIB={mib!r} is not a number of MiB") from None
    return _mem_total() // 4


@functools.cache
def _mem_total() -> int:
    try:
        with open("/proc/meminfo") as f:
            return 1024 * next(int(line.split()[1]) for line in f if line.startswith("MemTotal:"))
    except (OSError, StopIteration, ValueError):
        return 16 << 30  # unknown: as for a 16 GiB machine


def _release(nbytes: int) -> None:
    global _packed_bytes
    _packed_bytes -= nbytes


def packed(w: torch.Tensor) -> torch.Tensor | None:
    """`pack(w)`, made once per tensor and remade when w's storage moved or it was written in place; None when
    packing it would pass `budget_bytes()`."""
    global _packed_bytes
    key = (w.data_ptr(), w._version)
    hit = _packs.get(w)
    if hit is not None and hit[0] == key:
        return hit[1]
    hit = None
    _packs.pop(w, None)  # a stale buffer goes before the new one is made: never two in memory
    nbytes = w.numel() * w.element_size()
    if _packed_bytes + nbytes > budget_bytes():
        return None
    buf = pack(w.detach())
    _packed_bytes += nbytes
    weakref.finalize(buf, _release, nbytes)
    _packs[w] = (key, buf)
    return buf


def is_packed(w: torch.Tensor) -> bool:
    return w in _packs


def invalidate(*objs: torch.Tensor | torch.nn.Module) -> None:
    """Drop the packings of these weights (or of every parameter of these modules): after writes torch does not
    count, such as `p.data.mul_()` or a fused optimizer step. The next GEMM packs them again."""
    for obj in objs:
        for t in obj.parameters() if isinstance(obj, torch.nn.Module) else (obj,):
            _packs.pop(t, None)


def linear(x: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
    """x @ wᵀ for contiguous fp32 x (M, K) and w (N, K), on w's packed form (made on the first call), or by
    `F.linear` where the packing budget is spent."""
    if w.shape[1] != x.shape[1] or not x.is_contiguous() or x.dtype != torch.float32:
        raise ValueError(f"linear: x {tuple(x.shape)} {x.dtype} against w {tuple(w.shape)}")
    b = packed(w)
    return F.linear(x, w) if b is None else compute(x, b, w.shape[0])


def compute(x: torch.Tensor, b: torch.Tensor, n: int) -> torch.Tensor:
    """x (M, K) @ the packed weight b of n outputs: MKL's compute step alone (the caller checked x)."""
    M, K = x.shape
    y = torch.empty(M, n, dtype=torch.float32)
    _mkl().cblas_sgemm_compute(
        _ROW_MAJOR, _NO_TRANS, _PACKED, M, n, K, x.data_ptr(), K, b.data_ptr(), n, 0.0, y.data_ptr(), n
    )
    return y
