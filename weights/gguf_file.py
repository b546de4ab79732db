"""GGUF (llama.cpp) files, read with the `gguf` package and dequantized to float32.

Q/K layout: llama.cpp's converter applies the inverse of HF's rotary permutation before writing,
so GGUF stores wq/wk in Meta's interleaved-pair layout and we use them unchanged. The parity test
against transformers (which re-permutes on load) is the proof.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import torch

from kernels.reference import rope_frequencies
from model.args import ModelArgs
from weights.common import Checkpoint, CheckpointError, load_tokenizer, require
from weights.io import brief

_LAYER_NAMES = {
    "attn_q": "attention.wq",
    "attn_k": "attention.wk",
    "attn_v": "attention.wv",
    "attn_output": "attention.wo",
    "ffn_gate": "feed_forward.w1",
    "ffn_up": "feed_forward.w3",
    "ffn_down": "feed_forward.w2",
    "attn_norm": "attention_norm",
    "ffn_norm": "ffn_norm",
}
_TOP_NAMES = {
    "token_embd.weight": "tok_embeddings.weight",
    "output_norm.weight": "norm.weight",
    "output.weight": "output.weight",
}


def _open(path: Path):
    import gguf

    try:
        return gguf.GGUFReader(path)
    except Exception as e:  # the reader raises assorted ValueError/IndexError/struct errors on damage
        raise CheckpointError(f"{path}: not a readable GGUF file ({brief(e)})") from None


def read_gguf_metadata(path: str | Path, reader: Any = None) -> dict[str, Any]:
    """All key/value fields as plain Python values (str, int, float, bool, lists of them)."""
    reader = reader or _open(Path(path))
    try:
        return {k: f.contents() for k, f in reader.fields.items() if not k.startswith("GGUF.")}
    except Exception as e:  # a field whose type and data disagree
        raise CheckpointError(f"{path}: unreadable GGUF metadata ({brief(e)})") from None


def _rope_scaling(freq_factors: np.ndarray, head_dim: int, theta: float, path: Path) -> float:
    """Llama 3.x GGUFs carry rope scaling only as a rope_freqs tensor (inv_freq / scaled inv_freq);
    find the Llama 3 scale factor that reproduces it exactly."""
    base = rope_frequencies(head_dim, theta)
    for factor in (8.0, 32.0, 16.0, 4.0, 2.0):
        scaled = rope_frequencies(head_dim, theta, scaled=True, scale_factor=factor)
        if np.allclose((base / scaled).numpy(), freq_factors, rtol=1e-5, atol=1e-6):
            return factor
    raise CheckpointError(f"{path}: rope_freqs.weight matches no Llama 3 rope scaling (factors 2–32)")


def gguf_args(path: Path, meta: dict[str, Any], shapes: dict[str, tuple[int, ...]], rope_freqs: Any) -> ModelArgs:
    """ModelArgs from a GGUF's metadata; `shapes` (GGUF tensor name → (rows, cols)) fill in a missing vocab size
    and tell a tied head; `rope_freqs` (the rope_freqs tensor, None if absent) carries Llama 3.x scaling."""

    def field(name: str, default: Any = None) -> Any:
        key = f"llama.{name}"
        return require(meta, key, path) if default is None else meta.get(key, default)

    try:  # metadata of the wrong type, or a rope_freqs tensor of the wrong size, is a bad file too
        n_heads = int(field("attention.head_count"))
        dim = int(field("embedding_length"))
        head_dim = int(meta.get("llama.rope.dimension_count", dim // n_heads))
        theta = float(field("rope.freq_base", 10000.0))
        scale_factor = _rope_scaling(rope_freqs, head_dim, theta, path) if rope_freqs is not None else None
        vocab = meta.get("llama.vocab_size") or len(meta.get("tokenizer.ggml.tokens", []))
        return ModelArgs(
            dim=dim,
            n_layers=int(field("block_count")),
            n_heads=n_heads,
            n_kv_heads=int(field("attention.head_count_kv", n_heads)),
            vocab_size=int(vocab) or shapes["token_embd.weight"][0],
            hidden_dim=int(field("feed_forward_length")),
            head_dim=head_dim,
            norm_eps=float(field("attention.layer_norm_rms_epsilon", 1e-5)),
            rope_theta=theta,
            use_scaled_rope=scale_factor is not None,
            rope_scale_factor=scale_factor or 8.0,
            max_seq_len=int(field("context_length", 2048)),
            tie_embeddings="output.weight" not in shapes,
        )
    except CheckpointError:
        raise
    except KeyError as e:
        raise CheckpointError(f"{path}: missing tensor {e.args[0]}") from None
    except (TypeError, ValueError, ZeroDivisionError) as e:
        raise CheckpointError(f"{path}: {brief(e)}") from None


def meta_name(name: str, path: Path) -> str:
    """A GGUF tensor name (blk.N.attn_q.weight) → Meta's (layers.N.attention.wq.weight)."""
    if name in _TOP_NAMES:
        return _TOP_NAMES[name]
    parts = name.split(".")  # blk.N.attn_q.weight
    if len(parts) != 4 or parts[0] != "blk" or parts[2] not in _LAYER_NAMES:
        raise CheckpointError(f"{path}: unexpected tensor {name}")
    return f"layers.{parts[1]}.{_LAYER_NAMES[parts[2]]}.{parts[3]}"


def gguf_tokenizer(meta: dict[str, Any], path: Path) -> object:
    from weights.hf_tokenizer import HFTokenizer

    has_tokenizer = "tokenizer.ggml.model" in meta
    return load_tokenizer(lambda: HFTokenizer.from_gguf_metadata(meta), path) if has_tokenizer else None


def open_gguf(path: str | Path) -> tuple[Any, dict[str, Any]]:
    """(the gguf reader, the metadata): a memory map, nothing dequantized yet."""
    path = Path(path)
    reader = _open(path)
    meta = read_gguf_metadata(path, reader)
    arch = meta.get("general.architecture")
    if arch != "llama":
        raise CheckpointError(f"{path}: general.architecture '{arch}' is not supported (only 'llama')")
    return reader, meta


def dequantize(t: Any, rows: slice = slice(None), path: Path | None = None) -> np.ndarray:
    """Rows of a GGUF tensor as float32 (rows, cols) (1-D tensors: (n,)); a reader tensor's data is its raw
    rows, so a row slice dequantizes only those."""
    import gguf

    try:
        data = t.data if t.data.ndim == 1 else t.data[rows]
        out = gguf.quants.dequantize(data, t.tensor_type)
        shape = tuple(reversed(t.shape.tolist()))
        return np.array(out, dtype=np.float32, copy=True).reshape(-1, *shape[1:])
    except Exception as e:
        what = f"tensor {t.name} ({t.tensor_type.name})"
        raise CheckpointError(f"{path}: {what} cannot be read: {brief(e)}") from None


def load_gguf(path: str | Path) -> Checkpoint:
    path = Path(path)
    reader, meta = open_gguf(path)
    tensors = {}
    rope_freqs = None
    for t in reader.tensors:
        arr = dequantize(t, path=path)
        if t.name == "rope_freqs.weight":
            rope_freqs = arr.reshape(-1)
            continue
        tensors[t.name] = torch.from_numpy(arr.reshape(tuple(reversed(t.shape.tolist()))))
    args = gguf_args(path, meta, {k: tuple(v.shape) for k, v in tensors.items()}, rope_freqs)
    sd = {meta_name(name, path): t for name, t in tensors.items()}
    return Checkpoint(args=args, state_dict=sd, tokenizer=gguf_tokenizer(meta, path), path=path)
