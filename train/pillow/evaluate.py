"""PILLOW evaluation: 0-shot, random, cosine-nearest and PILLOW m-shot selection (and, for records with a `kind`,
the oracle: exemplars of the query's own kind), scored by the task metric of the frozen LLM's answers, for the
base model and for adapters; a markdown table of the scores."""

from __future__ import annotations

import os
import sys
from typing import Any

import torch

from infer.pillow import (
    Matcher,
    Pool,
    Record,
    banned_mask,
    cached_embeddings,
    check_shots,
    nearest_choices,
    random_choices,
)
from train.evaluate import Metric
from train.pillow.rl import ANSWER_SLACK, LLMAnswerer, Rewarder

STRATEGIES = ("0-shot", "random", "nearest", "pillow")
ORACLE = "oracle"  # when every query and exemplar has a "kind": m exemplars of the query's own kind


def oracle_choices(records: list[Record], pool: Pool, shots: int, banned: torch.Tensor | None) -> torch.Tensor | None:
    """(N, m) for each query the first m allowed pool exemplars of its own `kind` (the upper bound a selector can
    reach on a task such as `formats`), or None when a record lacks a kind or a kind has fewer than m exemplars."""
    if not all("kind" in r for r in [*records, *pool.records]):
        return None
    rows = []
    for i, r in enumerate(records):
        allowed = [j for j in range(len(pool)) if banned is None or not banned[i, j]]
        same = [j for j in allowed if pool.records[j]["kind"] == r["kind"]]
        if len(same) < shots:
            return None
        rows.append(same[:shots])
    return torch.tensor(rows, dtype=torch.long).view(len(records), shots)


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
    pool_emb = cached_embeddings(model, pool.texts, cache_dir, kind="pool")  # (P, d)
    if max_new_tokens is None:
        longest = max(len(model.tokenizer.encode(r["response"], bos=False)) for rs in splits.values() for r in rs)
        max_new_tokens = longest + ANSWER_SLACK
    scores: dict[str, dict[str, dict[str, float]]] = {}
    n_calls = 0
    for system, adapter in adapters.items():
        answerer = LLMAnswerer(model, chat=chat, max_new_tokens=max_new_tokens, adapter=adapter, max_batch=batch_size)
        scores[system] = {}
        for split, records in splits.items():
            emb = cached_embeddings(model, [r["prompt"] for r in records], cache_dir, kind="queries")  # (N, d)
            banned = banned_mask(records, pool, shots)
            empty = torch.zeros(len(records), 0, dtype=torch.long)  # (N, 0): no exemplar
            with torch.no_grad():
                choices = {  # each (N, m) pool indices
                    "0-shot": empty,
                    "random": random_choices(len(records), len(pool), shots, banned, seed),
                    "nearest": nearest_choices(emb, pool_emb, shots, banned),
                    "pillow": matchers[system].rollout(emb, pool_emb, shots, banned=banned, greedy=True).choices,
                }
            oracle = oracle_choices(records, pool, shots, banned)
            if oracle is not None:
                choices[ORACLE] = oracle
            scores[system][split] = {}
            for strategy in choices:
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
    return {
        "scores": scores,
        "pillow_beats": beats,
        "generations": n_calls,
        "shots": shots,
        "pool": pool.path,
        "pool_size": len(pool),
        "pool_sha256": pool.sha256,
        "n": {split: len(r) for split, r in splits.items()},
    }


def format_selection_table(result: dict[str, Any], metric_name: str = "metric") -> str:
    """Markdown: one row per selection strategy, one column per (system, split), scores ×100."""
    scores = result["scores"]
    cols = [(system, split) for system, by_split in scores.items() for split in by_split]
    head = "| selection | " + " | ".join(f"{system} {split}" for system, split in cols) + " |"
    lines = [head, "|" + "---|" * (len(cols) + 1)]
    present = [t for t in (*STRATEGIES, ORACLE) if all(t in scores[s][sp] for s, sp in cols)]
    for strategy in present:
        label = strategy if strategy == "0-shot" else f"{strategy} {result['shots']}-shot"
        if strategy == ORACLE:
            label += " (same kind: the bound)"
        lines.append(f"| {label} | " + " | ".join(f"{100 * scores[s][sp][strategy]:.1f}" for s, sp in cols) + " |")
    n = ", ".join(f"{split} {k}" for split, k in result["n"].items())
    return "\n".join(lines) + f"\n\n{metric_name} ×100; pool of {result['pool_size']}; queries: {n}.\n"
