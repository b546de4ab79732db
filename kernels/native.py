"""The cpu backend's compiled decode layer (kernels/csrc/decode_layer.c): built on first use, loaded with ctypes.

A decode step through the per-op path is ~10 torch calls per layer plus Python around each; on a CPU the
projections stream their weights at the memory roof and the rest is call overhead. `decode_layer` runs a
whole layer for up to 8 decode rows (fp32, one process, unmerged LoRA rows included) in one C call: its
GEMVs are split by output rows over the library's own spinning thread pool (`torch.get_num_threads()` threads
when loaded; `set_threads` changes it), the small steps between them run in C on the calling thread. With
PARALLAMA_GEMV=blas (or `use_blas(True)`) the GEMVs are numpy's OpenBLAS `cblas_sgemv` instead (found in
numpy's bundled library and handed to the C code), kept to compare the two. Its twin is the per-op path
(`TransformerBlock.forward`); tests compare them.

The library is compiled once per source, compiler and CPU with the system C compiler (`cc`, -O3
-march=native) into ~/.cache/parallama (or $PARALLAMA_CACHE) and reused. Without a compiler, without the
BLAS symbol, or with PARALLAMA_NATIVE=0, `available()` is False and the model keeps the per-op path.
"""

from __future__ import annotations

import ctypes
import functools
import hashlib
import os
import platform
import shutil
import subprocess
import tempfile
import warnings
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch

SOURCE = Path(__file__).with_name("csrc") / "decode_layer.c"
SOURCES = (SOURCE, SOURCE.with_name("prompt_attention.c"))  # one library (native_attention.py wraps the second)
HEADERS = (SOURCE.with_name("pool.h"), SOURCE.with_name("simd.h"))  # included by the sources: in the cache key
MAX_ROWS = 8  # MAX_ROWS in the C source
FLAGS = ["-O3", "-march=native", "-fopenmp-simd", "-pthread", "-shared", "-fPIC", "-std=c11"]
OPENMP = "-fopenmp"  # tried first: the row passes then split a prefill's rows over torch's OpenMP threads
PARALLEL_ROWS = 16  # from this many rows on (fewer: on the calling thread)

_i64, _f32, _ptr = ctypes.c_int64, ctypes.c_float, ctypes.c_void_p


LORA_PROJECTIONS = ("q", "k", "v", "o", "gate", "up", "down")  # the C enum's order
MAX_LORA_RANK = 256
MAX_HEAD_DIM = 256  # MAX_HEAD_DIM in the C source


class _Lora(ctypes.Structure):
    _fields_ = [(n, _i64) for n in ("proj", "r", "n_rows")] + [(n, _ptr) for n in ("a", "b", "rows")]
    _fields_ += [("scaling", _f32)]


class _Layer(ctypes.Structure):
    _fields_ = [
        *[(n, _i64) for n in ("rows", "dim", "n_heads", "n_kv_heads", "head_dim", "ffn_dim", "block_size")],
        ("max_blocks", _i64),
        ("eps", _f32),
        *[(n, _ptr) for n in ("x", "residual", "out", "stream", "attn_norm", "ffn_norm", "wqkv", "wo", "w13", "w2")],
        ("scale_qkv", _ptr),
        ("scale_u", _ptr),
        ("scale_qkv_stride", _i64),
        ("scale_u_stride", _i64),
        *[(n, _ptr) for n in ("cos_sin", "k_cache", "v_cache", "slots", "block_tables", "seq_lens", "work")],
        ("lora", ctypes.POINTER(_Lora)),
        ("n_lora", _i64),
        ("scale_qkv_layer_stride", _i64),
        ("scale_u_layer_stride", _i64),
    ]


_lib: Any = None
_tried = False
_on_torchs_openmp = False  # the loaded library's OpenMP regions run on torch's threads (`openmp_is_torchs`)


def _cpu_id() -> str:
    try:
        flags = next(line for line in Path("/proc/cpuinfo").read_text().splitlines() if line.startswith("flags"))
    except (OSError, StopIteration):
        flags = platform.processor()
    return flags


def _build(flags: Sequence[str] = FLAGS) -> Path:
    """The shared library of SOURCES (their headers and the flags in the cache key), compiled once per CPU."""
    cc = os.environ.get("CC") or shutil.which("cc") or shutil.which("gcc")
    if cc is None:
        raise RuntimeError("no C compiler (cc / gcc / $CC) on PATH")
    src = b"".join(p.read_bytes() for p in (*SOURCES, *HEADERS))
    version = subprocess.run([cc, "--version"], capture_output=True, text=True, check=False).stdout
    key = hashlib.sha256(src + " ".join([cc, *flags, version, _cpu_id()]).encode()).hexdigest()[:16]
    cache = Path(os.environ.get("PARALLAMA_CACHE") or Path.home() / ".cache" / "parallama")
    lib = cache / f"decode_layer-{key}.so"
    if lib.exists():
        return lib
    cache.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(suffix=".so", dir=cache)
    os.close(fd)
    try:
        cmd = [cc, *flags, *map(str, SOURCES), "-o", tmp, "-lm"]
        done = subprocess.run(cmd, capture_output=True, text=True)
        if done.returncode != 0:
            raise RuntimeError(f"{cc} failed on {SOURCE.parent}: {done.stderr.strip().splitlines()[-1:]}")
        os.replace(tmp, lib)  # atomic: a concurrent builder finds a whole library or none
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)
    return lib


def library() -> Any:
    """The loaded library, or None (no compiler, a failed build, or PARALLAMA_NATIVE=0; warned once)."""
    global _lib, _tried, _on_torchs_openmp
    if _tried:
        return _lib
    _tried = True
    if os.environ.get("PARALLAMA_NATIVE", "1") == "0":
        return None
    try:
        try:
            lib = ctypes.CDLL(str(_build(flags=[*FLAGS, OPENMP])))
        except (OSError, RuntimeError):  # no OpenMP to build or load: the same library, passes on the caller
            lib = ctypes.CDLL(str(_build()))
    except (OSError, RuntimeError) as e:
        warnings.warn(f"parallama: the compiled decode layer is unavailable ({e}); using the per-op path", stacklevel=2)
        return None
    lib.pl_set_sgemv.argtypes = [_ptr]
    lib.pl_set_sgemv(_numpy_sgemv())  # None: no BLAS to compare with; the pool does every GEMV
    lib.pl_use_blas.argtypes = [ctypes.c_int]
    lib.pl_use_blas.restype = ctypes.c_int
    lib.pl_set_threads.argtypes = [ctypes.c_int, _i64]
    lib.pl_set_threads.restype = ctypes.c_int
    lib.pl_set_threads(torch.get_num_threads(), -1)
    gemv = os.environ.get("PARALLAMA_GEMV", "pool")
    if gemv not in ("pool", "blas"):
        warnings.warn(f"parallama: PARALLAMA_GEMV={gemv!r} is not 'pool' or 'blas'; using the pool", stacklevel=2)
    elif gemv == "blas" and not lib.pl_use_blas(1):
        warnings.warn("parallama: PARALLAMA_GEMV=blas but numpy's BLAS lacks cblas_sgemv; using the pool", stacklevel=2)
    lib.pl_decode_layer.argtypes = [ctypes.POINTER(_Layer)]
    lib.pl_decode_layer.restype = ctypes.c_int
    lib.pl_linear.argtypes = [_ptr, _ptr, _ptr, _i64, _i64, _i64]
    lib.pl_linear.restype = ctypes.c_int
    lib.pl_decode_layers.argtypes = [ctypes.POINTER(_Layer), _i64]
    lib.pl_decode_layers.restype = ctypes.c_int
    lib.pl_decode_layer_work.argtypes = [_i64] * 6
    lib.pl_add_rms_norm.argtypes = [_ptr, _ptr, _ptr, _ptr, _ptr, _i64, _i64, _f32]
    lib.pl_add_rms_norm.restype = ctypes.c_int
    lib.pl_rope_write_kv.argtypes = [_ptr] * 6 + [_i64] * 4
    lib.pl_rope_write_kv.restype = ctypes.c_int
    lib.pl_silu_mul.argtypes = [_ptr, _ptr, _i64, _i64]
    lib.pl_silu_mul.restype = ctypes.c_int
    lib.pl_decode_layer_work.restype = _i64
    lib.pl_set_parallel_rows.argtypes, lib.pl_set_parallel_rows.restype = [_i64], None
    lib.pl_transpose_k.argtypes, lib.pl_transpose_k.restype = [_ptr, _ptr, _i64, _i64, _i64], None
    lib.pl_causal_attention.argtypes, lib.pl_causal_attention.restype = [_ptr] * 4 + [_i64] * 5, ctypes.c_int
    _on_torchs_openmp = openmp_is_torchs(lib)  # asked once: the row passes and the prompt attention need it
    lib.pl_set_parallel_rows(PARALLEL_ROWS if _on_torchs_openmp else 0)
    _lib = lib
    return lib


def on_torchs_openmp() -> bool:
    """Whether the library loaded and its OpenMP regions run on torch's own threads."""
    return library() is not None and _on_torchs_openmp


def openmp_runtime(lib: ctypes.CDLL) -> int | None:
    """Where `lib` (or a library it links) resolved OpenMP's parallel-region entry: the runtime it runs on."""
    try:
        return ctypes.cast(lib.GOMP_parallel, ctypes.c_void_p).value
    except AttributeError:
        return None


def openmp_is_torchs(lib: ctypes.CDLL) -> bool:
    """Whether `lib`'s OpenMP regions run on torch's own threads: it links libgomp.so.1, which the loader resolves
    to the copy torch loaded. Other copies may be mapped too (sentencepiece's wheel bundles one under another
    name); only the one each library binds to counts. Where it binds to another runtime (torch on Intel's, say),
    its regions would bring a second pool that spins against torch's for the cores."""
    torch_cpu = ctypes.CDLL(str(Path(torch.__file__).parent / "lib" / "libtorch_cpu.so"))
    ours = openmp_runtime(lib)
    return ours is not None and ours == openmp_runtime(torch_cpu)


def _numpy_sgemv() -> int | None:
    """The address of cblas_sgemv (64-bit integers) in the BLAS numpy was built with, or None."""
    import numpy as np

    libs = Path(np.__file__).parent.parent / "numpy.libs"
    for path in sorted(libs.glob("*openblas*.so*")):
        blas = ctypes.CDLL(str(path))  # already loaded by numpy: the same library, the same thread pool
        for name in ("scipy_cblas_sgemv64_", "cblas_sgemv64_"):
            fn = getattr(blas, name, None)
            if fn is not None:
                return ctypes.cast(fn, ctypes.c_void_p).value
    return None


def available() -> bool:
    return library() is not None


def set_threads(n: int) -> int:
    """Threads of the decode layer's GEMVs (the caller included); the number in effect."""
    return int(library().pl_set_threads(n, -1))


def use_blas(on: bool) -> bool:
    """GEMVs through numpy's cblas_sgemv (True) or the pool (False); whether the BLAS is in use."""
    return bool(library().pl_use_blas(int(on)))


def _p(t: torch.Tensor | None) -> int | None:
    return None if t is None else t.data_ptr()


_LAYOUT = ("attention_norm", "wqkv", "wo", "ffn_norm", "w13", "w2", "k_cache", "v_cache", "x", "block_tables")


def decode_layer(
    x: torch.Tensor,
    residual: torch.Tensor | None,
    weights: tuple[torch.Tensor, ...],
    eps: float,
    shape: tuple[int, int, int],
    cos_sin: torch.Tensor,
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    slots: torch.Tensor,
    block_tables: torch.Tensor,
    seq_lens: torch.Tensor,
    scale_qkv: torch.Tensor | None = None,
    scale_u: torch.Tensor | None = None,
    lora: dict[str, list[Any]] | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """One decode layer: (FFN output, the stream before the FFN), as `TransformerBlock.forward` returns them.

    x, residual: (M, d) contiguous fp32 (residual None for layer 0); weights: (attention_norm, wqkv, wo,
    ffn_norm, w13, w2), contiguous; shape: (n_heads, n_kv_heads, head_dim); cos_sin (M, hd/2, 2); caches
    (N, bs, H_kv, hd) of this layer; slots (M,), block_tables (M, nb), seq_lens (M,) int64, row m being
    sequence m; scales (M | 1, width) contiguous or None; lora: {projection: [model.peft.LoRADelta]} without
    dropout, rank ≤ MAX_LORA_RANK (a, b contiguous fp32; rows int64 or None). The caller checks what applies
    (`Llama._native_decode`).
    """
    lib = library()
    M, d = x.shape
    attn_norm, wqkv, wo, ffn_norm, w13, w2 = weights
    for name, t in zip(_LAYOUT, (*weights, k_cache, v_cache, x, block_tables)):
        if not t.is_contiguous():  # the C code walks raw rows: a strided view would read the wrong memory
            raise ValueError(f"decode_layer: {name} must be contiguous (shape {tuple(t.shape)}, strides {t.stride()})")
    H, H_kv, hd = shape
    f = w2.shape[1]
    out, stream = torch.empty_like(x), torch.empty_like(x)
    context = block_tables.shape[1] * k_cache.shape[1]
    work = torch.empty(lib.pl_decode_layer_work(M, d, wqkv.shape[0], H * hd, f, context), dtype=torch.float32)
    layer = _Layer(
        M, d, H, H_kv, hd, f, k_cache.shape[1], block_tables.shape[1], eps,
        *map(_p, (x, residual, out, stream, attn_norm, ffn_norm, wqkv, wo, w13, w2, scale_qkv, scale_u)),
        0 if scale_qkv is None or scale_qkv.shape[0] == 1 else scale_qkv.shape[1],
        0 if scale_u is None or scale_u.shape[0] == 1 else scale_u.shape[1],
        *map(_p, (cos_sin, k_cache, v_cache, slots, block_tables, seq_lens, work)),
    )  # fmt: skip
    deltas = [(LORA_PROJECTIONS.index(p), d) for p, ds in (lora or {}).items() for d in ds]
    if deltas:
        layer.lora = (_Lora * len(deltas))(
            *(
                _Lora(j, d.a.shape[0], 0 if d.rows is None else d.rows.numel(), _p(d.a), _p(d.b), _p(d.rows), d.scaling)
                for j, d in deltas
            )
        )
        layer.n_lora = len(deltas)
    if lib.pl_decode_layer(ctypes.byref(layer)) != 0:
        raise ValueError(f"decode_layer: unsupported shape (rows {M}, heads {H}/{H_kv}, head_dim {hd})")
    return out, stream


def _signature(t: torch.Tensor) -> tuple[int, tuple[int, ...], tuple[int, ...]]:
    return t.data_ptr(), tuple(t.shape), t.stride()


class DecodeStack:
    """Every layer of a decode step in one C call (`pl_decode_layers`): the layers' weights, norms and KV caches
    go into an array of layer structs once, at construction; a step fills in its rows, positions, block
    tables and the adapters' per-layer scales. What a Python loop over `decode_layer` costs per layer (struct
    building, checks, two allocations) is then paid once per model and cache. No LoRA rows (those take the
    per-layer call); the twin is the same per-op path.

    weights: per layer (attention_norm, wqkv, wo, ffn_norm, w13, w2), contiguous fp32; shape: (n_heads,
    n_kv_heads, head_dim); k_cache, v_cache: (n_layers, N, bs, H_kv, hd) contiguous.
    """

    def __init__(
        self,
        weights: Sequence[tuple[torch.Tensor, ...]],
        eps: float,
        shape: tuple[int, int, int],
        k_cache: torch.Tensor,
        v_cache: torch.Tensor,
    ) -> None:
        for name, t in (("k_cache", k_cache), ("v_cache", v_cache)):
            if not t.is_contiguous():
                raise ValueError(f"DecodeStack: {name} must be contiguous (strides {t.stride()})")
        for i, ws in enumerate(weights):
            for name, t in zip(_LAYOUT, ws):
                if not t.is_contiguous():
                    raise ValueError(f"DecodeStack: layer {i}'s {name} must be contiguous (strides {t.stride()})")
        # what the structs point into, by address and layout only: holding the tensors would keep a dropped KV
        # pool (or replaced weights) alive for as long as the model
        self.signature = tuple(_signature(t) for t in (weights[0][1], weights[-1][5], k_cache, v_cache))
        H, H_kv, hd = shape
        self.shape, self.n = shape, len(weights)
        self.dims = weights[0][1].shape[1], weights[0][1].shape[0], H * hd, weights[0][5].shape[1]  # d, qkv, q, f
        self.block_size = k_cache.shape[2]
        self.layers = (_Layer * self.n)()
        for i, (attn_norm, wqkv, wo, ffn_norm, w13, w2) in enumerate(weights):
            L = self.layers[i]
            L.dim, L.n_heads, L.n_kv_heads, L.head_dim, L.ffn_dim = self.dims[0], H, H_kv, hd, self.dims[3]
            L.block_size, L.eps = self.block_size, eps
            L.attn_norm, L.wqkv, L.wo, L.ffn_norm, L.w13, L.w2 = map(_p, (attn_norm, wqkv, wo, ffn_norm, w13, w2))
            L.k_cache, L.v_cache = _p(k_cache[i]), _p(v_cache[i])

    def matches(self, wqkv: torch.Tensor, w2: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor) -> bool:
        """Whether the structs still point at these: the first layer's wqkv, the last layer's w2 and the KV pools
        (same memory and layout). A model or pool that moved needs a new stack."""
        return self.signature == tuple(_signature(t) for t in (wqkv, w2, k_cache, v_cache))

    def __call__(
        self,
        x: torch.Tensor,
        cos_sin: torch.Tensor,
        slots: torch.Tensor,
        block_tables: torch.Tensor,
        seq_lens: torch.Tensor,
        scales: dict[str, torch.Tensor] | None = None,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """(the last layer's FFN output, the stream before it) for embeddings x (M, d); scales: {"qkv" | "u":
        (n_layers, M | 1, width)} contiguous, or None. Arguments as `decode_layer`'s."""
        lib = library()
        M, d = x.shape
        if not (x.is_contiguous() and block_tables.is_contiguous()):
            raise ValueError("DecodeStack: x and block_tables must be contiguous")
        out, stream = torch.empty_like(x), torch.empty_like(x)
        context = block_tables.shape[1] * self.block_size
        _, qkv, q, f = self.dims
        work = torch.empty(lib.pl_decode_layer_work(M, d, qkv, q, f, context), dtype=torch.float32)
        L0 = self.layers[0]
        L0.rows, L0.max_blocks = M, block_tables.shape[1]
        L0.x, L0.residual, L0.out, L0.stream = _p(x), None, _p(out), _p(stream)
        L0.cos_sin, L0.slots, L0.block_tables, L0.seq_lens, L0.work = map(
            _p, (cos_sin, slots, block_tables, seq_lens, work)
        )
        scales = scales or {}
        for name in ("qkv", "u"):  # layer 0's; pl_decode_layers steps to the others' (no loop over layers here)
            sc = scales.get(name)
            if sc is not None and not sc.is_contiguous():
                raise ValueError(f"DecodeStack: the {name} scales must be contiguous")
            setattr(L0, f"scale_{name}", _p(sc))
            setattr(L0, f"scale_{name}_stride", 0 if sc is None or sc.shape[1] == 1 else sc.shape[2])
            setattr(L0, f"scale_{name}_layer_stride", 0 if sc is None else sc.stride(0))
        if lib.pl_decode_layers(self.layers, self.n) != 0:
            raise ValueError(f"DecodeStack: unsupported shape (rows {M}, heads {self.shape})")
        return out, stream


def linear(x: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
    """x @ wᵀ for x (M ≤ 8, K), w (N, K), contiguous fp32: a decode step's output projection on the layers'
    threads (another library's pool here would spin against them)."""
    M, K = x.shape
    y = torch.empty(M, w.shape[0], dtype=torch.float32)
    if library().pl_linear(_p(x), _p(w), _p(y), M, w.shape[0], K) != 0:
        raise ValueError(f"linear: {M} rows (at most {MAX_ROWS})")
    return y


def add_rms_norm(
    x: torch.Tensor, residual: torch.Tensor | None, weight: torch.Tensor, eps: float
) -> tuple[torch.Tensor, torch.Tensor]:
    """(RMSNorm(x + residual) · weight, x + residual) for contiguous fp32 x, residual (..., d) and weight (d,),
    in one pass per row, a prompt's rows split over torch's threads (residual None: the norm of x, and x itself)."""
    d = x.shape[-1]
    y = torch.empty_like(x)
    h = x if residual is None else torch.empty_like(x)
    if library().pl_add_rms_norm(_p(x), _p(residual), _p(weight), _p(h), _p(y), x.numel() // d, d, eps) != 0:
        raise ValueError(f"add_rms_norm: bad shape {tuple(x.shape)}")
    return y, h


def rope_write_kv(
    qkv: torch.Tensor,
    cos_sin: torch.Tensor,
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    slots: torch.Tensor,
    n_heads: int,
    n_kv_heads: int,
) -> torch.Tensor:
    """`reference.rope_write_kv` for contiguous fp32 qkv (M, (H + 2 H_kv) hd), cos_sin (M, hd/2, 2), caches
    (N, bs, H_kv, hd) and int64 slots (M,): one pass per row (a prompt's split over torch's threads); returns Q
    (M, H, hd)."""
    M, hd = qkv.shape[0], cos_sin.shape[-2] * 2
    q = torch.empty(M, n_heads, hd, dtype=qkv.dtype)
    ptrs = (_p(qkv), _p(cos_sin), _p(k_cache), _p(v_cache), _p(slots), _p(q))
    if library().pl_rope_write_kv(*ptrs, M, n_heads, n_kv_heads, hd) != 0:
        raise ValueError(f"rope_write_kv: bad head size {hd}")
    return q


@functools.cache
def _has_silu_mul() -> bool:
    """Whether the library was built with silu_mul's AVX-512 form (asked once, with no rows)."""
    return library().pl_silu_mul(None, None, 0, 16) == 0


def silu_mul(g13: torch.Tensor) -> torch.Tensor | None:
    """silu(gate) · up for the stacked gate | up output g13 (M, 2N), contiguous fp32, in one vectorised C pass
    (its own e^x, within 2e-7 relative of expf); None where the library has no AVX-512 form."""
    if not _has_silu_mul():
        return None
    M, N = g13.shape[0], g13.shape[1] // 2
    out = torch.empty(M, N, dtype=g13.dtype)
    return out if library().pl_silu_mul(_p(g13), _p(out), M, N) == 0 else None
