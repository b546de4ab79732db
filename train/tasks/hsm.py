"""HSM10K-like: two- or three-step arithmetic word problems with a final whole number (numeric accuracy).

The response is a short worked solution, one equation per step, ending "The answer is N." The metric
reads the last number of the prediction. Records carry the gold `answer` and the `expression` the problem
describes (its value is the answer), so tests can check the generator against Python's arithmetic.
"""

from __future__ import annotations

import random
from pathlib import Path

from train.tasks.base import Record, Sampler, Task, numbers_in
from train.tasks.words import FRUITS, NAMES


def numeric_accuracy(prediction: str, record: Record) -> float:
    """1.0 when the last number in the prediction equals `record["answer"]` (else the response's last number)."""
    found = numbers_in(prediction)
    if not found:
        return 0.0
    gold = record.get("answer")
    if gold is None:
        gold_numbers = numbers_in(record["response"])
        if not gold_numbers:
            return 0.0
        gold = gold_numbers[-1]
    return float(abs(found[-1] - float(gold)) < 1e-6)


def _steps(a: int, ops: list[tuple[str, int]]) -> tuple[list[str], str, int]:
    """Apply (op, operand) left to right: (equations, parenthesised expression, result)."""
    value, expr, lines = a, str(a), []
    for op, b in ops:
        new = {"+": value + b, "-": value - b, "*": value * b, "/": value // b}[op]
        lines.append(f"{value} {op} {b} = {new}.")
        expr = f"({expr} {op} {b})"
        value = new
    return lines, expr, value


def _problem(rng: random.Random) -> tuple[str, int, list[tuple[str, int]]] | None:
    """(problem text, first number, operations) of one random template, or None when the numbers misbehave."""
    n, m = rng.sample(NAMES, 2)
    item = rng.choice(FRUITS)
    kind = rng.randrange(6)
    if kind == 0:
        a, b = rng.randint(5, 40), rng.randint(2, 30)
        c = rng.randint(1, a + b - 1)
        text = f"{n} has {a} {item}. {n} buys {b} more and gives {c} to {m}. How many {item} does {n} have now?"
        return text, a, [("+", b), ("-", c)]
    if kind == 1:
        a, b = rng.randint(2, 12), rng.randint(2, 9)
        c = rng.randint(1, a * b - 1)
        text = f"A box holds {a} {item}. {n} buys {b} boxes and gives away {c} {item}. How many {item} are left?"
        return text, a, [("*", b), ("-", c)]
    if kind == 2:
        b, k = rng.randint(2, 8), rng.randint(2, 12)
        c = rng.randint(1, 20)
        text = (
            f"{n} shares {b * k} {item} equally among {b} friends. Then each friend gets {c} more from {m}. "
            f"How many {item} does each friend have?"
        )
        return text, b * k, [("/", b), ("+", c)]
    if kind == 3:
        a, b, c = rng.randint(2, 9), rng.randint(2, 12), rng.randint(1, 40)
        text = (
            f"{n} buys {a} bags of {item} with {b} in each bag. {m} brings {c} {item}. "
            f"How many {item} do they have together?"
        )
        return text, a, [("*", b), ("+", c)]
    if kind == 4:
        a, b, c = rng.randint(10, 60), rng.randint(1, 9), rng.randint(2, 4)
        if a - b < 1:
            return None
        text = (
            f"{n} had {a} {item} and lost {b}. Then the number of {item} {n} had left was multiplied by {c}. "
            f"How many {item} does {n} have?"
        )
        return text, a, [("-", b), ("*", c)]
    a, b, c = rng.randint(3, 50), rng.randint(2, 30), rng.randint(2, 30)
    d = rng.randint(1, a + b + c - 1)
    text = f"{n} has {a} {item}, gets {b} from {m} and {c} more at school, then loses {d}. How many {item} are left?"
    return text, a, [("+", b), ("+", c), ("-", d)]


class HSM(Task):
    name = "hsm"
    description = "arithmetic word problems with a final number (numeric-answer accuracy)"
    metric = staticmethod(numeric_accuracy)

    def sampler(self, rng: random.Random, out_dir: Path) -> Sampler:
        def sample(rng: random.Random) -> Record | None:
            drawn = _problem(rng)
            if drawn is None:
                return None
            text, a, ops = drawn
            lines, expr, value = _steps(a, ops)
            response = " ".join(lines) + f" The answer is {value}."
            return {"prompt": f"Question: {text}\nAnswer:", "response": response, "answer": value, "expression": expr}

        return sample
