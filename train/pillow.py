"""PILLOW (PARA.md §5): an RL-trained matching network that picks m exemplars from a prompt pool.

    python -m train.pillow --model default [--adapter DIR] --pool pool.jsonl --train T.jsonl --dev D.jsonl \
        --shots 2 --out runs/pillow [--task boolq] [--steps 200 --batch-size 16 --seed 0]
    python -m train.pillow --evaluate --task boolq --pool pool.jsonl --matcher runs/pillow/best \
        --dev D.jsonl --test E.jsonl --shots 2 [--adapter DIR [--adapter-matcher DIR]] [--out bench/results]

Pool: a JSONL of exemplars {"prompt", "response"}. Every exemplar ("prompt\\nresponse") and every query prompt
is embedded by the backbone itself: the mean over positions of the final hidden states (after the last norm),
always the base model's (no adapter), so one cached pool embedding serves every adapter. Embeddings are cached
under `$PARALLAMA_CACHE/pillow/` in a safetensors file keyed by the model fingerprint and the texts' hash.

Matching network: a prompt encoder (MLP) maps each pool embedding to a key (P, k); a state encoder (MLP) maps
(query embedding ⊕ mean embedding of the exemplars chosen so far) to a query vector (k); scores are the dot
products, a softmax over the not-yet-chosen exemplars gives the policy; m choices are made one after another
(sampled in training, argmax at inference). Inputs are standardised by the pool's per-dimension mean and std
(buffers saved with the weights): raw LLM hidden states carry a few huge outlier dimensions.

Training: per step, a batch of training queries; m exemplars sampled per query and prepended (chat: one
user/assistant turn per exemplar; plain: "prompt\\nresponse\\n\\n" each); the frozen LLM (optionally with a PARA /
LoRA / (IA)³ adapter) answers greedily through the engine, batched; reward = the task metric of the first
non-empty line of the answer against the reference. REINFORCE over the m choices with a moving-average baseline
and an entropy bonus (Adam). An exemplar whose prompt equals the query's is never offered (no answer leaks).
The dev reward (greedy choices) is measured at step 0 and every --eval-every steps; the best matcher goes to
OUT/best atomically (`matcher.safetensors` + `matcher.json`: dims, shots, pool hash, model fingerprint).
Rewards are cached per (query, ordered choices): the answer is greedy, so a repeated prompt costs nothing.

Inference: `python -m infer.generate --prompt-pool pool.jsonl --matcher OUT/best --shots m --prompt ...`, or
`Pillow.load(matcher_dir, model, pool).generate(engine, queries, params)` from Python.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import math
import os
import sys
import tempfile
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import torch.nn as nn
import torch.nn.functional as F
from safetensors.torch import load_file, save_file
from tqdm import tqdm

from train.checkpoint import swap_in
from train.data import DataError, parse_line
from train.evaluate import Metric, exact_match

Record = dict[str, Any]
WEIGHTS, CONFIG = "matcher.safetensors", "matcher.json"
FORMAT = "parallama-pillow-matcher"
STRATEGIES = ("0-shot", "random", "nearest", "pillow")
ANSWER_SLACK = 8  # new tokens beyond the longest reference response (room for a preamble), as the suite's zero-shot


class PillowError(ValueError):
    """A bad pool, matcher file or setting: the one-line message names the file, field or argument."""


# ---- pool and query files -----------------------------------------------------------------------------
def read_records(path: str | os.PathLike[str]) -> list[Record]:
    """The {"prompt", "response", ...} records of a JSONL file; a bad line is an error naming file:line."""
    p = Path(path)
    if not p.exists():
        raise PillowError(f"{p}: no such file")
    if not p.is_file():
        raise PillowError(f"{p}: not a file")
    records = []
    with p.open("rb") as f:
        for n, raw in enumerate(f, start=1):
            try:
                rec = parse_line(raw)
            except DataError as e:
                raise PillowError(f"{p}:{n}: {e}") from None
            if rec is not None:
                records.append(rec)
    return records


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
    mask = torch.zeros(len(queries), len(pool), dtype=torch.bool)
    for i, q in enumerate(queries):
        mask[i, where.get(q["prompt"], [])] = True
    if not mask.any():
        return None
    left = len(pool) - mask.sum(1)
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
    out = torch.empty(len(texts), model.args.dim, dtype=torch.float32)
    order = sorted(range(len(ids)), key=lambda i: -len(ids[i]))  # similar lengths together: little padding
    device = model.tok_embeddings.weight.device
    for s in range(0, len(order), batch_size):
        chunk = order[s : s + batch_size]
        T = len(ids[chunk[0]])
        tokens = torch.zeros(len(chunk), T, dtype=torch.long)
        mask = torch.zeros(len(chunk), T, 1)
        for b, i in enumerate(chunk):
            tokens[b, : len(ids[i])] = torch.tensor(ids[i])
            mask[b, : len(ids[i])] = 1
        out[chunk] = hidden_mean(model, tokens.to(device), mask.to(device)).float().cpu()
    return out


def hidden_mean(model: Any, tokens: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Masked mean over positions of the final hidden states (B, T, d) → (B, d)."""
    h = model.hidden_states(tokens).float()
    return (h * mask).sum(1) / mask.sum(1)


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
    d.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=d, prefix=f".{path.name}.tmp-")
    os.close(fd)
    try:
        meta = {"texts_sha256": texts_sha256(texts), "model_sha256": fingerprint_sha(model), "n": str(len(texts))}
        save_file({"embeddings": emb.contiguous()}, tmp, metadata=meta)
        os.chmod(tmp, 0o644)  # mkstemp makes it private; a cache is not
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)
    return emb


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
        state = self.state_encoder(torch.cat([query, chosen_mean], -1))  # (B, k)
        return state @ keys.T / math.sqrt(self.k)

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
        pool_n, query = self.normalize(pool_emb), self.normalize(query_emb)
        taken = torch.zeros(B, P, dtype=torch.bool) if banned is None else banned.clone()
        if int((~taken).sum(1).min()) < shots:
            raise PillowError(f"shots={shots}: a query has fewer than {shots} pool exemplars it may use")
        chosen_sum = torch.zeros_like(query)
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
                a = torch.multinomial(logp.detach().exp(), 1, generator=generator).squeeze(1)
            log_prob = log_prob + logp[rows, a]
            # masked entries: p = 0 and log p = -inf; zero log p there first (0·-inf would be NaN, in the gradient too)
            entropy = entropy - (logp.exp() * logp.masked_fill(taken, 0.0)).sum(-1)
            taken = taken | F.one_hot(a, P).bool()  # not in place: autograd keeps the earlier mask
            chosen_sum = chosen_sum + pool_n[a]
            picks.append(a)
        return Rollout(torch.stack(picks, 1), log_prob, entropy)


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
    noise = torch.rand(n, pool_size, generator=g)
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

    return swap_in(Path(directory), write)


def load_matcher(directory: str | os.PathLike[str], model: Any = None) -> tuple[Matcher, dict[str, Any]]:
    """(matcher in eval mode, its config). DIR may be a training OUT (its best/ is used). With `model`, the
    matcher's base-model fingerprint must match (its inputs are that model's embeddings)."""
    d = Path(directory)
    if not (d / CONFIG).is_file() and (d / "best" / CONFIG).is_file():
        d = d / "best"
    where = d / CONFIG
    if not where.is_file():
        raise PillowError(f"{d}: not a matcher directory (no {CONFIG}; a training run writes OUT/best)")
    try:
        config = json.loads(where.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise PillowError(f"{where}: not valid JSON ({e})") from None
    if not isinstance(config, dict) or config.get("format") != FORMAT:
        raise PillowError(f"{where}: not a PILLOW matcher config (format {FORMAT!r} expected)")
    for key in ("emb_dim", "hidden", "k", "shots", "pool_sha256", "pool_size"):
        if key not in config:
            raise PillowError(f"{where}: field {key!r} is missing")
    if model is not None:
        from model.peft.adapters import SHAPE_FIELDS, model_fingerprint

        fp, mine = config.get("base_model") or {}, model_fingerprint(model)
        fields = [f for f in (*SHAPE_FIELDS, "weights_sha256") if f in fp and f in mine]
        diff = [f"{f} {fp[f]} vs {mine[f]}" for f in fields if fp[f] != mine[f]]
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
    expected = matcher.state_dict()
    for k, v in expected.items():
        if k not in tensors:
            raise PillowError(f"{path}: tensor {k} is missing")
        if tuple(tensors[k].shape) != tuple(v.shape):
            raise PillowError(
                f"{path}: tensor {k} has shape {tuple(tensors[k].shape)}, the config implies {tuple(v.shape)}"
            )
    extra = sorted(set(tensors) - set(expected))
    if extra:
        raise PillowError(f"{path}: unexpected tensor {extra[0]}")
    matcher.load_state_dict(tensors)
    return matcher.eval(), config


# ---- prompts and the LLM as reward --------------------------------------------------------------------
def few_shot_prompt(tokenizer: Any, exemplars: Sequence[Record], query: str, chat: bool) -> list[int]:
    """Token ids of the query with exemplars before it. chat: one user/assistant turn per exemplar, then the query's
    user turn (the template's assistant header last); plain: "prompt\\nresponse\\n\\n" per exemplar, then the query.
    With no exemplar this is exactly train.data's prompt (what a fine-tuned adapter and the suite's zero-shot see)."""
    if chat:
        messages = []
        for e in exemplars:
            messages += [{"role": "user", "content": e["prompt"]}, {"role": "assistant", "content": e["response"]}]
        return tokenizer.encode_chat(messages + [{"role": "user", "content": query}])
    return tokenizer.encode("".join(f"{e['prompt']}\n{e['response']}\n\n" for e in exemplars) + query)


AnswerFn = Callable[[Sequence[Record], Sequence[Sequence[Record]]], list[str]]  # (queries, their exemplars) → answers


class LLMAnswerer:
    """The frozen LLM (optionally with an adapter) answering few-shot prompts greedily through one engine."""

    def __init__(
        self, model: Any, *, chat: bool, max_new_tokens: int, adapter: Any = None, max_batch: int = 16
    ) -> None:
        from infer.engine import Engine

        self.model, self.chat, self.max_new_tokens = model, chat, max_new_tokens
        self.engine = Engine(model, max_batch=max_batch)
        self.adapter_name = None
        if adapter is not None:
            self.adapter_name = "pillow-adapter"
            self.engine.add_adapter(self.adapter_name, adapter)
        self.calls = 0  # prompts generated (the expensive part)

    def __call__(self, queries: Sequence[Record], exemplars: Sequence[Sequence[Record]]) -> list[str]:
        from infer.sampling import SamplingParams
        from train.suite import first_line

        tok, limit = self.model.tokenizer, self.model.args.max_seq_len
        prompts, params = [], []
        for q, ex in zip(queries, exemplars):
            ids = few_shot_prompt(tok, ex, q["prompt"], self.chat)
            if len(ids) >= limit:
                raise PillowError(
                    f"query {q_id(q)} with {len(ex)} exemplar(s) is {len(ids)} tokens, beyond the context ({limit})"
                )
            prompts.append(ids)
            params.append(SamplingParams(max_new_tokens=min(self.max_new_tokens, limit - len(ids))))
        if not prompts:
            return []
        self.calls += len(prompts)
        outs = self.engine.generate(prompts, params, adapters=[self.adapter_name] * len(prompts))
        return [first_line(o.text) for o in outs]


class Rewarder:
    """reward(query indices, choices (B, m)) → (B,) the metric of the answer given those exemplars, cached per
    (query, ordered choices) since the answer is deterministic."""

    def __init__(self, queries: Sequence[Record], pool: Pool, answer: AnswerFn, metric: Metric) -> None:
        self.queries, self.pool, self.answer, self.metric = list(queries), pool, answer, metric
        self.cache: dict[tuple[int, tuple[int, ...]], float] = {}

    def __call__(self, idx: Sequence[int], choices: torch.Tensor) -> torch.Tensor:
        keys = [(int(i), tuple(int(c) for c in row)) for i, row in zip(idx, choices.tolist())]
        todo = list(dict.fromkeys(k for k in keys if k not in self.cache))
        if todo:
            qs = [self.queries[i] for i, _ in todo]
            answers = self.answer(qs, [[self.pool.records[c] for c in ch] for _, ch in todo])
            for k, q, a in zip(todo, qs, answers):
                self.cache[k] = float(self.metric(a, q))
        return torch.tensor([self.cache[k] for k in keys])


# ---- training -----------------------------------------------------------------------------------------
@dataclass
class RLConfig:
    shots: int = 2
    steps: int = 200
    batch_size: int = 16
    lr: float = 2e-3
    entropy_coef: float = 0.02  # bonus on the summed policy entropy: keeps exploring while rewards are flat
    baseline_momentum: float = 0.9  # moving-average baseline: b ← μ b + (1 - μ) mean(batch reward)
    eval_every: int = 20
    seed: int = 0

    def check(self) -> None:
        for name in ("shots", "steps", "batch_size", "eval_every"):
            if not getattr(self, name) >= 1:
                raise PillowError(f"--{name.replace('_', '-')} must be >= 1, got {getattr(self, name)}")
        if not self.lr > 0:
            raise PillowError(f"--lr must be positive, got {self.lr}")
        if self.entropy_coef < 0:
            raise PillowError(f"--entropy-coef must be >= 0, got {self.entropy_coef}")
        if not 0 <= self.baseline_momentum < 1:
            raise PillowError(f"--baseline-momentum must lie in [0, 1), got {self.baseline_momentum}")


RewardFn = Callable[[Sequence[int], torch.Tensor], torch.Tensor]


def reinforce_loss(rollout: Rollout, rewards: torch.Tensor, baseline: float, entropy_coef: float) -> torch.Tensor:
    """-mean((r - b) · log π(choices)) - β · mean(entropy): its gradient is REINFORCE's with baseline b."""
    advantage = (rewards.float() - baseline).detach()
    return -(advantage * rollout.log_prob).mean() - entropy_coef * rollout.entropy.mean()


@torch.no_grad()
def greedy_reward(
    matcher: Matcher,
    pool_emb: torch.Tensor,
    query_emb: torch.Tensor,
    reward: RewardFn,
    shots: int,
    banned: torch.Tensor | None = None,
) -> float:
    """Mean reward of argmax choices over every query (the dev score)."""
    choices = matcher.rollout(query_emb, pool_emb, shots, banned=banned, greedy=True).choices
    return float(reward(list(range(len(query_emb))), choices).mean())


def train_matcher(
    matcher: Matcher,
    pool_emb: torch.Tensor,
    train_emb: torch.Tensor,
    reward: RewardFn,
    config: RLConfig,
    *,
    train_banned: torch.Tensor | None = None,
    dev_emb: torch.Tensor | None = None,
    dev_reward: RewardFn | None = None,
    dev_banned: torch.Tensor | None = None,
    on_eval: Callable[[int, float], None] | None = None,
    on_step: Callable[[int, float, float], None] | None = None,
    progress: bool = False,
) -> dict[str, Any]:
    """REINFORCE the matcher in place; returns {"rewards": per-step batch means, "dev": [(step, reward)], "best_step",
    "best_dev"}. Deterministic for a seed: one generator drives the query order and the sampled choices."""
    config.check()
    check_shots(config.shots, len(pool_emb))
    g = torch.Generator().manual_seed(config.seed)
    opt = torch.optim.Adam(matcher.parameters(), lr=config.lr)
    history: dict[str, Any] = {"rewards": [], "dev": [], "best_step": None, "best_dev": -math.inf}
    use_dev = dev_emb is not None and dev_reward is not None

    def evaluate(step: int) -> None:
        matcher.eval()
        score = greedy_reward(matcher, pool_emb, dev_emb, dev_reward, config.shots, dev_banned)
        history["dev"].append((step, score))
        if score > history["best_dev"]:
            history["best_step"], history["best_dev"] = step, score
        if on_eval is not None:
            on_eval(step, score)

    if use_dev:
        evaluate(0)  # the untrained matcher competes for best, as the identity adapter does in finetune
    baseline: float | None = None
    order: list[int] = []
    bar = tqdm(total=config.steps, desc="pillow", disable=not progress)
    for step in range(1, config.steps + 1):
        while len(order) < min(config.batch_size, len(train_emb)):  # epochs of seeded shuffles
            order += torch.randperm(len(train_emb), generator=g).tolist()
        idx, order = order[: config.batch_size], order[config.batch_size :]
        matcher.train()
        banned = train_banned[idx] if train_banned is not None else None
        roll = matcher.rollout(train_emb[idx], pool_emb, config.shots, banned=banned, generator=g)
        r = reward(idx, roll.choices).float()
        mean = float(r.mean())
        loss = reinforce_loss(roll, r, mean if baseline is None else baseline, config.entropy_coef)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        m = config.baseline_momentum
        baseline = mean if baseline is None else m * baseline + (1 - m) * mean
        history["rewards"].append(mean)
        bar.update(1)
        bar.set_postfix(reward=f"{mean:.3f}", baseline=f"{baseline:.3f}")
        if on_step is not None:
            on_step(step, mean, baseline)
        if use_dev and (step % config.eval_every == 0 or step == config.steps):
            evaluate(step)
    bar.close()
    return history


# ---- inference ----------------------------------------------------------------------------------------
class Pillow:
    """A trained matcher with its pool and the model whose embeddings it reads: picks exemplars greedily."""

    def __init__(
        self, matcher: Matcher, config: dict[str, Any], pool: Pool, pool_emb: torch.Tensor, model: Any, shots: int
    ) -> None:
        check_shots(shots, len(pool))
        self.matcher, self.config, self.pool, self.pool_emb, self.model, self.shots = (
            matcher, config, pool, pool_emb, model, shots
        )  # fmt: skip

    @classmethod
    def load(
        cls,
        matcher_dir: str | os.PathLike[str],
        model: Any,
        pool: str | os.PathLike[str] | Pool,
        *,
        shots: int | None = None,
        cache_dir: str | os.PathLike[str] | None = None,
        check_pool: bool = True,
    ) -> Pillow:
        """shots=None: the number the matcher was trained for. A pool other than the training one is refused unless
        check_pool=False (the matcher scores any pool, but its input statistics come from the training pool)."""
        pool = pool if isinstance(pool, Pool) else load_pool(pool)
        matcher, config = load_matcher(matcher_dir, model)
        if check_pool and config["pool_sha256"] != pool.sha256:
            raise PillowError(
                f"{pool.path}: not the pool the matcher in {matcher_dir} was trained on (pool sha256 "
                f"{pool.sha256[:12]} vs {config['pool_sha256'][:12]}); pass check_pool=False to use it anyway"
            )
        if matcher.emb_dim != model.args.dim:
            raise PillowError(
                f"{matcher_dir}: matcher reads {matcher.emb_dim}-dim embeddings, the model's are {model.args.dim}"
            )
        shots = int(config["shots"]) if shots is None else shots
        pool_emb = cached_embeddings(model, pool.texts, cache_dir, kind="pool")
        return cls(matcher, config, pool, pool_emb, model, shots)

    @torch.no_grad()
    def select(self, queries: Sequence[str]) -> list[list[int]]:
        """Pool indices (in prompt order) for each query, argmax at every choice; never the query's own prompt."""
        if not queries:
            return []
        recs = [{"prompt": q} for q in queries]
        banned = banned_mask(recs, self.pool, self.shots)
        emb = embed_texts(self.model, list(queries))
        return self.matcher.rollout(emb, self.pool_emb, self.shots, banned=banned, greedy=True).choices.tolist()

    def prompts(self, queries: Sequence[str], chat: bool = False) -> tuple[list[list[int]], list[list[int]]]:
        """(token ids of each few-shot prompt, the chosen pool indices)."""
        chosen = self.select(queries)
        tok = self.model.tokenizer
        ids = [few_shot_prompt(tok, [self.pool.records[j] for j in c], q, chat) for q, c in zip(queries, chosen)]
        return ids, chosen

    def generate(
        self, engine: Any, queries: Sequence[str], params: Any = None, adapter: str | None = None, chat: bool = False
    ) -> list[Any]:
        """engine.generate on the few-shot prompts; each output gains `.exemplars` (the chosen pool indices)."""
        ids, chosen = self.prompts(queries, chat)
        outs = engine.generate(ids, params, adapters=[adapter] * len(ids))
        for o, c in zip(outs, chosen):
            o.exemplars = c
        return outs


# ---- evaluation ---------------------------------------------------------------------------------------
def evaluate_selection(
    model: Any,
    pool: Pool,
    splits: dict[str, list[Record]],
    *,
    shots: int,
    metric: Metric,
    chat: bool,
    matchers: dict[str, Matcher],
    adapters: dict[str, Any],
    seed: int = 0,
    max_new_tokens: int | None = None,
    batch_size: int = 16,
    cache_dir: str | os.PathLike[str] | None = None,
    progress: bool = False,
) -> dict[str, Any]:
    """{"scores": {system: {split: {strategy: mean metric}}}, ...} for 0-shot, random, nearest (cosine) and PILLOW
    m-shot. `adapters`: {system label: adapter or None (base)}; `matchers`: {system label: matcher}."""
    check_shots(shots, len(pool))
    pool_emb = cached_embeddings(model, pool.texts, cache_dir, kind="pool")
    if max_new_tokens is None:
        longest = max(len(model.tokenizer.encode(r["response"], bos=False)) for rs in splits.values() for r in rs)
        max_new_tokens = longest + ANSWER_SLACK
    scores: dict[str, dict[str, dict[str, float]]] = {}
    n_calls = 0
    for system, adapter in adapters.items():
        answerer = LLMAnswerer(model, chat=chat, max_new_tokens=max_new_tokens, adapter=adapter, max_batch=batch_size)
        scores[system] = {}
        for split, records in splits.items():
            emb = cached_embeddings(model, [r["prompt"] for r in records], cache_dir, kind="queries")
            banned = banned_mask(records, pool, shots)
            empty = torch.zeros(len(records), 0, dtype=torch.long)
            with torch.no_grad():
                choices = {
                    "0-shot": empty,
                    "random": random_choices(len(records), len(pool), shots, banned, seed),
                    "nearest": nearest_choices(emb, pool_emb, shots, banned),
                    "pillow": matchers[system].rollout(emb, pool_emb, shots, banned=banned, greedy=True).choices,
                }
            scores[system][split] = {}
            for strategy in STRATEGIES:
                if progress:
                    print(f"{system} {split} {strategy}: {len(records)} queries", file=sys.stderr)
                reward = Rewarder(records, pool, answerer, metric)
                scores[system][split][strategy] = float(reward(list(range(len(records))), choices[strategy]).mean())
        n_calls += answerer.calls
    beats = {
        f"{system}/{split}": {other: s["pillow"] > s[other] for other in ("0-shot", "random", "nearest")}
        for system, by_split in scores.items()
        for split, s in by_split.items()
    }
    return {"scores": scores, "pillow_beats": beats, "generations": n_calls, "shots": shots,
            "pool": pool.path, "pool_size": len(pool), "pool_sha256": pool.sha256,
            "n": {split: len(r) for split, r in splits.items()}}  # fmt: skip


def format_selection_table(result: dict[str, Any], metric_name: str = "metric") -> str:
    """Markdown: one row per selection strategy, one column per (system, split), scores ×100."""
    scores = result["scores"]
    cols = [(system, split) for system, by_split in scores.items() for split in by_split]
    head = "| selection | " + " | ".join(f"{system} {split}" for system, split in cols) + " |"
    lines = [head, "|" + "---|" * (len(cols) + 1)]
    for strategy in STRATEGIES:
        label = strategy if strategy == "0-shot" else f"{strategy} {result['shots']}-shot"
        lines.append(f"| {label} | " + " | ".join(f"{100 * scores[s][sp][strategy]:.1f}" for s, sp in cols) + " |")
    n = ", ".join(f"{split} {k}" for split, k in result["n"].items())
    return "\n".join(lines) + f"\n\n{metric_name} ×100; pool of {result['pool_size']}; queries: {n}.\n"


# ---- command line -------------------------------------------------------------------------------------
class _Parser(argparse.ArgumentParser):
    def error(self, message: str) -> None:  # one line, exit 2
        self.exit(2, f"error: {message}\n")


def build_parser() -> argparse.ArgumentParser:
    d = RLConfig()
    p = _Parser(prog="python -m train.pillow", description=__doc__.splitlines()[0])
    a = p.add_argument
    a("--model", default="default", help="'default' (SmolLM2-135M-Instruct), a .gguf file, a Meta or an HF directory")
    a("--adapter", help="adapter directory the frozen LLM answers with (PARA, LoRA, (IA)3); --evaluate: its rows")
    a("--pool", required=True, help='prompt pool JSONL: one exemplar {"prompt": ..., "response": ...} per line')
    a("--train", help="training queries JSONL (records with prompt, response and any fields the metric reads)")
    a("--dev", help="dev queries JSONL: the best matcher by greedy dev reward is kept")
    a("--test", help="--evaluate: test queries JSONL")
    a("--out", help="training: output directory; --evaluate: results directory (default bench/results)")
    a("--task", help="task whose metric is the reward (hsm, q2sql, squad, boolq, copa); default exact match")
    a("--shots", type=int, default=d.shots, help="m, the exemplars per query")
    a("--chat", action=argparse.BooleanOptionalAction, help="chat template (default: when the tokenizer has one)")
    a("--steps", type=int, default=d.steps)
    a("--batch-size", type=int, default=d.batch_size, help="queries per RL step (answered in one engine batch)")
    a("--lr", type=float, default=d.lr)
    a("--entropy-coef", type=float, default=d.entropy_coef)
    a("--baseline-momentum", type=float, default=d.baseline_momentum)
    a("--eval-every", type=int, default=d.eval_every)
    a("--hidden", type=int, default=256, help="matcher MLP width")
    a("--k", type=int, default=64, help="matcher key width")
    a("--max-new-tokens", type=int, help="answer budget (default: the longest reference response + 8)")
    a("--seed", type=int, default=d.seed)
    a("--cache-dir", help="embedding cache (default $PARALLAMA_CACHE/pillow)")
    a("--no-progress", dest="progress", action="store_false")
    ev = p.add_argument_group("evaluation")
    ev.add_argument(
        "--evaluate", action="store_true", help="0-shot / random / nearest / PILLOW table instead of training"
    )
    ev.add_argument("--matcher", help="--evaluate: matcher for the base-model rows (a training OUT or OUT/best)")
    ev.add_argument("--adapter-matcher", help="--evaluate: matcher for the adapter rows (default: --matcher)")
    return p


def _metric(task: str | None) -> Metric:
    if task is None:
        return exact_match
    from train.tasks import TASKS

    if task not in TASKS:
        raise PillowError(f"--task {task!r} is unknown (choose from {', '.join(TASKS)})")
    return TASKS[task].metric


def _read(flag: str, path: str | None) -> list[Record]:
    if path is None:
        raise PillowError(f"{flag} is required")
    try:
        records = read_records(path)
    except PillowError as e:
        raise PillowError(f"{flag} {e}") from None
    if not records:
        raise PillowError(f"{flag} {path}: no records")
    return records


def _load_model(a: argparse.Namespace) -> tuple[Any, Any, bool]:
    """(model, adapter or None, chat)."""
    from model import Llama
    from model.peft import load_adapter

    device = "cuda" if torch.cuda.is_available() else "cpu"
    model = Llama.from_pretrained(a.model, device=device)
    if model.tokenizer is None:
        raise PillowError(f"--model {a.model}: the model has no tokenizer")
    adapter = load_adapter(a.adapter, model) if a.adapter else None
    chat = a.chat if a.chat is not None else getattr(model.tokenizer, "chat_template", None) is not None
    return model, adapter, chat


def _max_new(a: argparse.Namespace, model: Any, records: list[Record]) -> int:
    if a.max_new_tokens is not None:
        return a.max_new_tokens
    return max(len(model.tokenizer.encode(r["response"], bos=False)) for r in records) + ANSWER_SLACK


def run_training(a: argparse.Namespace) -> dict[str, Any]:
    """The training CLI: files checked before the model loads, OUT/best by dev reward, metrics.jsonl, result.json."""
    if a.out is None:
        raise PillowError("--out is required")
    rl = RLConfig(a.shots, a.steps, a.batch_size, a.lr, a.entropy_coef, a.baseline_momentum, a.eval_every, a.seed)
    rl.check()
    metric = _metric(a.task)
    pool = _pool(a.pool, a.shots)
    train, dev = _read("--train", a.train), _read("--dev", a.dev)
    train_banned, dev_banned = banned_mask(train, pool, a.shots), banned_mask(dev, pool, a.shots)
    out = Path(a.out)
    if (out / "best" / CONFIG).exists():
        raise PillowError(f"--out {out} already holds a trained matcher (best/); choose another --out")
    model, adapter, chat = _load_model(a)
    t0 = time.perf_counter()
    pool_emb = cached_embeddings(model, pool.texts, a.cache_dir, kind="pool")
    train_emb = cached_embeddings(model, [r["prompt"] for r in train], a.cache_dir, kind="queries")
    dev_emb = cached_embeddings(model, [r["prompt"] for r in dev], a.cache_dir, kind="queries")
    embed_s = time.perf_counter() - t0
    answerer = LLMAnswerer(
        model, chat=chat, max_new_tokens=_max_new(a, model, train + dev), adapter=adapter, max_batch=a.batch_size
    )
    train_reward, dev_reward = Rewarder(train, pool, answerer, metric), Rewarder(dev, pool, answerer, metric)
    torch.manual_seed(a.seed)  # the matcher's init
    matcher = Matcher(model.args.dim, a.hidden, a.k)
    matcher.fit_normalization(pool_emb)
    from model.peft.adapters import model_fingerprint

    config = {"shots": a.shots, "chat": chat, "pool": str(pool.path), "pool_sha256": pool.sha256,
              "pool_size": len(pool), "base_model": model_fingerprint(model), "adapter": a.adapter,
              "metric": getattr(metric, "__name__", "metric"), "task": a.task, "seed": a.seed}  # fmt: skip
    out.mkdir(parents=True, exist_ok=True)
    log = (out / "metrics.jsonl").open("w")
    step_times: list[float] = []
    last = [time.perf_counter()]

    def on_step(step: int, reward: float, baseline: float) -> None:
        now = time.perf_counter()
        step_times.append(now - last[0])
        last[0] = now
        log.write(json.dumps({"event": "train", "step": step, "reward": reward, "baseline": baseline,
                              "seconds": step_times[-1], "generations": answerer.calls}) + "\n")  # fmt: skip
        log.flush()

    def on_eval(step: int, score: float) -> None:
        best = score > best_dev[0]
        if best:
            best_dev[0] = score
            save_matcher(matcher, out / "best", config | {"step": step, "dev_reward": score})
        log.write(json.dumps({"event": "eval", "step": step, "dev_reward": score, "best": best}) + "\n")
        log.flush()
        if a.progress:
            tqdm.write(f"step {step}: dev reward {score:.4f}{' (best)' if best else ''}", file=sys.stderr)
        last[0] = time.perf_counter()  # the dev pass is not an RL step's time

    best_dev = [-math.inf]
    t1 = time.perf_counter()
    try:
        history = train_matcher(
            matcher, pool_emb, train_emb, train_reward, rl, train_banned=train_banned, dev_emb=dev_emb,
            dev_reward=dev_reward, dev_banned=dev_banned, on_eval=on_eval, on_step=on_step, progress=a.progress,
        )  # fmt: skip
    finally:
        log.close()
    result = {
        "out": str(out), "best": str(out / "best"), "best_step": history["best_step"],
        "best_dev_reward": history["best_dev"], "initial_dev_reward": history["dev"][0][1],
        "final_train_reward": history["rewards"][-1], "steps": rl.steps, "shots": rl.shots,
        "generations": answerer.calls, "embed_seconds": embed_s, "train_seconds": time.perf_counter() - t1,
        "seconds_per_step": sum(step_times) / max(1, len(step_times)),
    }  # fmt: skip
    (out / "result.json").write_text(json.dumps(result, indent=2) + "\n")
    return result


def _pool(path: str, shots: int) -> Pool:
    try:
        pool = load_pool(path)
    except PillowError as e:
        raise PillowError(f"--pool {e}") from None
    try:
        check_shots(shots, len(pool))
    except PillowError as e:
        raise PillowError(f"--shots: {e}") from None
    return pool


def run_evaluation(a: argparse.Namespace) -> dict[str, Any]:
    """The --evaluate CLI: OUT/pillow_<task>.json and .md (OUT defaults to bench/results)."""
    if a.matcher is None:
        raise PillowError("--evaluate needs --matcher DIR")
    metric = _metric(a.task)
    pool = _pool(a.pool, a.shots)
    splits = {name: _read(f"--{name}", path) for name, path in (("dev", a.dev), ("test", a.test)) if path}
    if not splits:
        raise PillowError("--evaluate needs --test and/or --dev")
    for recs in splits.values():
        banned_mask(recs, pool, a.shots)
    model, adapter, chat = _load_model(a)
    matchers = {"base": load_matcher(a.matcher, model)}
    adapters: dict[str, Any] = {"base": None}
    if adapter is not None:
        label = adapter.method.upper() if adapter.method != "ia3" else "(IA)3"
        matchers[label] = load_matcher(a.adapter_matcher or a.matcher, model)
        adapters[label] = adapter
    for label, (_, config) in matchers.items():
        if config["pool_sha256"] != pool.sha256:
            raise PillowError(f"--pool {a.pool}: not the pool the {label} matcher was trained on")
    t0 = time.perf_counter()
    result = evaluate_selection(
        model, pool, splits, shots=a.shots, metric=metric, chat=chat,
        matchers={k: m for k, (m, _) in matchers.items()}, adapters=adapters, seed=a.seed,
        max_new_tokens=_max_new(a, model, [r for rs in splits.values() for r in rs]),
        batch_size=a.batch_size, cache_dir=a.cache_dir, progress=a.progress,
    )  # fmt: skip
    task = a.task or "exact_match"
    result |= {"task": a.task, "metric": getattr(metric, "__name__", "metric"), "chat": chat, "model": a.model,
               "adapter": a.adapter, "matchers": {k: c for k, (_, c) in matchers.items()},
               "seconds": time.perf_counter() - t0}  # fmt: skip
    result["table"] = format_selection_table(result, result["metric"])
    out = Path(a.out or "bench/results")
    out.mkdir(parents=True, exist_ok=True)
    (out / f"pillow_{task}.json").write_text(json.dumps(result, indent=2, default=str) + "\n")
    (out / f"pillow_{task}.md").write_text(result["table"])
    return result


def main(argv: list[str] | None = None) -> int:
    try:
        a = build_parser().parse_args(argv)
    except SystemExit as e:
        return int(e.code or 0)
    try:
        if a.evaluate:
            result = run_evaluation(a)
            print(result["table"])
        else:
            result = run_training(a)
            print(json.dumps(result))
    except (ValueError, OSError) as e:  # PillowError, DataError, AdapterError, CheckpointError are ValueErrors
        print(f"error: {e}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
