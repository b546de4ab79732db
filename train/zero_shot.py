"""The base model's score on a task without any adapter (the suite's zero-shot row): beam search through the
engine, up to the longest test response + `ZERO_SHOT_SLACK` new tokens (room for a preamble), the first
non-empty line of each output scored by the task's metric."""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

import torch

from train.data import load_dataset
from train.tasks import Task

ZERO_SHOT_SLACK = 8  # extra new tokens the base model gets over the longest test response


def first_line(text: str) -> str:
    """The first non-empty line of a generation ('' when there is none)."""
    return next((line.strip() for line in text.splitlines() if line.strip()), "")


@torch.no_grad()
def zero_shot(
    model: Any, task: Task, test_path: Path, *, chat: bool, beams: int, batch_size: int, out: Path | None = None
) -> float:
    """Mean test metric of the base model (no adapter, beam search); predictions go to OUT/predictions.jsonl."""
    from infer.engine import Engine
    from infer.sampling import SamplingParams

    limit = model.args.max_seq_len
    data = load_dataset(test_path, model.tokenizer, chat=chat, max_len=limit)
    max_new = max(e.n_targets for e in data.examples) + ZERO_SHOT_SLACK
    prompts = [e.ids[: e.prompt_len] for e in data.examples]
    params = [SamplingParams(max_new_tokens=max(1, min(max_new, limit - len(p))), beams=beams) for p in prompts]
    rows, block = max(beams, batch_size * beams), 16
    longest = max(len(p) + s.max_new_tokens for p, s in zip(prompts, params))
    engine = Engine(model, num_blocks=rows * math.ceil(longest / block) + beams, block_size=block, max_batch=rows)
    texts = [first_line(o.text) for o in engine.generate(prompts, params)]
    scores = [float(task.metric(t, e.record)) for t, e in zip(texts, data.examples)]
    if out is not None:
        out.mkdir(parents=True, exist_ok=True)
        with (out / "predictions.jsonl").open("w") as f:
            for t, s, e in zip(texts, scores, data.examples):
                f.write(
                    json.dumps(
                        {"prompt": e.record["prompt"], "response": e.record["response"], "prediction": t, "score": s}
                    )
                    + "\n"
                )
    return sum(scores) / len(scores)
