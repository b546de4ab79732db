"""Meta's original format: params.json + consolidated.NN.pth model-parallel shards + tokenizer.model.

Shards are the model-parallel slices Meta's fairscale layers hold, so merging follows the layer type:
- ColumnParallelLinear (wq wk wv w1 w3 output) is split on the output dim → concatenate on dim 0;
- RowParallelLinear (wo w2) is split on the input dim → concatenate on dim 1;
- tok_embeddings is a ParallelEmbedding in Llama 1/2 (split on the embedding dim → dim 1) and a
  VocabParallelEmbedding in Llama 3 (split on the vocab → dim 0); we tell them apart by shape:
  a shard holding the full model width was split on the vocab;
- norms are replicated: shard 0's copy is used. `rope.freqs` (a Llama 1 buffer) is ignored.
"""

from __future__ import annotations

import pickle
import zipfile
from pathlib import Path

import torch

from model.args import ModelArgs
from weights.common import Checkpoint, CheckpointError, load_tokenizer, read_json, require

_CAT_DIM0 = ("attention.wq.", "attention.wk.", "attention.wv.", "feed_forward.w1.", "feed_forward.w3.")
_CAT_DIM1 = ("attention.wo.", "feed_forward.w2.")


def args_from_params(params: dict, path: Path, vocab_size: int) -> ModelArgs:
    """params.json → ModelArgs; `vocab_size` (from the tokenizer) fills in Meta's -1."""
    llama3 = vocab_size >= 128000
    v = params.get("vocab_size", -1)
    try:
        return ModelArgs(
            dim=int(require(params, "dim", path)),
            n_layers=int(require(params, "n_layers", path)),
            n_heads=int(require(params, "n_heads", path)),
            n_kv_heads=params.get("n_kv_heads"),
            vocab_size=vocab_size if v in (-1, None) else int(v),
            multiple_of=int(params.get("multiple_of", 256)),
            ffn_dim_multiplier=params.get("ffn_dim_multiplier"),
            norm_eps=float(params.get("norm_eps", 1e-5)),
            rope_theta=float(params.get("rope_theta", 10000.0)),
            use_scaled_rope=bool(params.get("use_scaled_rope", False)),
            rope_scale_factor=float(params.get("rope_scaling_factor", params.get("rope_scale_factor", 8.0))),
            max_seq_len=int(params.get("max_seq_len", 8192 if llama3 else 4096)),
        )
    except CheckpointError:
        raise
    except (TypeError, ValueError) as e:
        raise CheckpointError(f"{path}: {e}") from None


# Lines of torch's weights_only error that say nothing about the file (the first even advises weights_only=False).
_TORCH_BOILERPLATE = ("Weights only load failed", "Please file an issue", "Check the documentation")


def _reason(e: Exception) -> str:
    """The informative line of a torch.load error (e.g. "Trying to load unsupported GLOBAL posix.system ...")."""
    lines = [s.strip() for s in str(e).splitlines() if s.strip()]
    useful = [s for s in lines if not s.startswith(_TORCH_BOILERPLATE)]
    return (useful or lines or [type(e).__name__])[0]


def _load_shard(path: Path) -> dict[str, torch.Tensor]:
    try:
        # weights_only refuses pickled code; mmap keeps a 13 GB shard out of RAM until used, but only
        # the zip format (torch >= 1.6) can be mmapped: legacy files are read whole.
        sd = torch.load(path, map_location="cpu", weights_only=True, mmap=zipfile.is_zipfile(path))
    except pickle.UnpicklingError as e:
        raise CheckpointError(f"{path}: refused to unpickle (weights_only=True): {_reason(e)}") from None
    except (RuntimeError, OSError, EOFError) as e:
        raise CheckpointError(f"{path}: not a readable torch checkpoint ({_reason(e)})") from None
    if not isinstance(sd, dict) or not all(isinstance(t, torch.Tensor) for t in sd.values()):
        raise CheckpointError(f"{path}: expected a dict of tensors")
    return sd


def _merge_shards(shards: list[dict[str, torch.Tensor]], paths: list[Path], dim: int) -> dict[str, torch.Tensor]:
    keys = [k for k in shards[0] if k != "rope.freqs"]
    for p, s in zip(paths[1:], shards[1:]):
        extra = set(s) ^ set(shards[0])
        if extra:
            raise CheckpointError(f"{p}: tensor names differ from {paths[0].name} (e.g. {sorted(extra)[0]})")
    if len(shards) == 1:
        return {k: shards[0][k] for k in keys}
    merged = {}
    for k in keys:
        parts = [s[k] for s in shards]
        for p, t in zip(paths[1:], parts[1:]):
            if t.shape != parts[0].shape:
                raise CheckpointError(
                    f"{p}: tensor {k} has shape {tuple(t.shape)}, {paths[0].name} has {tuple(parts[0].shape)}"
                )
        if k == "tok_embeddings.weight":
            cat = 0 if parts[0].shape[1] == dim else 1
        elif k == "output.weight" or any(s in k for s in _CAT_DIM0):
            cat = 0
        elif any(s in k for s in _CAT_DIM1):
            cat = 1
        else:
            merged[k] = parts[0]  # replicated (norms)
            continue
        merged[k] = torch.cat(parts, dim=cat)
    return merged


def load_meta(directory: str | Path) -> Checkpoint:
    from weights.tokenizer import load_tokenizer_model

    d = Path(directory)
    params_path = d / "params.json"
    params = read_json(params_path)
    tok_path = d / "tokenizer.model"
    if not tok_path.exists():
        raise CheckpointError(f"{tok_path}: missing (a Meta checkpoint ships its tokenizer.model)")
    tokenizer = load_tokenizer(lambda: load_tokenizer_model(tok_path))  # its message names the file
    args = args_from_params(params, params_path, tokenizer.vocab_size)

    paths = sorted(d.glob("consolidated.*.pth"))
    if not paths:
        raise CheckpointError(f"{d}: no consolidated.*.pth shards")
    expected = [f"consolidated.{i:02d}.pth" for i in range(len(paths))]
    if [p.name for p in paths] != expected:
        raise CheckpointError(f"{d}: shard names {[p.name for p in paths]} are not {expected}")
    shards = [_load_shard(p) for p in paths]
    sd = _merge_shards(shards, paths, args.dim)
    # Llama 3.2 1B/3B tie the output head to the embedding and ship no output.weight.
    args.tie_embeddings = "output.weight" not in sd
    rows = sd["tok_embeddings.weight"].shape[0] if "tok_embeddings.weight" in sd else args.vocab_size
    if rows != args.vocab_size:
        raise CheckpointError(f"{params_path}: vocab_size {args.vocab_size} but tok_embeddings has {rows} rows")
    return Checkpoint(args=args, state_dict=sd, tokenizer=tokenizer, path=d)
