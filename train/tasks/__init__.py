"""The miniature task suite (PARA.md §6): five seeded generators with their paper-style metrics.

    from train.tasks import TASKS
    paths = TASKS["squad"].generate("data/squad", seed=0)  # {"train": ..., "dev": ..., "test": ...}
    TASKS["squad"].metric(prediction, record)                # 0..1 per test example

| name  | like    | metric |
|-------|---------|--------|
| boolq | BoolQ   | accuracy (the first yes/no word) |
| copa  | COPA    | accuracy: the alternative the answer names (its text, or its number) |
| squad | SQuAD   | mean of token F1 and exact match, SQuAD normalisation |
| q2sql | Q2SQL   | execution accuracy on the task's generated sqlite database |
| hsm   | HSM10K  | the last number of the prediction equals the gold |

`EXTRA_TASKS` holds tasks outside the suite: `formats` (PILLOW's test bed: sub-tasks whose output format only a
same-kind exemplar shows; exact match of the first line). `task(name)` finds either.
"""

from __future__ import annotations

from train.tasks.base import Task, accuracy, read_split
from train.tasks.boolq import BoolQ
from train.tasks.copa import Copa, choice_accuracy
from train.tasks.formats import Formats
from train.tasks.hsm import HSM, numeric_accuracy
from train.tasks.q2sql import Q2SQL, execution_accuracy
from train.tasks.squad import Squad, f1_em

# the paper's Table 2 order
TASKS: dict[str, Task] = {t.name: t for t in (HSM(), Q2SQL(), Squad(), BoolQ(), Copa())}
EXTRA_TASKS: dict[str, Task] = {t.name: t for t in (Formats(),)}


def task(name: str) -> Task:
    """A suite task or an extra one by name; KeyError names the choices."""
    found = TASKS.get(name) or EXTRA_TASKS.get(name)
    if found is None:
        raise KeyError(f"unknown task {name!r} (choose from {', '.join([*TASKS, *EXTRA_TASKS])})")
    return found


__all__ = [
    "EXTRA_TASKS",
    "TASKS",
    "Task",
    "accuracy",
    "choice_accuracy",
    "execution_accuracy",
    "f1_em",
    "numeric_accuracy",
    "read_split",
]
__all__ += ["task"]
