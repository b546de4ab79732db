"""Losses and test evaluation: response-token cross-entropy, dev loss, and beam-search generation
through the engine scored by a pluggable per-example metric.

A metric is `metric(prediction: str, record: dict) -> float` (the record is the test line's JSON object,
extra fields included, so a task can carry e.g. its database or gold answer); the test score is the mean.
"""

from __future__ import annotations

import contextlib
import math
from collections.abc import Callable
from typing import Any

import torch
import torch.nn.functional as F

from train.data import IGNORE, Batch, Dataset, collate, sorted_batches
from train.ddp import World

Metric = Callable[[str, dict[str, Any]], float]


def exact_match(prediction: str, record: dict[str, Any]) -> float:
    """1.0 when the generated text equals the reference response (both stripped), else 0.0."""
    return float(prediction.strip() == record["response"].strip())


def autocast(device: torch.device) -> contextlib.AbstractContextManager:
    """bf16 autocast on CUDA; full precision elsewhere."""
    if device.type == "cuda":
        return torch.autocast("cuda", dtype=torch.bfloat16)
    return contextlib.nullcontext()


def batch_loss(model: Any, adapter: Any, batch: Batch) -> torch.Tensor:
    """Summed cross-entropy (fp32, 0-dim) over the batch's response tokens; prompt and padding are not scored,
    so their logits are never computed (the output projection is a fifth of a small model's FLOPs)."""
    h = model.hidden_states(batch.tokens, adapter=adapter, prompt_lens=batch.prompt_lens)  # (B, T, d)
    scored = batch.targets != IGNORE
    logits = model.logits(h[scored])  # (n_scored, V)
    return F.cross_entropy(logits, batch.targets[scored], reduction="sum")  # logits are fp32


@torch.no_grad()
def dev_loss(model: Any, adapter: Any, data: Dataset, batch_size: int, world: World) -> float:
    """Mean cross-entropy per response token over the whole set (each rank scores every size-th batch)."""
    was_training = adapter.training
    adapter.eval()
    sums = torch.zeros(2, dtype=torch.float64, device=world.device)
    batches = sorted_batches([len(e.ids) for e in data.examples], batch_size)
    for idx in batches[world.rank :: world.size]:
        batch = collate([data.examples[i] for i in idx]).to(world.device)
        with autocast(world.device):
            sums[0] += batch_loss(model, adapter, batch).double()
        sums[1] += batch.n_targets
    world.all_reduce_(sums)
    adapter.train(was_training)
    return float(sums[0] / sums[1])


def generate(
    model: Any, adapter: Any, data: Dataset, *, max_new_tokens: int, beams: int, batch_size: int, world: World
) -> list[str]:
    """Generated text for every example's prompt (beam search with `beams`), each rank doing every size-th
    example; all ranks get the full list. A prompt near the context limit gets fewer new tokens."""
    from infer.engine import Engine
    from infer.sampling import SamplingParams

    limit = model.args.max_seq_len
    mine = list(range(world.rank, len(data), world.size))
    prompts = [data.examples[i].ids[: data.examples[i].prompt_len] for i in mine]
    params = [SamplingParams(max_new_tokens=min(max_new_tokens, limit - len(p)), beams=beams) for p in prompts]
    texts: list[str] = []
    if prompts:
        block = 16
        rows = max(beams, batch_size * beams)
        longest = max(len(p) + s.max_new_tokens for p, s in zip(prompts, params))
        engine = Engine(model, num_blocks=rows * math.ceil(longest / block) + beams, block_size=block, max_batch=rows)
        engine.add_adapter("finetuned", adapter)
        outs = engine.generate(prompts, params, adapters=["finetuned"] * len(prompts))
        texts = [o.text for o in outs]
    result = [""] * len(data)
    for rank, part in enumerate(world.gather(texts)):
        for i, text in zip(range(rank, len(data), world.size), part):
            result[i] = text
    return result
