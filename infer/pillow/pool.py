"""PILLOW's prompt pool and the embeddings the matcher reads.

Pool: a JSONL of exemplars {"prompt", "response"}. Every exemplar ("prompt\\nresponse") and every query prompt
is embedded by the backbone itself: the mean over positions of the final hidden states (after the last norm),
always the base model's (no adapter), so one cached pool embedding serves every adapter. Embeddings are cached
under `$PARALLAMA_CACHE/pillow/` in a safetensors file keyed by the model fingerprint and the texts' hash.
An exemplar whose prompt equals the query's is never offered (no answer leaks): `banned_mask`.
"""

from __future__ import annotations

import hashlib
import json
import os
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file, save_file

from weights.io import atomic_write, read_jsonl

Record = dict[str, Any]


class PillowError(ValueError):
    """A bad pool, matcher file or setting: the one-line message names the file, field or argument."""


# ---- pool and query files -----------------------------------------------------------------------------
def check_record(obj: Any) -> None:
    """A pool / query record: an object with string "prompt" (non-empty) and "response"; ValueError if not."""
    if not isinstance(obj, dict):
        raise ValueError(f'expected a JSON object with "prompt" and "response", got {type(obj).__name__}')
    for key in ("prompt", "response"):
        if key not in obj:
            raise ValueError(f'field "{key}" is missing')
        if not isinstance(obj[key], str):
            raise ValueError(f'field "{key}" must be a string, got {type(obj[key]).__name__}')
    if not obj["prompt"]:
        raise ValueError('field "prompt" is empty')


def read_records(path: str | os.PathLike[str]) -> list[Record]:
    """The {"prompt", "response", ...} records of a JSONL file; a bad line is an error naming file:line."""
    rows, _ = read_jsonl(path, PillowError, check_record)
    return [record for _, record in rows]


def exemplar_text(record: Record) -> str:
    """What an exemplar is embedded as: its prompt and response, plain (a chat template's fixed system text
    would dominate a mean pool)."""
    return f"{record['prompt']}\n{record['response']}"


def texts_sha256(texts: Sequence[str]) -> str:
    return hashlib.sha256(json.dumps(list(texts), ensure_ascii=False).encode()).hexdigest()


@dataclass
class Pool:
    path: str
    records: list[Record]
    sha256: str  # of the exemplar texts, in order: what the embeddings and a trained matcher depend on

    def __len__(self) -> int:
        return len(self.records)

    @property
    def texts(self) -> list[str]:
        return [exemplar_text(r) for r in self.records]


def load_pool(path: str | os.PathLike[str]) -> Pool:
    """Read a prompt pool; a missing file, a malformed line (file:line) or an empty pool is a PillowError."""
    records = read_records(path)
    if not records:
        raise PillowError(f"{path}: the prompt pool is empty (one exemplar {{'prompt', 'response'}} per line)")
    pool = Pool(str(path), records, "")
    pool.sha256 = texts_sha256(pool.texts)
    return pool


def check_shots(shots: int, pool_size: int) -> None:
    if pool_size < 1:
        raise PillowError("the prompt pool is empty")
    if not isinstance(shots, int) or shots < 1:
        raise PillowError(f"shots must be a positive integer, got {shots!r}")
    if shots > pool_size:
        raise PillowError(
            f"shots={shots} exceeds the prompt pool's {pool_size} exemplar(s); an exemplar is never repeated"
        )


def banned_mask(queries: Sequence[Record], pool: Pool, shots: int) -> torch.Tensor | None:
    """(N, P) True where a pool exemplar has the query's own prompt (offering it would leak the answer);
    None when nothing is banned. Every query must keep at least `shots` exemplars."""
    check_shots(shots, len(pool))
    where: dict[str, list[int]] = {}
    for j, r in enumerate(pool.records):
        where.setdefault(r["prompt"], []).append(j)
    mask = torch.zeros(len(queries), len(pool), dtype=torch.bool)  # (N, P)
    for i, q in enumerate(queries):
        mask[i, where.get(q["prompt"], [])] = True
    if not mask.any():
        return None
    left = len(pool) - mask.sum(1)  # (N,) exemplars each query may still use
    i = int(left.argmin())
    if int(left[i]) < shots:
        raise PillowError(
            f"shots={shots}: query {i} ({q_id(queries[i])}) has only {int(left[i])} pool exemplar(s) "
            "besides its own prompt"
        )
    return mask


def q_id(record: Record) -> str:
    return str(record.get("id", repr(record["prompt"][:40])))


# ---- embeddings ---------------------------------------------------------------------------------------
@torch.no_grad()
def embed_texts(model: Any, texts: Sequence[str], batch_size: int = 16) -> torch.Tensor:
    """(N, dim) float32 on CPU: each text's final hidden states (after the last norm), averaged over its tokens.

    Base model only (no adapter). Right padding is safe: attention is causal, so a real token never sees padding;
    padded positions are left out of the mean. Texts longer than the context keep their first max_seq_len tokens."""
    tok = model.tokenizer
    if tok is None:
        raise PillowError("the model has no tokenizer: PILLOW embeds text")
    ids = [tok.encode(t)[: model.args.max_seq_len] for t in texts]
    for t, i in zip(texts, ids):
        if not i:
            raise PillowError(f"text {t[:40]!r} encodes to no tokens")
    out = torch.empty(len(texts), model.args.dim, dtype=torch.float32)  # (N, d)
    order = sorted(range(len(ids)), key=lambda i: -len(ids[i]))  # similar lengths together: little padding
    device = model.tok_embeddings.weight.device
    for s in range(0, len(order), batch_size):
        chunk = order[s : s + batch_size]
        T = len(ids[chunk[0]])  # the longest in the chunk
        tokens = torch.zeros(len(chunk), T, dtype=torch.long)  # (B, T), right-padded
        mask = torch.zeros(len(chunk), T, 1)  # (B, T, 1): 1 on real tokens, broadcast over d
        for b, i in enumerate(chunk):
            tokens[b, : len(ids[i])] = torch.tensor(ids[i])
            mask[b, : len(ids[i])] = 1
        out[chunk] = hidden_mean(model, tokens.to(device), mask.to(device)).float().cpu()
    return out


def hidden_mean(model: Any, tokens: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Masked mean over positions of the final hidden states (B, T, d) → (B, d)."""
    h = model.hidden_states(tokens).float()  # (B, T, d)
    return (h * mask).sum(1) / mask.sum(1)  # (B, d) / (B, 1)


def default_cache_dir() -> Path:
    from weights.default import cache_root

    return cache_root() / "pillow"


def fingerprint_sha(model: Any) -> str:
    from model.peft.adapters import model_fingerprint

    return hashlib.sha256(json.dumps(model_fingerprint(model), sort_keys=True).encode()).hexdigest()


def cached_embeddings(
    model: Any,
    texts: Sequence[str],
    cache_dir: str | os.PathLike[str] | None = None,
    *,
    kind: str = "texts",
    batch_size: int = 16,
) -> torch.Tensor:
    """`embed_texts`, cached in CACHE_DIR/KIND-<texts sha>-<model fingerprint sha>.safetensors (written atomically;
    a torn or mismatched file is recomputed). cache_dir=None: $PARALLAMA_CACHE/pillow."""
    d = Path(cache_dir) if cache_dir is not None else default_cache_dir()
    path = d / f"{kind}-{texts_sha256(texts)[:16]}-{fingerprint_sha(model)[:16]}.safetensors"
    if path.is_file():
        try:
            emb = load_file(path)["embeddings"]
            if tuple(emb.shape) == (len(texts), model.args.dim):
                return emb
        except Exception:  # a torn or foreign file: recompute and replace it
            pass
    emb = embed_texts(model, texts, batch_size)
    meta = {"texts_sha256": texts_sha256(texts), "model_sha256": fingerprint_sha(model), "n": str(len(texts))}
    atomic_write(path, lambda tmp: save_file({"embeddings": emb.contiguous()}, tmp, metadata=meta))
    return emb
