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


# torch.save's zip format (torch >= 1.6) and its legacy format, which opens with a pickle (PROTO opcode).
_ZIP_MAGIC, _PICKLE_PROTO = b"PK\x03\x04", b"\x80"


def _load_shard(path: Path) -> dict[str, torch.Tensor]:
    try:
        with open(path, "rb") as f:
            head = f.read(4)
    except OSError as e:
        raise CheckpointError(f"{path}: cannot read ({e.strerror})") from None
    # Classify the file ourselves: torch's errors for damaged files are long and vary (miniz text, KeyError, ...).
    is_zip = head == _ZIP_MAGIC
    if is_zip and not zipfile.is_zipfile(path):  # the central directory sits at the end: a cut file loses it
        raise CheckpointError(f"{path}: truncated or not a torch checkpoint (zip without its central directory)")
    if not is_zip and not head.startswith(_PICKLE_PROTO):
        raise CheckpointError(f"{path}: truncated or not a torch checkpoint (neither zip nor pickle data)")
    try:
        # weights_only refuses pickled code; mmap keeps a 13 GB shard out of RAM until used, but only
        # the zip format can be mmapped: legacy files are read whole.
        sd = torch.load(path, map_location="cpu", weights_only=True, mmap=is_zip)
    except pickle.UnpicklingError as e:
        raise CheckpointError(f"{path}: refused to unpickle (weights_only=True): {_reason(e)}") from None
    except MemoryError:
        raise
    except Exception as e:  # damage inside the archive or pickle surfaces as anything from EOFError to KeyError
        raise CheckpointError(f"{path}: truncated or not a torch checkpoint ({type(e).__name__} in torch.load)") from e
    if not isinstance(sd, dict) or not all(isinstance(t, torch.Tensor) for t in sd.values()):
        raise CheckpointError(f"{path}: expected a dict of tensors")
    return sd


def _shard_count(shard: dict[str, torch.Tensor], args: ModelArgs) -> int | None:
    """How many model-parallel shards the checkpoint was saved as, from one shard: wq is column-parallel
    (its rows split, its dim columns whole) in every Llama, unlike tok_embeddings. None if params disagree."""
    wq = shard.get("layers.0.attention.wq.weight")
    if wq is None or wq.dim() != 2 or wq.shape[1] != args.dim or not 0 < wq.shape[0] <= args.q_dim:
        return None  # the merge or the model's shape check names the disagreement
    return args.q_dim // wq.shape[0] if args.q_dim % wq.shape[0] == 0 else None


def _names(idx: list[int]) -> str:
    """Shard names, brace-compressed so that 16 still fit one short line: consolidated.{00..05,07}.pth."""
    if len(idx) == 1:
        return f"consolidated.{idx[0]:02d}.pth"
    runs: list[list[int]] = []
    for i in idx:
        if runs and i == runs[-1][-1] + 1:
            runs[-1].append(i)
        else:
            runs.append([i])
    parts = [f"{r[0]:02d}..{r[-1]:02d}" if len(r) > 2 else ",".join(f"{i:02d}" for i in r) for r in runs]
    return "consolidated.{" + ",".join(parts) + "}.pth"


def _check_shard_names(d: Path, paths: list[Path], n: int | None) -> None:
    """consolidated.00.pth .. consolidated.{n-1}.pth, all present; n from the shapes, else the numbering."""
    stems = [p.name.removeprefix("consolidated.").removesuffix(".pth") for p in paths]
    for p, s in zip(paths, stems):
        if not (s.isdigit() and s == f"{int(s):02d}"):  # 02d: sorted names are in rank order
            raise CheckpointError(f"{d}: shard name {p.name} is not consolidated.NN.pth (NN: 00, 01, ...)")
    found = sorted(int(s) for s in stems)
    why = "from wq rows vs params.json" if n else "from the numbering"
    n = n or found[-1] + 1
    if found == list(range(n)):
        return
    missing, extra = [i for i in range(n) if i not in found], [i for i in found if i >= n]
    what = f"missing shard(s) {_names(missing)}" if missing else f"unexpected shard(s) {_names(extra)}"
    raise CheckpointError(f"{d}: {what}: expected {n} ({why}), found {_names(found)}")


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
            cat = 0 if parts[0].shape[-1:] == (dim,) else 1
        elif k == "output.weight" or any(s in k for s in _CAT_DIM0):
            cat = 0
        elif any(s in k for s in _CAT_DIM1):
            cat = 1
        else:
            merged[k] = parts[0]  # replicated (norms)
            continue
        if parts[0].dim() != 2:
            raise CheckpointError(f"{paths[0]}: tensor {k} has shape {tuple(parts[0].shape)}, expected 2-D")
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
    first = _load_shard(paths[0])
    _check_shard_names(d, paths, _shard_count(first, args))
    shards = [first] + [_load_shard(p) for p in paths[1:]]
    sd = _merge_shards(shards, paths, args.dim)
    # Llama 3.2 1B/3B tie the output head to the embedding and ship no output.weight.
    args.tie_embeddings = "output.weight" not in sd
    rows = sd["tok_embeddings.weight"].shape[0] if "tok_embeddings.weight" in sd else args.vocab_size
    if rows != args.vocab_size:
        raise CheckpointError(f"{params_path}: vocab_size {args.vocab_size} but tok_embeddings has {rows} rows")
    return Checkpoint(args=args, state_dict=sd, tokenizer=tokenizer, path=d)
