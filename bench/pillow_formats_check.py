"""Does the exemplar choice decide the score on the `formats` task? Checked before any matcher is trained (issue 18).

Greedy answers of the base model to test queries with 0 exemplars, m random pool exemplars, m exemplars of the
query's own kind (the oracle, the bound a selector can reach) and m of other kinds, in plain and chat format;
exact-match scores ×100. The pool is the first `--per-kind` train records of each kind.

    python bench/pillow_formats_check.py --model default --n-test 48 --shots 2 --json out.json
"""

from __future__ import annotations

import argparse
import json
import random
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path[:] = [str(ROOT)] + [p for p in sys.path if Path(p or ".").resolve() != ROOT / "bench"]

from infer.engine import Engine  # noqa: E402
from infer.pillow import few_shot_prompt  # noqa: E402
from infer.sampling import SamplingParams  # noqa: E402
from model import Llama  # noqa: E402
from train.tasks.base import read_split  # noqa: E402
from train.tasks.formats import Formats, first_line_exact  # noqa: E402


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", default="default")
    p.add_argument("--n-test", type=int, default=48)
    p.add_argument("--shots", type=int, default=2)
    p.add_argument("--per-kind", type=int, default=3)
    p.add_argument("--seed", type=int, default=0, help="data seed and the random selection's seed")
    p.add_argument("--work", default="/tmp/parallama-formats-check")
    p.add_argument("--json")
    a = p.parse_args(argv)
    t0 = time.perf_counter()
    paths = Formats().generate(a.work, seed=a.seed, n_train=200, n_dev=16, n_test=a.n_test)
    train, test = read_split(paths["train"]), read_split(paths["test"])
    pool = [r for k in sorted({r["kind"] for r in train}) for r in [x for x in train if x["kind"] == k][: a.per_kind]]
    model = Llama.from_pretrained(a.model)
    engine = Engine(model, max_batch=16)
    rng = random.Random(a.seed)
    selections = {
        "0-shot": lambda q: [],
        "random": lambda q: rng.sample(pool, a.shots),
        "oracle (same kind)": lambda q: [e for e in pool if e["kind"] == q["kind"]][: a.shots],
        "other kinds": lambda q: [e for e in pool if e["kind"] != q["kind"]][: a.shots],
    }
    params = SamplingParams(max_new_tokens=16)
    scores: dict[str, dict[str, float]] = {}
    for chat in (False, True):
        fmt = "chat" if chat else "plain"
        for name, select in selections.items():
            prompts = [few_shot_prompt(model.tokenizer, select(q), q["prompt"], chat) for q in test]
            outs = engine.generate(prompts, [params] * len(prompts))
            score = 100 * sum(first_line_exact(o.text, q) for o, q in zip(outs, test)) / len(test)
            scores.setdefault(name, {})[fmt] = score
            print(f"{fmt:5s} {name:20s} {score:5.1f}   e.g. {outs[0].text!r}", file=sys.stderr)
    print("| selection | plain | chat |\n|---|---|---|")
    for name, s in scores.items():
        print(f"| {name} {a.shots if name != '0-shot' else ''}".rstrip() + f" | {s['plain']:.1f} | {s['chat']:.1f} |")
    wall = time.perf_counter() - t0
    print(f"\nexact match ×100, {len(test)} test queries, pool of {len(pool)} ({a.per_kind} per kind), {wall:.0f} s")
    if a.json:
        Path(a.json).write_text(json.dumps({"args": vars(a), "scores": scores, "wall_seconds": wall}, indent=1) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
