"""PILLOW training: the frozen LLM as reward, and REINFORCE over the matcher's choices.

Per step, a batch of training queries; m exemplars sampled per query and prepended (chat: one user/assistant turn
per exemplar; plain: "prompt\\nresponse\\n\\n" each); the frozen LLM (optionally with a PARA / LoRA / (IA)³
adapter) answers greedily through the engine, batched; reward = the task metric of the first non-empty line of the
answer against the reference. REINFORCE over the m choices with a moving-average baseline and an entropy bonus
(Adam). An exemplar whose prompt equals the query's is never offered (no answer leaks). The dev reward (greedy
choices) is measured at step 0 and every `eval_every` steps. Rewards are cached per (query, ordered choices): the
answer is greedy, so a repeated prompt costs nothing.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import torch
from tqdm import tqdm

from infer.engine import Engine
from infer.pillow import Matcher, PillowError, Pool, Record, Rollout, check_shots, few_shot_prompt, q_id
from infer.sampling import SamplingParams
from train.evaluate import Metric

ANSWER_SLACK = 8  # new tokens beyond the longest reference response (room for a preamble), as the suite's zero-shot

AnswerFn = Callable[[Sequence[Record], Sequence[Sequence[Record]]], list[str]]  # (queries, their exemplars) → answers
RewardFn = Callable[[Sequence[int], torch.Tensor], torch.Tensor]


# ---- the LLM as reward --------------------------------------------------------------------------------
class LLMAnswerer:
    """The frozen LLM (optionally with an adapter) answering few-shot prompts greedily through one engine."""

    def __init__(
        self, model: Any, *, chat: bool, max_new_tokens: int, adapter: Any = None, max_batch: int = 16
    ) -> None:
        self.model, self.chat, self.max_new_tokens = model, chat, max_new_tokens
        self.engine = Engine(model, max_batch=max_batch)
        self.adapter_name = None
        if adapter is not None:
            self.adapter_name = "pillow-adapter"
            self.engine.add_adapter(self.adapter_name, adapter)
        self.calls = 0  # prompts generated (the expensive part)

    def __call__(self, queries: Sequence[Record], exemplars: Sequence[Sequence[Record]]) -> list[str]:
        from train.zero_shot import first_line

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


def reinforce_loss(rollout: Rollout, rewards: torch.Tensor, baseline: float, entropy_coef: float) -> torch.Tensor:
    """-mean((r - b) · log π(choices)) - β · mean(entropy): its gradient is REINFORCE's with baseline b."""
    advantage = (rewards.float() - baseline).detach()  # (B,)
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
        r = reward(idx, roll.choices).float()  # (B,)
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
