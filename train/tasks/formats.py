"""Formats: a pool of sub-tasks whose output format only an exemplar of the same kind shows (exact match).

Made for PILLOW (issue 18): a prompt is two items of one kind, with no instruction ("cat, dog"), and each kind
has its own output format ("cat + dog", "RED/BLUE", "Anna and Ben", ...). Nothing in the prompt says which
format is wanted; the items' kind does, so a model answers right only from exemplars of that kind. Exemplar
choice then decides the score: random exemplars from a pool mixing the kinds mostly show another format. Each
record carries its `kind`, so an evaluation can also pick the oracle exemplars (same kind).
"""

from __future__ import annotations

import random
from pathlib import Path

from train.tasks.base import Record, Sampler, Task
from train.tasks.words import ANIMALS, CITIES, COLORS, INSTRUMENTS, JOBS, NAMES

# kind -> (the items it draws two of, the output for items a, b)
KINDS = {
    "names": (NAMES, "{a} and {b}"),
    "cities": (CITIES, "{a} -> {b}"),
    "colors": (COLORS, "{A}/{B}"),
    "animals": (ANIMALS, "{a} + {b}"),
    "jobs": (JOBS, "the {a}; the {b}"),
    "instruments": (INSTRUMENTS, "[{a}] [{b}]"),
}


def first_line_exact(prediction: str, record: Record) -> float:
    """1.0 when the prediction's first non-empty line, stripped, is the response exactly (case and punctuation
    count: they are the format)."""
    lines = [line.strip() for line in prediction.strip().splitlines() if line.strip()]
    return float(bool(lines) and lines[0] == record["response"])


class Formats(Task):
    name = "formats"
    description = "two items of one kind, in that kind's output format, shown only by exemplars (exact match)"
    metric = staticmethod(first_line_exact)

    def sampler(self, rng: random.Random, out_dir: Path) -> Sampler:
        kinds = sorted(KINDS)

        def sample(rng: random.Random) -> Record:
            kind = rng.choice(kinds)
            items, template = KINDS[kind]
            a, b = rng.sample(items, 2)
            return {
                "prompt": f"{a}, {b}",
                "response": template.format(a=a, b=b, A=a.upper(), B=b.upper()),
                "kind": kind,
            }

        return sample
