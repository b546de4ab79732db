"""Hugging Face format: config.json + model.safetensors (or shards listed in model.safetensors.index.json).

HF's conversion script permutes wq/wk rows so its rotate-half RoPE matches Meta's interleaved pairs;
we apply the inverse permutation to get Meta's layout back (wk with n_kv_heads, not n_heads).
"""

from __future__ import annotations

import json
import re
from pathlib import Path

import torch
from safetensors import SafetensorError, safe_open

from model.args import ModelArgs
from model.hf_layout import rows_from_hf
from weights.common import Checkpoint, CheckpointError, load_tokenizer, read_json, require
from weights.io import brief

_LAYER_NAMES = {
    "self_attn.q_proj": "attention.wq",
    "self_attn.k_proj": "attention.wk",
    "self_attn.v_proj": "attention.wv",
    "self_attn.o_proj": "attention.wo",
    "mlp.gate_proj": "feed_forward.w1",
    "mlp.up_proj": "feed_forward.w3",
    "mlp.down_proj": "feed_forward.w2",
    "input_layernorm": "attention_norm",
    "post_attention_layernorm": "ffn_norm",
}
_TOP_NAMES = {
    "model.embed_tokens.weight": "tok_embeddings.weight",
    "model.norm.weight": "norm.weight",
    "lm_head.weight": "output.weight",
}
_LAYER_RE = re.compile(r"model\.layers\.(\d+)\.(.+)\.weight$")


def args_from_config(cfg: dict, path: Path) -> ModelArgs:
    model_type = cfg.get("model_type", "llama")
    if model_type != "llama":
        raise CheckpointError(f"{path}: model_type '{model_type}' is not supported (only 'llama')")
    # transformers ≥5 nests rope settings under rope_parameters; older configs use rope_scaling.
    rope = cfg.get("rope_parameters") or cfg.get("rope_scaling") or {}
    if not isinstance(rope, dict):
        raise CheckpointError(f"{path}: rope_parameters / rope_scaling must be an object, got {type(rope).__name__}")
    rope_type = rope.get("rope_type", rope.get("type", "default"))
    if rope_type not in ("default", "llama3"):
        raise CheckpointError(f"{path}: rope type '{rope_type}' is not supported (default, llama3)")
    try:
        return ModelArgs(
            dim=int(require(cfg, "hidden_size", path)),
            n_layers=int(require(cfg, "num_hidden_layers", path)),
            n_heads=int(require(cfg, "num_attention_heads", path)),
            n_kv_heads=cfg.get("num_key_value_heads"),
            vocab_size=int(require(cfg, "vocab_size", path)),
            hidden_dim=int(require(cfg, "intermediate_size", path)),
            head_dim=cfg.get("head_dim"),
            norm_eps=float(cfg.get("rms_norm_eps", 1e-6)),
            rope_theta=float(rope.get("rope_theta", cfg.get("rope_theta", 10000.0))),
            use_scaled_rope=rope_type == "llama3",
            rope_scale_factor=float(rope.get("factor", 8.0)),
            rope_low_freq_factor=float(rope.get("low_freq_factor", 1.0)),
            rope_high_freq_factor=float(rope.get("high_freq_factor", 4.0)),
            rope_original_max_seq_len=int(rope.get("original_max_position_embeddings", 8192)),
            max_seq_len=int(cfg.get("max_position_embeddings", 2048)),
            tie_embeddings=bool(cfg.get("tie_word_embeddings", False)),
        )
    except CheckpointError:
        raise
    except (TypeError, ValueError) as e:
        raise CheckpointError(f"{path}: {e}") from None


def safetensors_files(d: Path) -> list[Path]:
    index = d / "model.safetensors.index.json"
    if index.exists():
        try:
            names = list(dict.fromkeys(json.loads(index.read_text())["weight_map"].values()))
        except (OSError, ValueError, KeyError, TypeError, AttributeError) as e:  # ValueError: bad JSON or bytes
            raise CheckpointError(f"{index}: malformed index ({type(e).__name__}: {brief(e)})") from None
        if not names or not all(isinstance(f, str) for f in names):
            raise CheckpointError(f"{index}: weight_map must map tensor names to file names")
        files = [d / f for f in names]
        for f in files:
            if not f.exists():
                raise CheckpointError(f"{index}: lists {f.name}, which is missing")
        return files
    single = d / "model.safetensors"
    if not single.exists():
        raise CheckpointError(f"{d}: no model.safetensors or model.safetensors.index.json")
    return [single]


def read_safetensors(files: list[Path]) -> dict[str, torch.Tensor]:
    out: dict[str, torch.Tensor] = {}
    for f in files:
        try:
            with safe_open(f, framework="pt") as st:
                for k in st.keys():
                    out[k] = st.get_tensor(k)
        except (SafetensorError, OSError, TypeError) as e:  # TypeError: a dtype torch lacks
            raise CheckpointError(f"{f}: not a readable safetensors file ({brief(e)})") from None
    return out


def hf_to_meta(name: str, source: Path) -> str | None:
    """An HF tensor name → Meta's (None: a derived buffer to skip); unknown names are a CheckpointError."""
    if name.endswith("rotary_emb.inv_freq"):
        return None  # a derived buffer some old exports saved
    if name in _TOP_NAMES:
        return _TOP_NAMES[name]
    m = _LAYER_RE.match(name)
    if not m or m.group(2) not in _LAYER_NAMES:
        raise CheckpointError(f"{source}: unexpected tensor {name}")
    return f"layers.{m.group(1)}.{_LAYER_NAMES[m.group(2)]}.weight"


def rope_heads(meta: str, rows: int, args: ModelArgs) -> int | None:
    """How many RoPE heads `rows` rows of wq / wk hold (their rows are un-permuted per head); None otherwise."""
    if meta.endswith(("attention.wq.weight", "attention.wk.weight")) and rows and rows % args.head_dim == 0:
        return rows // args.head_dim
    return None  # (a wrong row count is left for the shape check to name)


def to_meta_names(hf: dict[str, torch.Tensor], args: ModelArgs, source: Path) -> dict[str, torch.Tensor]:
    sd = {}
    for name, t in hf.items():
        meta = hf_to_meta(name, source)
        if meta is None:
            continue
        heads = rope_heads(meta, t.shape[0], args)
        sd[meta] = t if heads is None else rows_from_hf(t, heads)
    if args.tie_embeddings:
        sd.pop("output.weight", None)  # some exports save the tied head too
    return sd


def hf_tokenizer(d: Path) -> object:
    from weights.hf_tokenizer import HFTokenizer

    has_tokenizer = (d / "tokenizer.json").exists() or (d / "tokenizer.model").exists()
    # weights alone are still usable by id; the tokenizer's own message names its file
    return load_tokenizer(lambda: HFTokenizer.from_dir(d)) if has_tokenizer else None


def load_hf(directory: str | Path) -> Checkpoint:
    d = Path(directory)
    cfg_path = d / "config.json"
    cfg = read_json(cfg_path)
    args = args_from_config(cfg, cfg_path)
    sd = to_meta_names(read_safetensors(safetensors_files(d)), args, d)
    return Checkpoint(args=args, state_dict=sd, tokenizer=hf_tokenizer(d), path=d)
