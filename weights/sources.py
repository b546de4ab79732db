"""Checkpoints read tensor by tensor and slice by slice, for a tensor-parallel rank (weights/sharded.py).

A `Source` knows the model's args and tokenizer before any weight is read, lists Meta-named tensors, and reads
`Spec` slices (model/tp.py) of them, touching only the bytes (or, for Meta's model-parallel files, only the
shards) a rank needs:
- Meta: `torch.load(mmap=True, weights_only=True)` of the consolidated.NN.pth shards that overlap the slice;
  with as many ranks as shards (or a multiple, or a divisor of the shard count) these are the rank's own;
- HF safetensors and the default model's cache: `safe_open(...).get_slice`;
- GGUF: the memory-mapped raw rows of a slice (column slices: whole quant blocks, else row chunks).
"""

from __future__ import annotations

import math
from abc import ABC, abstractmethod
from pathlib import Path
from typing import Any

import numpy as np
import torch
from safetensors import SafetensorError, safe_open

from model.args import ModelArgs
from model.hf_layout import rows_from_hf
from model.tp import Spec
from weights.common import CheckpointError, load_tokenizer, read_json
from weights.default import _cache_dir, default_gguf_path
from weights.gguf_file import dequantize, gguf_args, gguf_tokenizer, meta_name, open_gguf
from weights.hf import args_from_config, hf_to_meta, hf_tokenizer, rope_heads, safetensors_files
from weights.meta import _CAT_DIM0, _CAT_DIM1, _check_shard_names, _load_shard, _shard_count, args_from_params


class Source(ABC):
    path: Path
    args: ModelArgs
    tokenizer: object
    embedding_split: int | None = None  # the dim Meta's shards cut tok_embeddings on (None: one file)

    def bind(self, rank: int, size: int) -> None:
        """Called once this process's rank is known, before any read (Meta picks its shard here)."""
        return None

    @abstractmethod
    def names(self) -> list[str]:
        """The Meta names of the tensors to load."""

    @abstractmethod
    def read(self, name: str, spec: Spec | None) -> torch.Tensor:
        """[spec.start, spec.stop) of the full tensor along spec.dim (unpadded); the whole tensor for None."""


def _narrow(t: torch.Tensor, spec: Spec | None) -> torch.Tensor:
    return t if spec is None else t.narrow(spec.dim, spec.start, spec.stop - spec.start)


# ---- Meta ------------------------------------------------------------------------------------------------
class MetaSource(Source):
    """consolidated.NN.pth shards, each opened (memory-mapped) only when a slice overlaps it."""

    def __init__(self, directory: Path) -> None:
        from weights.tokenizer import load_tokenizer_model

        self.path = d = directory
        params_path = d / "params.json"
        params = read_json(params_path)
        tok_path = d / "tokenizer.model"
        if not tok_path.exists():
            raise CheckpointError(f"{tok_path}: missing (a Meta checkpoint ships its tokenizer.model)")
        self.tokenizer = load_tokenizer(lambda: load_tokenizer_model(tok_path))
        self.args = args_from_params(params, params_path, self.tokenizer.vocab_size)
        self.paths = sorted(d.glob("consolidated.*.pth"))
        if not self.paths:
            raise CheckpointError(f"{d}: no consolidated.*.pth shards")
        _check_shard_names(d, self.paths, None)  # numbering only: the shapes are checked in bind
        self._open: dict[int, dict[str, torch.Tensor]] = {}

    def _shard(self, j: int) -> dict[str, torch.Tensor]:
        if j not in self._open:
            self._open[j] = _load_shard(self.paths[j])
        return self._open[j]

    def bind(self, rank: int, size: int) -> None:
        n = len(self.paths)
        self.home = rank * n // size  # the shard this rank's slices start in
        first = self._shard(self.home)
        _check_shard_names(self.path, self.paths, _shard_count(first, self.args))
        self.args.tie_embeddings = "output.weight" not in first  # Llama 3.2 1B/3B
        emb = first.get("tok_embeddings.weight")
        if n > 1 and emb is not None:
            self.embedding_split = 0 if emb.shape[-1] == self.args.dim else 1
            rows = emb.shape[0] * (n if self.embedding_split == 0 else 1)
            if rows != self.args.vocab_size:
                raise CheckpointError(
                    f"{self.path / 'params.json'}: vocab_size {self.args.vocab_size} but tok_embeddings has {rows} rows"
                )

    def names(self) -> list[str]:
        return [k for k in self._shard(self.home) if k != "rope.freqs"]

    def _file_dim(self, name: str) -> int | None:
        if len(self.paths) == 1:
            return None
        if name == "tok_embeddings.weight":
            return self.embedding_split
        if name == "output.weight" or any(s in name for s in _CAT_DIM0):
            return 0
        return 1 if any(s in name for s in _CAT_DIM1) else None

    def _get(self, j: int, name: str) -> torch.Tensor:
        t = self._shard(j).get(name)
        if t is None:
            raise CheckpointError(f"{self.paths[j]}: tensor {name} is missing (it is in {self.paths[self.home].name})")
        return t

    def read(self, name: str, spec: Spec | None) -> torch.Tensor:
        fd = self._file_dim(name)
        if fd is None:  # whole in every file (norms, or one shard)
            return _narrow(self._get(self.home, name), spec)
        n = len(self.paths)
        if spec is None or spec.dim != fd:  # cut across the file's split: a piece of every shard
            return torch.cat([_narrow(self._get(j, name), spec) for j in range(n)], fd)
        per = self._get(self.home, name).shape[fd]
        pieces = []
        for j in range(spec.start // per, math.ceil(spec.stop / per)):  # only the shards the slice overlaps
            lo, hi = max(spec.start, j * per), min(spec.stop, (j + 1) * per)
            pieces.append(self._get(j, name).narrow(fd, lo - j * per, hi - lo))
        return pieces[0] if len(pieces) == 1 else torch.cat(pieces, fd)


# ---- safetensors (HF directories, the default model's cache) ---------------------------------------------
class SafetensorsSource(Source):
    """Safetensors files read by slice. `hf`: HF names and q/k rows in rotate-half order (un-permuted per head
    after slicing, which keeps whole heads); otherwise Meta names and layout (the default model's cache)."""

    def __init__(self, path: Path, files: list[Path], args: ModelArgs, tokenizer: object, hf: bool) -> None:
        self.path, self.args, self.tokenizer, self.hf = path, args, tokenizer, hf
        self._where: dict[str, tuple[Path, str]] = {}
        self._files: dict[Path, Any] = {}
        for f in files:
            for k in self._file(f).keys():
                meta = hf_to_meta(k, path) if hf else k
                if meta is not None and not (meta == "output.weight" and args.tie_embeddings):
                    self._where[meta] = (f, k)

    def _file(self, f: Path) -> Any:
        if f not in self._files:
            try:
                self._files[f] = safe_open(f, framework="pt")
            except (SafetensorError, OSError) as e:
                raise CheckpointError(f"{f}: not a readable safetensors file ({e})") from None
        return self._files[f]

    def names(self) -> list[str]:
        return list(self._where)

    def read(self, name: str, spec: Spec | None) -> torch.Tensor:
        f, key = self._where[name]
        try:
            sl = self._file(f).get_slice(key)
            if spec is None:
                t = sl[:]
            elif spec.dim == 0:
                t = sl[spec.start : spec.stop]
            else:
                t = sl[:, spec.start : spec.stop]
        except (SafetensorError, OSError, TypeError) as e:
            raise CheckpointError(f"{f}: tensor {key} cannot be read ({e})") from None
        if self.hf:
            heads = rope_heads(name, t.shape[0], self.args)
            t = t if heads is None else rows_from_hf(t, heads)
        return t


def hf_source(d: Path) -> SafetensorsSource:
    cfg_path = d / "config.json"
    args = args_from_config(read_json(cfg_path), cfg_path)
    return SafetensorsSource(d, safetensors_files(d), args, hf_tokenizer(d), hf=True)


# ---- GGUF ------------------------------------------------------------------------------------------------
class GGUFSource(Source):
    """A GGUF file: its reader memory-maps the raw rows, so a slice dequantizes only what it covers."""

    ROW_CHUNK = 256  # rows dequantized at once for a column slice that cuts through quant blocks

    def __init__(self, path: Path) -> None:
        self.path = path
        reader, meta = open_gguf(path)
        self._tensors = {t.name: t for t in reader.tensors}
        shapes = {k: tuple(reversed(t.shape.tolist())) for k, t in self._tensors.items()}
        rope = self._tensors.get("rope_freqs.weight")
        rope_freqs = dequantize(rope, path=path).reshape(-1) if rope is not None else None
        self.args = gguf_args(path, meta, shapes, rope_freqs)
        self.tokenizer = gguf_tokenizer(meta, path)
        self._names = {meta_name(k, path): k for k in self._tensors if k != "rope_freqs.weight"}

    def names(self) -> list[str]:
        return list(self._names)

    def read(self, name: str, spec: Spec | None) -> torch.Tensor:
        import gguf

        t = self._tensors[self._names[name]]
        if spec is None or t.data.ndim == 1:
            whole = torch.from_numpy(dequantize(t, path=self.path)).reshape(tuple(reversed(t.shape.tolist())))
            return _narrow(whole, spec)
        if spec.dim == 0:  # rows: contiguous raw rows
            return torch.from_numpy(dequantize(t, slice(spec.start, spec.stop), self.path))
        # columns: raw data is (rows, elements) for float types, (rows, bytes) of quant blocks otherwise
        block, size = gguf.GGML_QUANT_SIZES[t.tensor_type] if t.data.dtype == np.uint8 else (1, 1)
        if spec.start % block == 0 and spec.stop % block == 0:  # whole blocks: slice each raw row
            view = _RawColumns(t, slice(spec.start // block * size, spec.stop // block * size), spec.stop - spec.start)
            return torch.from_numpy(dequantize(view, path=self.path))
        chunks = [
            dequantize(t, slice(r, r + self.ROW_CHUNK), self.path)[:, spec.start : spec.stop]
            for r in range(0, t.data.shape[0], self.ROW_CHUNK)
        ]
        return torch.from_numpy(np.ascontiguousarray(np.concatenate(chunks)))


class _RawColumns:
    """A reader tensor cut to a range of each raw row (whole quant blocks), as `dequantize` reads tensors."""

    def __init__(self, t: Any, raw: slice, cols: int) -> None:
        self.name, self.tensor_type = t.name, t.tensor_type
        self.data = np.ascontiguousarray(t.data[:, raw])
        self.shape = np.array([cols, t.data.shape[0]])  # GGUF order: (cols, rows)


# ---- dispatch ----------------------------------------------------------------------------------------------
def default_source() -> Source:
    """The default model: its float32 safetensors cache when present (written by a one-process load), else
    the packaged GGUF read by slice (a tensor-parallel rank never builds the cache: that needs every weight)."""
    from weights.hf_tokenizer import HFTokenizer

    gguf_path = default_gguf_path()
    cache = _cache_dir(gguf_path)
    if (cache / "model.safetensors").exists():
        try:
            args = ModelArgs.from_dict(read_json(cache / "args.json"))
            source = SafetensorsSource(gguf_path, [cache / "model.safetensors"], args, None, hf=False)
            source.tokenizer = HFTokenizer.load_saved(cache)
            return source
        except Exception:  # a damaged cache: read the GGUF (a one-process load rebuilds the cache)
            pass
    return GGUFSource(gguf_path)


def open_source(source: str | Path) -> Source:
    """Like `weights.load_checkpoint`, but nothing but metadata is read yet."""
    if str(source) == "default":
        return default_source()
    path = Path(source)
    if path.is_file() and path.suffix == ".gguf":
        return GGUFSource(path)
    if path.is_dir() and (path / "params.json").exists():
        return MetaSource(path)
    if path.is_dir() and (path / "config.json").exists():
        return hf_source(path)
    raise CheckpointError(
        f"unknown model source {str(source)!r}: expected 'default', a .gguf file, "
        "a Meta directory (params.json) or an HF directory (config.json)"
    )
