"""A llama-architecture GGUF of a loaded parallama `Llama`'s exact weights, for llama.cpp to run as a peer.

Tensors are written from `model.state_dict()` (Meta names) under llama.cpp's names. GGUF holds wq/wk in
Meta's interleaved-pair RoPE row order (weights/gguf_file.py loads them unpermuted), so their rows are written
as they are. A (out, in) array goes in as-is: GGUFWriter records the dims reversed (ggml's ne0 = in) and
weights/gguf_file.py reverses them back, so the round trip is exact. `gguf` is imported inside the functions,
as weights/gguf_file.py does.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import torch

from model import Llama

# Meta name (within a layer) -> llama.cpp's
LAYER_NAMES = {
    "attention.wq": "attn_q",
    "attention.wk": "attn_k",
    "attention.wv": "attn_v",
    "attention.wo": "attn_output",
    "feed_forward.w1": "ffn_gate",
    "feed_forward.w3": "ffn_up",
    "feed_forward.w2": "ffn_down",
    "attention_norm": "attn_norm",
    "ffn_norm": "ffn_norm",
}
TOP_NAMES = {
    "tok_embeddings.weight": "token_embd.weight",
    "norm.weight": "output_norm.weight",
    "output.weight": "output.weight",
}
FILE_TYPES = ("F32", "F16", "BF16")


def gguf_name(meta: str) -> str:
    """llama.cpp's tensor name for a Meta state-dict key: layers.3.attention.wq.weight -> blk.3.attn_q.weight."""
    if meta in TOP_NAMES:
        return TOP_NAMES[meta]
    _, n, rest = meta.split(".", 2)
    module, suffix = rest.rsplit(".", 1)
    return f"blk.{n}.{LAYER_NAMES[module]}.{suffix}"


def _written(model: Llama, tensors: dict[str, torch.Tensor] | None = None) -> dict[str, torch.Tensor]:
    """The tensors a file holds: a tied output head is the embedding, which llama.cpp reuses."""
    sd = model.state_dict() if tensors is None else tensors
    return {k: v for k, v in sd.items() if not (k == "output.weight" and model.args.tie_embeddings)}


def gguf_bytes(model: Llama, ftype: str) -> int:
    """The tensor bytes of `model`'s GGUF of type `ftype`: what a decode step reads (each weight once)."""
    return sum(t.numel() * (4 if ftype == "F32" or t.dim() == 1 else 2) for t in _written(model).values())


def _array(t: torch.Tensor, ftype: str) -> tuple[np.ndarray, Any]:
    """(numpy array, raw ggml type or None) for one tensor. 1-D tensors (the norms) stay F32 in every file
    type, as llama.cpp's own converter writes them (its CPU kernels take norm weights in F32)."""
    import gguf

    t = t.detach().to("cpu")
    if ftype == "F32" or t.dim() == 1:
        return t.float().contiguous().numpy(), None
    if ftype == "F16":
        return t.half().contiguous().numpy(), None
    # numpy has no bfloat16: the raw bytes go in with the type named; the writer derives the shape from them
    return t.bfloat16().contiguous().view(torch.int16).numpy().view(np.uint8), gguf.GGMLQuantizationType.BF16


def copy_tokenizer(writer: Any, source: Path) -> int:
    """Copy the tokenizer.* fields (tokens, merges, special ids, chat template) of the GGUF at `source`, each
    with its own value type; returns how many were copied."""
    import gguf

    reader = gguf.GGUFReader(source)
    n = 0
    for key, field in reader.fields.items():
        if key.startswith("tokenizer."):
            vtype = field.types[0]
            sub = field.types[-1] if vtype == gguf.GGUFValueType.ARRAY else None
            writer.add_key_value(key, field.contents(), vtype, sub_type=sub)
            n += 1
    return n


def write_gguf(
    model: Llama,
    path: str | Path,
    ftype: str = "F32",
    *,
    tokenizer_from: str | Path | None = None,
    tensors: dict[str, torch.Tensor] | None = None,
) -> Path:
    """Write `model`'s weights (or `tensors`, a Meta-named state dict of the same shapes) as a llama GGUF of
    file type `ftype` (F32, F16 or BF16; norms F32 always), with the tokenizer fields of the GGUF
    `tokenizer_from` (without one the file has no tokenizer: parallama loads it without, llama.cpp runs it on
    token ids with a vocabulary of type "none"). A tied output head is omitted, as llama.cpp expects."""
    import gguf

    if ftype not in FILE_TYPES:
        raise ValueError(f"ftype {ftype!r}: one of {FILE_TYPES}")
    a = model.args
    path = Path(path)
    w = gguf.GGUFWriter(path, "llama")
    w.add_type("model")
    w.add_block_count(a.n_layers)
    w.add_context_length(a.max_seq_len)
    w.add_embedding_length(a.dim)
    w.add_feed_forward_length(a.ffn_dim)
    w.add_head_count(a.n_heads)
    w.add_head_count_kv(a.n_kv_heads)
    w.add_key_length(a.head_dim)
    w.add_value_length(a.head_dim)
    w.add_layer_norm_rms_eps(a.norm_eps)
    w.add_rope_freq_base(a.rope_theta)
    w.add_rope_dimension_count(a.head_dim)
    w.add_vocab_size(a.vocab_size)
    w.add_file_type(getattr(gguf.LlamaFileType, {"F32": "ALL_F32"}.get(ftype, f"MOSTLY_{ftype}")))
    if tokenizer_from is not None:
        copy_tokenizer(w, Path(tokenizer_from))
    if a.use_scaled_rope:  # Llama 3.x: llama.cpp (and weights/gguf_file.py) read the scaling from this tensor
        from kernels.reference import rope_frequencies

        base = rope_frequencies(a.head_dim, a.rope_theta)
        scaled = rope_frequencies(a.head_dim, a.rope_theta, scaled=True, scale_factor=a.rope_scale_factor)
        w.add_tensor("rope_freqs.weight", (base / scaled).float().numpy())
    for name, t in _written(model, tensors).items():
        arr, raw = _array(t, ftype)
        w.add_tensor(gguf_name(name), arr, raw_dtype=raw)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return path
