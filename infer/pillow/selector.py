"""PILLOW at inference: few-shot prompts, and `Pillow`, a trained matcher that picks their exemplars.

Exemplars are prepended to the query: chat, one user/assistant turn per exemplar; plain, "prompt\\nresponse\\n\\n"
each. `python -m infer.generate --prompt-pool pool.jsonl --matcher OUT/best --shots m --prompt ...`, or
`Pillow.load(matcher_dir, model, pool).generate(engine, queries, params)` from Python.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from typing import Any

import torch

from infer.pillow.matcher import Matcher, load_matcher
from infer.pillow.pool import (
    PillowError,
    Pool,
    Record,
    banned_mask,
    cached_embeddings,
    check_shots,
    embed_texts,
    load_pool,
)


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


class Pillow:
    """A trained matcher with its pool and the model whose embeddings it reads: picks exemplars greedily."""

    def __init__(
        self, matcher: Matcher, config: dict[str, Any], pool: Pool, pool_emb: torch.Tensor, model: Any, shots: int
    ) -> None:
        check_shots(shots, len(pool))
        self.matcher, self.config, self.pool = matcher, config, pool
        self.pool_emb, self.model, self.shots = pool_emb, model, shots

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
        emb = embed_texts(self.model, list(queries))  # (B, d)
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
