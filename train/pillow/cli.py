"""PILLOW (PARA.md §5): an RL-trained matching network that picks m exemplars from a prompt pool.

    python -m train.pillow --model default [--adapter DIR] --pool pool.jsonl --train T.jsonl --dev D.jsonl \\
        --shots 2 --out runs/pillow [--task boolq] [--steps 200 --batch-size 16 --seed 0]
    python -m train.pillow --evaluate --task boolq --pool pool.jsonl --matcher runs/pillow/best \\
        --dev D.jsonl --test E.jsonl --shots 2 [--adapter DIR [--adapter-matcher DIR]] [--out bench/results]

Training: files are checked before the model loads; the best matcher by dev reward goes to OUT/best atomically
(`matcher.safetensors` + `matcher.json`: dims, shots, pool hash, model fingerprint), with OUT/metrics.jsonl (one
line per step and per dev pass) and OUT/result.json. --evaluate: OUT/pillow_<task>.json and .md.
Errors are one line on stderr, exit 2.
"""

from __future__ import annotations

import argparse
import json
import math
import sys
import time
from pathlib import Path
from typing import Any

import torch
from tqdm import tqdm

from infer.cli import EXIT_BAD_INPUT, ArgumentParser
from infer.pillow import (
    CONFIG,
    Matcher,
    PillowError,
    Pool,
    Record,
    banned_mask,
    cached_embeddings,
    check_shots,
    load_matcher,
    load_pool,
    read_records,
    save_matcher,
)
from train.evaluate import Metric, exact_match
from train.pillow.evaluate import evaluate_selection, format_selection_table
from train.pillow.rl import ANSWER_SLACK, LLMAnswerer, Rewarder, RLConfig, train_matcher


def build_parser() -> argparse.ArgumentParser:
    d = RLConfig()
    p = ArgumentParser(prog="python -m train.pillow", description=__doc__.splitlines()[0])
    a = p.add_argument
    a("--model", default="default", help="'default' (SmolLM2-135M-Instruct), a .gguf file, a Meta or an HF directory")
    a("--adapter", help="adapter directory the frozen LLM answers with (PARA, LoRA, (IA)3); --evaluate: its rows")
    a("--pool", required=True, help='prompt pool JSONL: one exemplar {"prompt": ..., "response": ...} per line')
    a("--train", help="training queries JSONL (records with prompt, response and any fields the metric reads)")
    a("--dev", help="dev queries JSONL: the best matcher by greedy dev reward is kept")
    a("--test", help="--evaluate: test queries JSONL")
    a("--out", help="training: output directory; --evaluate: results directory (default bench/results)")
    a("--task", help="task whose metric is the reward (hsm, q2sql, squad, boolq, copa, formats); default exact match")
    a("--shots", type=int, default=d.shots, help="m, the exemplars per query")
    a("--chat", action=argparse.BooleanOptionalAction, help="chat template (default: when the tokenizer has one)")
    a("--steps", type=int, default=d.steps)
    a("--batch-size", type=int, default=d.batch_size, help="queries per RL step (answered in one engine batch)")
    a("--lr", type=float, default=d.lr)
    a("--entropy-coef", type=float, default=d.entropy_coef)
    a("--baseline-momentum", type=float, default=d.baseline_momentum)
    a("--eval-every", type=int, default=d.eval_every)
    a("--hidden", type=int, default=256, help="matcher MLP width")
    a("--k", type=int, default=64, help="matcher key width")
    a("--max-new-tokens", type=int, help="answer budget (default: the longest reference response + 8)")
    a("--seed", type=int, default=d.seed)
    a("--cache-dir", help="embedding cache (default $PARALLAMA_CACHE/pillow)")
    a("--no-progress", dest="progress", action="store_false")
    ev = p.add_argument_group("evaluation")
    ev.add_argument(
        "--evaluate", action="store_true", help="0-shot / random / nearest / PILLOW table instead of training"
    )
    ev.add_argument("--matcher", help="--evaluate: matcher for the base-model rows (a training OUT or OUT/best)")
    ev.add_argument("--adapter-matcher", help="--evaluate: matcher for the adapter rows (default: --matcher)")
    return p


def _metric(task: str | None) -> Metric:
    if task is None:
        return exact_match
    from train.tasks import task as find_task

    try:
        return find_task(task).metric
    except KeyError as e:
        raise PillowError(f"--task: {e.args[0]}") from None


def _read(flag: str, path: str | None) -> list[Record]:
    if path is None:
        raise PillowError(f"{flag} is required")
    try:
        records = read_records(path)
    except PillowError as e:
        raise PillowError(f"{flag} {e}") from None
    if not records:
        raise PillowError(f"{flag} {path}: no records")
    return records


def _pool(path: str, shots: int) -> Pool:
    try:
        pool = load_pool(path)
    except PillowError as e:
        raise PillowError(f"--pool {e}") from None
    try:
        check_shots(shots, len(pool))
    except PillowError as e:
        raise PillowError(f"--shots: {e}") from None
    return pool


def _load_model(a: argparse.Namespace) -> tuple[Any, Any, bool]:
    """(model, adapter or None, chat)."""
    from model import Llama
    from weights.adapters import load_adapter

    device = "cuda" if torch.cuda.is_available() else "cpu"
    model = Llama.from_pretrained(a.model, device=device)
    if model.tokenizer is None:
        raise PillowError(f"--model {a.model}: the model has no tokenizer")
    adapter = load_adapter(a.adapter, model) if a.adapter else None
    chat = a.chat if a.chat is not None else getattr(model.tokenizer, "chat_template", None) is not None
    return model, adapter, chat


def _max_new(a: argparse.Namespace, model: Any, records: list[Record]) -> int:
    if a.max_new_tokens is not None:
        return a.max_new_tokens
    return max(len(model.tokenizer.encode(r["response"], bos=False)) for r in records) + ANSWER_SLACK


def run_training(a: argparse.Namespace) -> dict[str, Any]:
    """The training CLI: files checked before the model loads, OUT/best by dev reward, metrics.jsonl, result.json."""
    if a.out is None:
        raise PillowError("--out is required")
    rl = RLConfig(a.shots, a.steps, a.batch_size, a.lr, a.entropy_coef, a.baseline_momentum, a.eval_every, a.seed)
    rl.check()
    metric = _metric(a.task)
    pool = _pool(a.pool, a.shots)
    train, dev = _read("--train", a.train), _read("--dev", a.dev)
    train_banned, dev_banned = banned_mask(train, pool, a.shots), banned_mask(dev, pool, a.shots)
    out = Path(a.out)
    if (out / "best" / CONFIG).exists():
        raise PillowError(f"--out {out} already holds a trained matcher (best/); choose another --out")
    model, adapter, chat = _load_model(a)
    t0 = time.perf_counter()
    pool_emb = cached_embeddings(model, pool.texts, a.cache_dir, kind="pool")
    train_emb = cached_embeddings(model, [r["prompt"] for r in train], a.cache_dir, kind="queries")
    dev_emb = cached_embeddings(model, [r["prompt"] for r in dev], a.cache_dir, kind="queries")
    embed_s = time.perf_counter() - t0
    answerer = LLMAnswerer(
        model, chat=chat, max_new_tokens=_max_new(a, model, train + dev), adapter=adapter, max_batch=a.batch_size
    )
    train_reward, dev_reward = Rewarder(train, pool, answerer, metric), Rewarder(dev, pool, answerer, metric)
    torch.manual_seed(a.seed)  # the matcher's init
    matcher = Matcher(model.args.dim, a.hidden, a.k)
    matcher.fit_normalization(pool_emb)
    from model.peft.adapters import model_fingerprint

    config = {
        "shots": a.shots,
        "chat": chat,
        "pool": str(pool.path),
        "pool_sha256": pool.sha256,
        "pool_size": len(pool),
        "base_model": model_fingerprint(model),
        "adapter": a.adapter,
        "metric": getattr(metric, "__name__", "metric"),
        "task": a.task,
        "seed": a.seed,
    }
    out.mkdir(parents=True, exist_ok=True)
    log = (out / "metrics.jsonl").open("w")
    step_times: list[float] = []
    last = [time.perf_counter()]

    def on_step(step: int, reward: float, baseline: float) -> None:
        now = time.perf_counter()
        step_times.append(now - last[0])
        last[0] = now
        log.write(
            json.dumps(
                {
                    "event": "train",
                    "step": step,
                    "reward": reward,
                    "baseline": baseline,
                    "seconds": step_times[-1],
                    "generations": answerer.calls,
                }
            )
            + "\n"
        )
        log.flush()

    def on_eval(step: int, score: float) -> None:
        best = score > best_dev[0]
        if best:
            best_dev[0] = score
            save_matcher(matcher, out / "best", config | {"step": step, "dev_reward": score})
        log.write(json.dumps({"event": "eval", "step": step, "dev_reward": score, "best": best}) + "\n")
        log.flush()
        if a.progress:
            tqdm.write(f"step {step}: dev reward {score:.4f}{' (best)' if best else ''}", file=sys.stderr)
        last[0] = time.perf_counter()  # the dev pass is not an RL step's time

    best_dev = [-math.inf]
    t1 = time.perf_counter()
    try:
        history = train_matcher(
            matcher,
            pool_emb,
            train_emb,
            train_reward,
            rl,
            train_banned=train_banned,
            dev_emb=dev_emb,
            dev_reward=dev_reward,
            dev_banned=dev_banned,
            on_eval=on_eval,
            on_step=on_step,
            progress=a.progress,
        )
    finally:
        log.close()
    result = {
        "out": str(out),
        "best": str(out / "best"),
        "best_step": history["best_step"],
        "best_dev_reward": history["best_dev"],
        "initial_dev_reward": history["dev"][0][1],
        "final_train_reward": history["rewards"][-1],
        "steps": rl.steps,
        "shots": rl.shots,
        "generations": answerer.calls,
        "embed_seconds": embed_s,
        "train_seconds": time.perf_counter() - t1,
        "seconds_per_step": sum(step_times) / max(1, len(step_times)),
    }
    (out / "result.json").write_text(json.dumps(result, indent=2) + "\n")
    return result


def run_evaluation(a: argparse.Namespace) -> dict[str, Any]:
    """The --evaluate CLI: OUT/pillow_<task>.json and .md (OUT defaults to bench/results)."""
    if a.matcher is None:
        raise PillowError("--evaluate needs --matcher DIR")
    metric = _metric(a.task)
    pool = _pool(a.pool, a.shots)
    splits = {name: _read(f"--{name}", path) for name, path in (("dev", a.dev), ("test", a.test)) if path}
    if not splits:
        raise PillowError("--evaluate needs --test and/or --dev")
    for recs in splits.values():
        banned_mask(recs, pool, a.shots)
    model, adapter, chat = _load_model(a)
    matchers = {"base": load_matcher(a.matcher, model)}
    adapters: dict[str, Any] = {"base": None}
    if adapter is not None:
        label = adapter.method.upper() if adapter.method != "ia3" else "(IA)3"
        matchers[label] = load_matcher(a.adapter_matcher or a.matcher, model)
        adapters[label] = adapter
    for label, (_, config) in matchers.items():
        if config["pool_sha256"] != pool.sha256:
            raise PillowError(f"--pool {a.pool}: not the pool the {label} matcher was trained on")
    t0 = time.perf_counter()
    result = evaluate_selection(
        model,
        pool,
        splits,
        shots=a.shots,
        metric=metric,
        chat=chat,
        matchers={k: m for k, (m, _) in matchers.items()},
        adapters=adapters,
        seed=a.seed,
        max_new_tokens=_max_new(a, model, [r for rs in splits.values() for r in rs]),
        batch_size=a.batch_size,
        cache_dir=a.cache_dir,
        progress=a.progress,
    )
    task = a.task or "exact_match"
    result |= {
        "task": a.task,
        "metric": getattr(metric, "__name__", "metric"),
        "chat": chat,
        "model": a.model,
        "adapter": a.adapter,
        "matchers": {k: c for k, (_, c) in matchers.items()},
        "seconds": time.perf_counter() - t0,
    }
    result["table"] = format_selection_table(result, result["metric"])
    out = Path(a.out or "bench/results")
    out.mkdir(parents=True, exist_ok=True)
    (out / f"pillow_{task}.json").write_text(json.dumps(result, indent=2, default=str) + "\n")
    (out / f"pillow_{task}.md").write_text(result["table"])
    return result


def main(argv: list[str] | None = None) -> int:
    try:
        a = build_parser().parse_args(argv)
    except SystemExit as e:
        return int(e.code or 0)
    try:
        if a.evaluate:
            result = run_evaluation(a)
            print(result["table"])
        else:
            result = run_training(a)
            print(json.dumps(result))
    except (ValueError, OSError) as e:  # PillowError, DataError, AdapterError, CheckpointError are ValueErrors
        print(f"error: {e}", file=sys.stderr)
        return EXIT_BAD_INPUT
    return 0
