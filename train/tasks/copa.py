"""COPA-like: pick the more plausible cause or effect of a premise out of two alternatives (accuracy).

Items combine a fixed list of cause → effect pairs with names: the premise is one side of a pair, the right
alternative its other side, the wrong one the same side of another pair; the order is random. The answer
is the right alternative's text: with "1"/"2" as the answer no method learned the task in 64 steps (dev loss
stayed at the prior), while answering with the text, LoRA reached 27/40 (bench/results/suite_cpu/README.md).
`choice_accuracy` also accepts a bare option number, so the zero-shot row is not penalised for the format.

Test items reuse the training pairs with other names and other wrong alternatives, so the task is learning 48
cause-effect links, a few tokens of each response: `budget_scale` 3. At the suite's 64 steps of batch 8 no method
beat zero-shot (bench/results/suite_cpu, session 11); PARA on seed 1 went from 60% to 90% rank-classification
accuracy (87.5% by beam search) between 64 and 192 steps, LoRA to 80%.
"""

from __future__ import annotations

import random
from pathlib import Path

from train.tasks.base import Record, Sampler, Task, first_word, normalize
from train.tasks.words import NAMES

# (cause, effect); {n} is a person, {m} a second person
PAIRS = (
    ("{n} ran a marathon", "{n} felt very tired"),
    ("{n} skipped breakfast", "{n} was hungry at noon"),
    ("{n} dropped the glass", "the glass broke"),
    ("{n} forgot the umbrella", "{n} got wet in the rain"),
    ("{n} studied every night", "{n} passed the exam"),
    ("{n} left the milk out", "the milk turned sour"),
    ("{n} told a funny joke", "{m} laughed"),
    ("{n} planted seeds", "flowers grew in the garden"),
    ("{n} turned off the lights", "the room became dark"),
    ("{n} ate too much cake", "{n} felt sick"),
    ("{n} lost the house key", "{n} could not open the door"),
    ("{n} watered the plants", "the plants stayed green"),
    ("{n} missed the bus", "{n} was late for work"),
    ("{n} won the lottery", "{n} bought a new car"),
    ("{n} stayed up all night", "{n} was sleepy in the morning"),
    ("{n} heated the water", "the water boiled"),
    ("{n} broke a leg", "{n} walked with crutches"),
    ("{n} opened the window", "cold air came in"),
    ("{n} practiced the piano", "{n} played well at the concert"),
    ("{n} shouted at {m}", "{m} felt hurt"),
    ("{n} sent a letter", "{m} received mail"),
    ("{n} forgot to charge the phone", "the phone died"),
    ("{n} added salt to the soup", "the soup tasted salty"),
    ("{n} painted the fence", "the fence looked new"),
    ("{n} touched the hot stove", "{n} burned a finger"),
    ("{n} saved money for years", "{n} bought a house"),
    ("{n} caught a cold", "{n} stayed home from school"),
    ("{n} cleaned the kitchen", "the kitchen was spotless"),
    ("{n} fed the dog", "the dog wagged its tail"),
    ("{n} wore a heavy coat", "{n} felt warm outside"),
    ("{n} lit a candle", "the room filled with light"),
    ("{n} spilled coffee on the shirt", "the shirt was stained"),
    ("{n} helped {m} move", "{m} thanked {n}"),
    ("{n} drove too fast", "the police stopped {n}"),
    ("{n} fixed the roof", "the rain stayed out"),
    ("{n} lost the match", "{n} felt sad"),
    ("{n} found a wallet", "{n} took it to the police"),
    ("{n} moved to a new city", "{n} made new friends"),
    ("{n} stepped on a nail", "{n} went to the doctor"),
    ("{n} baked fresh bread", "the house smelled good"),
    ("{n} froze the juice", "the juice turned to ice"),
    ("{n} pressed the doorbell", "{m} opened the door"),
    ("{n} cut the grass", "the lawn looked short"),
    ("{n} forgot {m}'s birthday", "{m} was upset"),
    ("{n} worked extra hours", "{n} earned more money"),
    ("{n} left the door open", "the cat ran outside"),
    ("{n} sang loudly", "the baby woke up"),
    ("{n} read the map", "{n} found the way"),
)


def _capitalize(text: str) -> str:
    return text[0].upper() + text[1:]


def choice_accuracy(prediction: str, record: Record) -> float:
    """1.0 when the prediction picks the gold alternative (`record["answer"]`) of `record["choices"]`: it
    contains exactly one alternative's text (normalised: lowercase, no punctuation) and that is the gold one,
    or it contains none and starts with the gold's option number."""
    choices = [normalize(c) for c in record["choices"]]
    gold = normalize(record["answer"])
    said = normalize(prediction)
    named = [c for c in choices if c and c in said]
    if named:
        return float(len(named) == 1 and named[0] == gold)
    number = first_word(prediction)
    return float(number.isdigit() and 1 <= int(number) <= len(choices) and choices[int(number) - 1] == gold)


class Copa(Task):
    name = "copa"
    description = "two-choice cause/effect plausibility, answered with the alternative (accuracy)"
    metric = staticmethod(choice_accuracy)
    budget_scale = 3

    def sampler(self, rng: random.Random, out_dir: Path) -> Sampler:
        def sample(rng: random.Random) -> Record:
            n, m = rng.sample(NAMES, 2)
            right, wrong = rng.sample(PAIRS, 2)
            ask = rng.choice(("cause", "effect"))
            premise, good = (right[1], right[0]) if ask == "cause" else (right[0], right[1])
            bad = wrong[0] if ask == "cause" else wrong[1]
            fill = {"n": n, "m": m}
            premise, good, bad = (_capitalize(s.format(**fill)) for s in (premise, good, bad))
            first = rng.random() < 0.5
            options = (good, bad) if first else (bad, good)
            question = "What was the cause?" if ask == "cause" else "What happened as a result?"
            prompt = (
                f"Premise: {premise}.\n{question}\n1: {options[0]}.\n2: {options[1]}.\n"
                "Answer with the more plausible alternative."
            )
            return {"prompt": prompt, "response": f"{good}.", "answer": good, "choices": list(options)}

        return sample
