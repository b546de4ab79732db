"""SQuAD-like: extractive QA over a generated company passage (mean of token F1 and exact match).

The passage names two people, two years and two cities, so each question has distractors of its own type;
the gold answer is always a span of the passage (`record["answer"]`). Scoring follows the SQuAD script:
lowercase, drop punctuation, drop the articles a/an/the, collapse whitespace; F1 over the token multisets.
"""

from __future__ import annotations

import random
import re
import string
from collections import Counter
from pathlib import Path

from train.tasks.base import Record, Sampler, Task
from train.tasks.words import CITIES, COMPANY_FIRST, COMPANY_SECOND, COMPANY_THIRD, JOBS, NAMES, PRODUCTS

_PUNCT = set(string.punctuation)


def normalize_answer(text: str) -> str:
    """SQuAD's normalisation: lowercase, remove punctuation, remove articles, collapse whitespace."""
    text = "".join(ch for ch in text.lower() if ch not in _PUNCT)
    text = re.sub(r"\b(a|an|the)\b", " ", text)
    return " ".join(text.split())


def token_f1(prediction: str, gold: str) -> float:
    """F1 between the normalised token multisets (1.0 when both are empty, 0.0 when only one is)."""
    pred, ref = normalize_answer(prediction).split(), normalize_answer(gold).split()
    if not pred or not ref:
        return float(pred == ref)
    common = sum((Counter(pred) & Counter(ref)).values())
    if common == 0:
        return 0.0
    precision, recall = common / len(pred), common / len(ref)
    return 2 * precision * recall / (precision + recall)


def normalized_exact_match(prediction: str, gold: str) -> float:
    """SQuAD's EM: equal after normalize_answer (lower case, no punctuation, articles or extra spaces)."""
    return float(normalize_answer(prediction) == normalize_answer(gold))


def f1_em(prediction: str, record: Record) -> float:
    """(token F1 + exact match) / 2 against `record["answer"]` (else the response)."""
    gold = record.get("answer", record["response"])
    return (token_f1(prediction, gold) + normalized_exact_match(prediction, gold)) / 2


class Squad(Task):
    name = "squad"
    description = "extractive QA over a generated passage (mean of token F1 and exact match)"
    metric = staticmethod(f1_em)

    def sampler(self, rng: random.Random, out_dir: Path) -> Sampler:
        def sample(rng: random.Random) -> Record:
            company = f"{rng.choice(COMPANY_FIRST)} {rng.choice(COMPANY_SECOND)} {rng.choice(COMPANY_THIRD)}"
            founder, worker = rng.sample(NAMES, 2)
            home, branch = rng.sample(CITIES, 2)
            founded = rng.randint(1900, 1990)
            joined = founded + rng.randint(3, 30)
            product = rng.choice(PRODUCTS)
            job = rng.choice(JOBS)
            staff = rng.randint(12, 950)
            sentences = [
                f"{company} was founded by {founder} in {home} in {founded}.",
                f"The company sells {product} and has {staff} workers.",
                f"In {joined}, {worker} joined as a {job} and opened an office in {branch}.",
            ]
            qa = (
                (f"Who founded {company}?", founder),
                (f"Where was {company} founded?", home),
                (f"In which year was {company} founded?", str(founded)),
                (f"What does {company} sell?", product),
                (f"How many workers does {company} have?", str(staff)),
                (f"When did {worker} join {company}?", str(joined)),
                (f"Who joined {company} in {joined}?", worker),
                (f"What job did {worker} have?", job),
                (f"In which city did {worker} open an office?", branch),
            )
            question, answer = rng.choice(qa)
            passage = " ".join(sentences)
            prompt = f"{passage}\nQuestion: {question} Answer with words from the text."
            return {"prompt": prompt, "response": answer, "answer": answer, "context": passage}

        return sample
