"""BoolQ-like: a yes/no question about a short passage on `people` people (accuracy).

Each person gets three of a city, a job, a pet and an instrument; the question asks about one person and one
fact. Half the answers are "no"; with two or more people most of those name a value another person in the
passage has, so the model must bind facts to the right person rather than spot a word. One person (the
default): with two or three, no method learned the task in 64 steps of batch 8 at lr 1e-3 or 1e-2 (the dev
loss stayed at the yes/no prior), with one both PARA and LoRA reach 40/40 at lr 1e-3
(bench/results/suite_cpu/README.md).
"""

from __future__ import annotations

import random
from pathlib import Path

from train.tasks.base import Record, Sampler, Task, accuracy
from train.tasks.words import ANIMALS, CITIES, INSTRUMENTS, JOBS, NAMES

# (attribute, value list, sentence fragment, question)
FACTS = (
    ("city", CITIES, "lives in {}", "Does {} live in {}?"),
    ("job", JOBS, "works as a {}", "Does {} work as a {}?"),
    ("pet", ANIMALS, "owns a {}", "Does {} own a {}?"),
    ("instrument", INSTRUMENTS, "plays the {}", "Does {} play the {}?"),
)


def _person_sentence(name: str, facts: dict[str, str], rng: random.Random) -> str:
    parts = [frag.format(facts[attr]) for attr, _, frag, _ in FACTS if attr in facts]
    rng.shuffle(parts)
    return f"{name} {', '.join(parts[:-1])} and {parts[-1]}."


class BoolQ(Task):
    name = "boolq"
    description = "yes/no question about a short passage (accuracy)"
    metric = staticmethod(accuracy)
    short_answer = True

    def __init__(self, people: int = 1) -> None:
        if not 1 <= people <= 4:
            raise ValueError(f"boolq: people must be 1..4, got {people}")
        self.people = people

    def sampler(self, rng: random.Random, out_dir: Path) -> Sampler:
        def sample(rng: random.Random) -> Record:
            names = rng.sample(NAMES, self.people)
            kinds = rng.sample(FACTS, 3)  # the passage mentions three of the four attributes
            people = {n: {attr: rng.choice(values) for attr, values, _, _ in kinds} for n in names}
            passage = " ".join(_person_sentence(n, people[n], rng) for n in names)
            who = rng.choice(names)
            attr, values, _, question = rng.choice(kinds)
            truth = people[who][attr]
            if rng.random() < 0.5:
                value, answer = truth, "yes"
            else:
                others = [people[n][attr] for n in names if people[n][attr] != truth]
                if others and rng.random() < 0.8:
                    value = rng.choice(others)  # a distractor from the passage
                else:
                    value = rng.choice([v for v in values if v != truth])
                answer = "no"
            prompt = f"{passage}\nQuestion: {question.format(who, value)} Answer yes or no."
            return {"prompt": prompt, "response": answer, "answer": answer, "labels": ["yes", "no"]}

        return sample
