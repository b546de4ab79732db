"""The task interface: a seeded item sampler, disjoint train/dev/test JSONL splits and a per-example metric.

Every line is `{"prompt", "response", "id", ...extras}`; the extras (gold answer, passage, database path)
travel with the record to the metric, `metric(prediction, record) -> float` (see train/evaluate.py).
Generation is deterministic: `random.Random(f"{task}:{seed}")` drives everything (string seeds hash
the same way in every process), items are drawn until there are enough distinct prompts, and the splits
are consecutive slices, so no prompt is in two splits.
"""

from __future__ import annotations

import json
import random
import re
import string
from abc import ABC, abstractmethod
from collections.abc import Callable
from pathlib import Path
from typing import Any

from train.evaluate import Metric
from weights.io import read_jsonl

Record = dict[str, Any]
Sampler = Callable[[random.Random], "Record | None"]  # None: this draw is unusable, draw again
SPLITS = ("train", "dev", "test")

_PUNCT = str.maketrans("", "", string.punctuation)


def normalize(text: str) -> str:
    """`text` lowercased, without punctuation, runs of whitespace as one space."""
    return " ".join(text.lower().translate(_PUNCT).split())


def first_word(text: str) -> str:
    """The first word of `text`, lowercased and without punctuation ('' when there is none)."""
    words = normalize(text).split()
    return words[0] if words else ""


def accuracy(prediction: str, record: Record) -> float:
    """1.0 when the prediction's first word (lowercased, punctuation stripped) is the gold label (`record["answer"]`,
    else the response). With `record["labels"]` the first word that is one of the labels counts, so a chatty
    "Answer: No, she does not." scores for "no"."""
    gold = first_word(str(record.get("answer", record["response"])))
    words = normalize(prediction).split()
    labels = {first_word(str(label)) for label in record.get("labels", ())}
    if labels:
        words = [w for w in words if w in labels]
    return float(bool(words) and words[0] == gold)


def numbers_in(text: str) -> list[float]:
    """The numbers written in `text` in order ("1,200" is 1200; "12." is 12)."""
    return [float(m.replace(",", "")) for m in re.findall(r"-?\d[\d,]*(?:\.\d+)?", text)]


class Task(ABC):
    """One task: subclasses set `name`, `description`, `metric` and implement `sampler`."""

    name: str = ""
    description: str = ""
    metric: Metric = staticmethod(accuracy)  # type: ignore[assignment]
    short_answer: bool = False  # answers of a word or two: the suite trains these at SHORT_ANSWER_LR
    budget_scale: int = 1  # passes over the data a task needs, relative to the others: the suite multiplies
    # --max-steps (else --epochs) by it for every method alike

    @abstractmethod
    def sampler(self, rng: random.Random, out_dir: Path) -> Sampler:
        """A function drawing one record from `rng`; may first build shared state (e.g. a database) in `out_dir`."""

    def generate(
        self, out_dir: str | Path, seed: int = 0, n_train: int = 1000, n_dev: int = 100, n_test: int = 100
    ) -> dict[str, Path]:
        """Write `train.jsonl`, `dev.jsonl`, `test.jsonl` (distinct prompts throughout) under `out_dir`;
        returns {split: path}."""
        sizes = {"train": n_train, "dev": n_dev, "test": n_test}
        if any(n < 1 for n in sizes.values()):
            raise ValueError(f"{self.name}: every split needs at least one example, got {sizes}")
        out = Path(out_dir)
        out.mkdir(parents=True, exist_ok=True)
        rng = random.Random(f"{self.name}:{seed}")
        sample = self.sampler(rng, out)
        need, budget = sum(sizes.values()), 50 * sum(sizes.values()) + 1000
        seen: set[str] = set()
        rows: list[Record] = []
        for _ in range(budget):
            if len(rows) == need:
                break
            rec = sample(rng)
            if rec is not None and rec["prompt"] not in seen:
                seen.add(rec["prompt"])
                rows.append(rec)
        if len(rows) < need:
            raise ValueError(f"{self.name}: only {len(rows)} distinct items after {budget} draws (asked for {need})")
        paths, start = {}, 0
        for split in SPLITS:
            part = rows[start : start + sizes[split]]
            start += sizes[split]
            paths[split] = out / f"{split}.jsonl"
            with paths[split].open("w") as f:
                for i, rec in enumerate(part):
                    f.write(json.dumps({**rec, "id": f"{self.name}-{split}-{i}"}) + "\n")
        return paths


def read_split(path: str | Path) -> list[Record]:
    """The records of a generated split, in order."""
    return [record for _, record in read_jsonl(path)[0]]
