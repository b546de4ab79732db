"""Beam search bookkeeping, step for step as transformers' `_beam_search` does it.

Each step keeps the K = max(2, 1 + n_eos) · beams best continuations of all beams; those among
the first `beams` that end (eos or max length) enter the finished pool with score
sum_logprob / generated_len ** length_penalty; the best `beams` that do not end run on. The search
ends when the pool is full and (early_stopping=False) no running beam can beat its worst entry,
(True) as soon as the pool is full, or ("never") by the max-length bound.
"""

from __future__ import annotations

import torch


class BeamSearch:
    def __init__(
        self, beams: int, max_new_tokens: int, length_penalty: float, early_stopping: bool | str, eos: frozenset[int]
    ) -> None:
        self.beams = beams
        self.max_new_tokens = max_new_tokens
        self.length_penalty = length_penalty
        self.early_stopping = early_stopping
        self.eos = eos
        self.k = max(2, 1 + len(eos)) * beams
        self.finished: list[tuple[float, list[int]]] = []  # (normalised score, generated ids), best first
        self.improvable = True

    def step(
        self, generated: list[list[int]], scores: torch.Tensor, logprobs: torch.Tensor
    ) -> list[tuple[int, int, float]] | None:
        """generated: each running beam's new tokens so far; scores: (n,) their sums; logprobs: (n, V).

        Returns the next beams as (parent index, token, score), or None when the search is over.
        """
        vocab = logprobs.shape[-1]
        total = (logprobs.float() + scores[:, None]).flatten()
        top_scores, top_idx = torch.topk(total, min(self.k, total.numel()))
        gen_len = len(generated[0]) + 1  # all beams have the same length
        cands = []
        for score, idx in zip(top_scores.tolist(), top_idx.tolist()):
            parent, tok = divmod(idx, vocab)
            ends = tok in self.eos or gen_len >= self.max_new_tokens
            cands.append((parent, tok, score, ends))

        pool_full = len(self.finished) == self.beams
        if self.improvable and not (pool_full and self.early_stopping is True):
            new = [
                (score / gen_len**self.length_penalty, generated[parent] + [tok])
                for parent, tok, score, ends in cands[: self.beams]
                if ends
            ]
            # stable sort keeps earlier entries first on ties, as topk over [old, new] does
            self.finished = sorted(self.finished + new, key=lambda e: -e[0])[: self.beams]

        running = [(parent, tok, score) for parent, tok, score, ends in cands if not ends][: self.beams]
        if len(self.finished) == self.beams and running:
            never = self.early_stopping == "never" and self.length_penalty > 0
            best_len = self.max_new_tokens if never else gen_len
            best_possible = running[0][2] / best_len**self.length_penalty
            self.improvable = self.improvable and best_possible > self.finished[-1][0]
        done = (
            not self.improvable
            or (self.early_stopping is True and len(self.finished) == self.beams)
            or all(ends for *_, ends in cands)
        )
        return None if done else running

    def best(self) -> list[int]:
        return self.finished[0][1] if self.finished else []
