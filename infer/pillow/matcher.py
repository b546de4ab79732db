"""PILLOW's matching network, the two baselines it is compared with, and its files.

Matching network: a prompt encoder (MLP) maps each pool embedding to a key (P, k); a state encoder (MLP) maps
(query embedding ⊕ mean embedding of the exemplars chosen so far) to a query vector (k); scores are the dot
products, a softmax over the not-yet-chosen exemplars gives the policy; m choices are made one after another
(sampled in training, argmax at inference). Inputs are standardised by the pool's per-dimension mean and std
(buffers saved with the weights): raw LLM hidden states carry a few huge outlier dimensions.

Files: a trained matcher is a directory, `matcher.safetensors` + `matcher.json` (dims, shots, pool hash, model
fingerprint), replaced atomically.
"""

from __future__ import annotations

import json
import math
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import torch.nn as nn
import torch.nn.functional as F
from safetensors.torch import load_file, save_file

from infer.pillow.pool import PillowError, check_shots
from model.checks import check_tensors
from weights.io import atomic_dir, read_json

WEIGHTS, CONFIG = "matcher.safetensors", "matcher.json"
FORMAT = "parallama-pillow-matcher"


# ---- the matching network -----------------------------------------------------------------------------
def mlp(n_in: int, hidden: int, n_out: int) -> nn.Sequential:
    return nn.Sequential(nn.Linear(n_in, hidden), nn.GELU(), nn.Linear(hidden, n_out))


@dataclass
class Rollout:
    choices: torch.Tensor  # (B, m) pool indices, in prompt order
    log_prob: torch.Tensor  # (B,) sum over the m choices of log π(choice | state)
    entropy: torch.Tensor  # (B,) sum over the m choices of the policy's entropy


class Matcher(nn.Module):
    """Prompt encoder (pool embedding → key) and state encoder (query ⊕ chosen-mean → query vector)."""

    def __init__(self, emb_dim: int, hidden: int = 256, k: int = 64) -> None:
        super().__init__()
        self.emb_dim, self.hidden, self.k = emb_dim, hidden, k
        self.prompt_encoder = mlp(emb_dim, hidden, k)
        self.state_encoder = mlp(2 * emb_dim, hidden, k)
        self.register_buffer("center", torch.zeros(emb_dim))
        self.register_buffer("scale", torch.ones(emb_dim))

    def fit_normalization(self, pool_emb: torch.Tensor) -> None:
        """Standardise inputs by the pool's per-dimension statistics (a dimension that does not vary keeps
        scale 1, so a one-exemplar pool or a constant dimension never divides by zero)."""
        with torch.no_grad():
            self.center.copy_(pool_emb.mean(0))
            std = pool_emb.std(0, unbiased=False) if len(pool_emb) > 1 else torch.zeros_like(self.scale)
            floor = 0.01 * float(std.mean())
            self.scale.copy_(torch.where(std > floor, std, torch.ones_like(std)) if floor > 0 else torch.ones_like(std))

    def normalize(self, emb: torch.Tensor) -> torch.Tensor:
        return (emb.float() - self.center) / self.scale

    def scores(self, query: torch.Tensor, chosen_mean: torch.Tensor, keys: torch.Tensor) -> torch.Tensor:
        """(B, P) dot products of the state vectors with the pool keys, over sqrt(k) (a near-uniform start)."""
        state = self.state_encoder(torch.cat([query, chosen_mean], -1))  # (B, 2d) → (B, k)
        return state @ keys.T / math.sqrt(self.k)  # (B, k) @ (k, P) → (B, P)

    def rollout(
        self,
        query_emb: torch.Tensor,
        pool_emb: torch.Tensor,
        shots: int,
        *,
        banned: torch.Tensor | None = None,
        greedy: bool = False,
        generator: torch.Generator | None = None,
        actions: torch.Tensor | None = None,
    ) -> Rollout:
        """m sequential choices per query (B, d) from the pool (P, d): sampled, argmax (`greedy`), or the given
        `actions` (B, m) scored. A chosen or banned exemplar gets probability 0, so nothing repeats."""
        B, P = query_emb.shape[0], pool_emb.shape[0]
        check_shots(shots, P)
        keys = self.prompt_encoder(self.normalize(pool_emb))  # (P, k)
        pool_n, query = self.normalize(pool_emb), self.normalize(query_emb)  # (P, d), (B, d)
        taken = torch.zeros(B, P, dtype=torch.bool) if banned is None else banned.clone()
        if int((~taken).sum(1).min()) < shots:
            raise PillowError(f"shots={shots}: a query has fewer than {shots} pool exemplars it may use")
        chosen_sum = torch.zeros_like(query)  # (B, d)
        log_prob, entropy, picks = query.new_zeros(B), query.new_zeros(B), []
        rows = torch.arange(B)
        for t in range(shots):
            logits = self.scores(query, chosen_sum / max(t, 1), keys).masked_fill(taken, float("-inf"))
            logp = logits.log_softmax(-1)  # (B, P), -inf where taken
            if actions is not None:
                a = actions[:, t].long()
                if bool(taken[rows, a].any()):
                    raise PillowError(f"actions repeat an exemplar or use a banned one at choice {t}")
            elif greedy:
                a = logits.argmax(-1)
            else:
                a = torch.multinomial(logp.detach().exp(), 1, generator=generator).squeeze(1)  # (B, 1) → (B,)
            log_prob = log_prob + logp[rows, a]
            # masked entries: p = 0 and log p = -inf; zero log p there first (0·-inf would be NaN, in the gradient too)
            entropy = entropy - (logp.exp() * logp.masked_fill(taken, 0.0)).sum(-1)
            taken = taken | F.one_hot(a, P).bool()  # not in place: autograd keeps the earlier mask
            chosen_sum = chosen_sum + pool_n[a]
            picks.append(a)
        return Rollout(torch.stack(picks, 1), log_prob, entropy)  # m × (B,) → (B, m)


def nearest_choices(
    query_emb: torch.Tensor, pool_emb: torch.Tensor, shots: int, banned: torch.Tensor | None = None
) -> torch.Tensor:
    """(B, m) the m pool exemplars most cosine-similar to each query, the most similar last (next to the query)."""
    check_shots(shots, pool_emb.shape[0])
    sim = F.normalize(query_emb.float(), dim=-1) @ F.normalize(pool_emb.float(), dim=-1).T  # (B, P)
    if banned is not None:
        sim = sim.masked_fill(banned, float("-inf"))
    return sim.topk(shots, dim=-1).indices.flip(-1)


def random_choices(
    n: int, pool_size: int, shots: int, banned: torch.Tensor | None = None, seed: int = 0
) -> torch.Tensor:
    """(n, m) uniformly random distinct exemplars per query (never a banned one), seeded."""
    check_shots(shots, pool_size)
    g = torch.Generator().manual_seed(seed)
    noise = torch.rand(n, pool_size, generator=g)  # (n, P)
    if banned is not None:
        noise = noise.masked_fill(banned, -1.0)
    return noise.topk(shots, dim=-1).indices


# ---- matcher files ------------------------------------------------------------------------------------
def save_matcher(matcher: Matcher, directory: str | os.PathLike[str], config: dict[str, Any]) -> Path:
    """OUT/matcher.safetensors (weights + normalisation buffers) and OUT/matcher.json, replaced atomically.
    `config` needs shots, pool_sha256, pool_size, base_model (fingerprint); dims are added here."""
    full = {"format": FORMAT, "version": 1, "emb_dim": matcher.emb_dim, "hidden": matcher.hidden, "k": matcher.k}
    full |= config
    tensors = {k: v.detach().contiguous().cpu() for k, v in matcher.state_dict().items()}

    def write(tmp: Path) -> None:
        save_file(tensors, tmp / WEIGHTS, metadata={"format": "pt"})
        (tmp / CONFIG).write_text(json.dumps(full, indent=2) + "\n")

    return atomic_dir(directory, write)


def load_matcher(directory: str | os.PathLike[str], model: Any = None) -> tuple[Matcher, dict[str, Any]]:
    """(matcher in eval mode, its config). DIR may be a training OUT (its best/ is used). With `model`, the
    matcher's base-model fingerprint must match (its inputs are that model's embeddings)."""
    d = Path(directory)
    if not (d / CONFIG).is_file() and (d / "best" / CONFIG).is_file():
        d = d / "best"
    where = d / CONFIG
    if not where.is_file():
        raise PillowError(f"{d}: not a matcher directory (no {CONFIG}; a training run writes OUT/best)")
    config = read_json(where, PillowError)
    if config.get("format") != FORMAT:
        raise PillowError(f"{where}: not a PILLOW matcher config (format {FORMAT!r} expected)")
    for key in ("emb_dim", "hidden", "k", "shots", "pool_sha256", "pool_size"):
        if key not in config:
            raise PillowError(f"{where}: field {key!r} is missing")
    if model is not None:
        from model.peft.adapters import SHAPE_FIELDS, fingerprint_diff

        diff = fingerprint_diff(config.get("base_model") or {}, model, (*SHAPE_FIELDS, "weights_sha256"))
        if diff:
            raise PillowError(
                f"{where}: matcher was trained on another base model (matcher vs this: {', '.join(diff)})"
            )
    matcher = Matcher(config["emb_dim"], config["hidden"], config["k"])
    path = d / WEIGHTS
    if not path.is_file():
        raise PillowError(f"{path}: not found")
    try:
        tensors = load_file(path)
    except Exception as e:  # safetensors raises its own error types for torn or foreign files
        raise PillowError(f"{path}: cannot read safetensors ({e})") from None
    check_tensors(tensors, matcher.state_dict(), str(path), PillowError)
    matcher.load_state_dict(tensors)
    return matcher.eval(), config
