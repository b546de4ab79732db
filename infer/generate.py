"""Command-line generation: `python -m infer.generate --model default --prompt "..." [--chat]`.

Several --prompt are batched together in one engine. One prompt streams to the terminal as it is
generated; several are printed as each finishes. --json prints one object per prompt.
With --prompt-pool FILE --matcher DIR [--shots M], a PILLOW matcher (infer/pillow/, trained by train.pillow) picks
M exemplars from the pool for each prompt (greedily) and prepends them; --json then adds "exemplars" (their pool
lines, 0-based).
"""

from __future__ import annotations

import argparse
import json
import sys
from typing import TYPE_CHECKING

from infer.cli import ArgumentParser, add_device_args, device_and_dtype
from infer.sampling import SamplingParams
from infer.tp_engine import make_engine

if TYPE_CHECKING:
    from infer.pillow import Pool


def build_parser() -> argparse.ArgumentParser:
    p = ArgumentParser(prog="python -m infer.generate", description=__doc__.splitlines()[0])
    p.add_argument("--model", default="default", help="'default', a .gguf file, a Meta or an HF directory")
    p.add_argument("--tp", type=int, default=1, help="tensor-parallel ranks: run under torchrun --nproc-per-node TP")
    add_device_args(p)
    p.add_argument("--prompt", action="append", required=True, help="may be given several times (batched)")
    p.add_argument("--chat", action="store_true", help="wrap each prompt in the model's chat template")
    p.add_argument("--max-new-tokens", type=int, default=128)
    p.add_argument("--temperature", type=float, default=0.0, help="0 = greedy")
    p.add_argument("--top-k", type=int, default=0)
    p.add_argument("--top-p", type=float, default=1.0)
    p.add_argument("--beams", type=int, default=1)
    p.add_argument("--seed", type=int, default=None)
    p.add_argument("--stop", action="append", default=[], help="stop string (may be repeated)")
    p.add_argument(
        "--adapter",
        action="append",
        default=[],
        metavar="DIR",
        help="adapter directory (PARA, or a peft LoRA/(IA)3): once for every prompt, or once per prompt "
        "in order; 'none' = the base model for that prompt",
    )
    p.add_argument("--json", action="store_true", help="print one JSON object per prompt")
    p.add_argument("--prompt-pool", metavar="FILE", help='PILLOW: exemplar pool JSONL {"prompt", "response"}')
    p.add_argument("--matcher", metavar="DIR", help="PILLOW: a trained matcher (train.pillow's OUT or OUT/best)")
    p.add_argument("--shots", type=int, help="PILLOW: exemplars per prompt (default: what the matcher was trained for)")
    return p


def main(argv: list[str] | None = None) -> int:
    a = build_parser().parse_args(argv)
    try:
        params = SamplingParams(
            max_new_tokens=a.max_new_tokens,
            temperature=a.temperature,
            top_k=a.top_k,
            top_p=a.top_p,
            beams=a.beams,
            seed=a.seed,
            stop=tuple(a.stop),
        )
        adapters = a.adapter * len(a.prompt) if len(a.adapter) == 1 else a.adapter or [None] * len(a.prompt)
        if len(adapters) != len(a.prompt):
            raise ValueError(
                f"--adapter given {len(a.adapter)} times for {len(a.prompt)} prompts: give it once or once per prompt"
            )
        pool = _read_pool(a)
        device, dtype = device_and_dtype(a)
    except ValueError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    from model import Llama  # after argument checks: bad flags answer at once
    from weights.adapters import load_adapter

    try:
        model = Llama.from_pretrained(a.model, dtype=dtype, device=device, tp=a.tp)
        if model.tokenizer is None:
            raise ValueError(f"{a.model} has no tokenizer; text prompts need one")
        engine = make_engine(model)  # a TPEngine across --tp ranks (infer/tp_engine.py)
        names = [None if d in (None, "none") else d for d in adapters]
        for d in dict.fromkeys(n for n in names if n is not None):
            engine.add_adapter(d, load_adapter(d, model))
        tok = model.tokenizer
        prompts = [tok.encode_chat([{"role": "user", "content": p}]) if a.chat else p for p in a.prompt]
        chosen = None
        if pool is not None:
            from infer.pillow import Pillow

            pillow = Pillow.load(a.matcher, model, pool, shots=a.shots)
            prompts, chosen = pillow.prompts(a.prompt, chat=a.chat)
        if not getattr(engine, "is_driver", True):  # --tp: ranks > 0 run rank 0's steps until it is done
            return engine.run_worker()
        reqs = [engine.add_request(p, params, adapter=n) for p, n in zip(prompts, names)]
    except (ValueError, OSError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2

    if len(reqs) == 1 and not a.json:
        for piece in engine.stream_request(reqs[0]):
            print(piece, end="", flush=True)
        print()
        return 0
    shown = set()
    while engine.has_unfinished():
        engine.step()
        for i, r in enumerate(reqs):
            if r.finished and i not in shown:
                shown.add(i)
                if not a.json:
                    print(f"[{i}] {r.text}", flush=True)
    if a.json:
        for i, r in enumerate(reqs):
            row = {"prompt_ids": r.prompt_ids, "output_ids": r.output_ids, "text": r.text}
            if chosen is not None:
                row["exemplars"] = chosen[i]
            print(json.dumps(row))
    return 0


def _read_pool(a: argparse.Namespace) -> Pool | None:
    """The PILLOW pool (None without --prompt-pool), read and checked before the model loads."""
    if (a.prompt_pool is None) != (a.matcher is None):
        raise ValueError("--prompt-pool and --matcher go together (a pool, and the matcher trained to pick from it)")
    if a.prompt_pool is None:
        if a.shots is not None:
            raise ValueError("--shots needs --prompt-pool and --matcher")
        return None
    from infer.pillow import check_shots, load_pool

    pool = load_pool(a.prompt_pool)
    if a.shots is not None:
        check_shots(a.shots, len(pool))
    return pool


if __name__ == "__main__":
    sys.exit(main())
