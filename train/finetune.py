"""Fine-tune a PARA, LoRA or (IA)³ adapter on JSONL instruction data (the base model stays frozen).

    python -m train.finetune --model default --method para --train T.jsonl --dev D.jsonl [--test E.jsonl] --out DIR
    torchrun --nproc_per_node N -m train.finetune ...   # data parallel: see train/ddp.py

AdamW (default lr per method: train.config.DEFAULT_LR), linear decay after a 6% linear warm-up, gradient
clipping, dev loss every --eval-every optimizer steps (and at the end), early stopping after --patience evals
without improvement, best adapter kept, final test evaluation with beam search (width 3) through the engine.
PARA's vector generators read the RMS-normalised pool unless --no-pool-norm (the paper's form). Programmatic use:
`finetune(FinetuneConfig(...), metric=...) -> FinetuneResult`.

OUT holds `best/` (the adapter with the lowest dev loss; the step-0 identity adapter competes too),
`last/` (the resume checkpoint, replaced atomically at every eval, at --stop-after and at the end),
`metrics.jsonl`, `result.json` and, with --test, `test_predictions.jsonl`.

Divergence stops a run: a non-finite train or dev loss, or a dev loss above the step-0 one for
--diverge-patience evals in a row. best/ is kept (still tested), result.json says `"diverged": true` and why,
stderr gets one line with a lower --lr to try; --resume only finishes it again. Exit codes: 0 done,
2 bad input, 3 diverged (EXIT_DIVERGED), 4 finished without any dev improvement (EXIT_NO_IMPROVEMENT).

Batches: --batch-size examples per micro-batch (global: split across ranks), --grad-accum micro-batches per
optimizer step; the loss is the mean over the step's response tokens. --max-steps caps the run and sets
the schedule's length; --stop-after N stops after step N as an interruption would, schedule unchanged,
for a later --resume. Resuming needs the same settings and data (checked). Dropout (LoRA) is reseeded from
(seed, step, rank) every step, so the checkpoint needs no RNG state: a resumed run follows the same path.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import math
import os
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from tqdm import tqdm

from infer.cli import EXIT_BAD_INPUT
from train import checkpoint
from train.config import TRAJECTORY, FinetuneConfig, FinetuneResult, TrainError, adapter_config, optimizer_groups
from train.data import DataError, Dataset, collate, length_grouped_batches, load_dataset, read_jsonl
from train.ddp import World, setup
from train.evaluate import Metric, autocast, batch_loss, dev_loss, exact_match, generate
from train.finetune_args import build_parser
from weights.adapters import load_adapter, save_adapter
from weights.io import atomic_write

EXIT_DIVERGED = 3
EXIT_NO_IMPROVEMENT = 4  # no step beat the untrained adapter's dev loss: best/ is that adapter


@dataclass
class _State:
    step: int = 0
    initial_dev_loss: float = math.nan
    best_dev_loss: float = math.inf
    best_step: int = -1
    bad_evals: int = 0
    stopped_early: bool = False
    rising_evals: int = 0  # evals in a row with dev loss above the initial one
    diverged: str | None = None  # why, once diverged
    train_seconds: float = 0.0
    train_tokens: int = 0
    window: list[float] = dataclasses.field(default_factory=list)  # step losses since the last train log


def linear_schedule(total: int, warmup: int) -> Callable[[int], float]:
    """LR factor of optimizer step s (0-based): (s+1)/warmup while warming up, then linear decay to 1/(total-warmup)
    at the last step (never 0 inside the run, unlike a schedule whose first step has lr 0)."""

    def factor(s: int) -> float:
        if s < warmup:
            return (s + 1) / warmup
        return max(0.0, (total - s) / max(1, total - warmup))

    return factor


def _sha256(path: str) -> str:
    return hashlib.sha256(Path(path).read_bytes()).hexdigest()


def _step_seed(seed: int, step: int, rank: int) -> int:
    return ((seed * 1_000_003 + step) * 1009 + rank) % (2**63)


class _Log:
    """metrics.jsonl (main rank only): one JSON object per line, flushed as written."""

    def __init__(self, path: Path, enabled: bool, keep_until: int | None) -> None:
        self.path, self.enabled = path, enabled
        if enabled and keep_until is not None and path.exists():  # resuming: drop what the lost steps logged
            lines = [s for s in path.read_text().splitlines() if s.strip()]
            kept = [s for s in lines if json.loads(s).get("step", 0) <= keep_until]
            path.write_text("".join(s + "\n" for s in kept))
        elif enabled:
            path.write_text("")

    def __call__(self, **entry: Any) -> None:
        if self.enabled:
            with self.path.open("a") as f:
                f.write(json.dumps(entry) + "\n")


def finetune(
    config: FinetuneConfig,
    *,
    model: Any = None,
    metric: Metric = exact_match,
    on_step: Callable[[int, float], None] | None = None,
) -> FinetuneResult:
    """Train an adapter as `config` says and evaluate it; returns the summary also written to OUT/result.json.

    `model`: an already loaded `Llama` (its weights are never changed), else `config.model` is loaded.
    `metric(prediction, record) -> float` scores each test example (default: exact match after strip).
    `on_step(step, train_loss)` is called after every optimizer step (main rank only)."""
    config.check()
    device = config.device
    if device is None and model is not None:
        device = str(model.tok_embeddings.weight.device)
    world = setup(device)
    try:
        result = _Run(config, world, model, metric, on_step).run()
        world.barrier()  # no rank tears the group down while another still talks to it
        return result
    finally:
        world.close()


class _Run:
    def __init__(self, config: FinetuneConfig, world: World, model: Any, metric: Metric, on_step: Any) -> None:
        self.c, self.world, self.metric, self.on_step = config, world, metric, on_step
        self.out = Path(config.out)
        for flag, path in (("--train", config.train), ("--dev", config.dev), ("--test", config.test)):
            if path is not None:  # fail fast, before loading a model: missing files and malformed lines
                try:
                    records, skipped = read_jsonl(path, config.skip_bad)
                except DataError as e:
                    raise DataError(f"{flag} {e}") from None
                if not records:
                    extra = f" ({len(skipped)} bad line(s) skipped)" if skipped else ""
                    raise DataError(f"{flag} {path}: no examples{extra}")
        if not config.resume and checkpoint.find(self.out / "last") is not None:
            raise TrainError(f"--out {self.out} already holds a run (last/): pass --resume or choose another --out")
        if model is None:
            from model import Llama

            model = Llama.from_pretrained(config.model, device=world.device)
        if model.tokenizer is None:
            raise TrainError(f"--model {config.model}: the model has no tokenizer")
        self.model = model
        self.max_len = min(config.max_len or model.args.max_seq_len, model.args.max_seq_len)
        self.train_set = self._load(config.train)
        self.dev_set = self._load(config.dev)
        self.test_set = self._load(config.test) if config.test else None

    def _load(self, path: str) -> Dataset:
        c = self.c
        data = load_dataset(path, self.model.tokenizer, chat=c.chat, max_len=self.max_len, skip_bad=c.skip_bad)
        for msg in data.skipped:
            self.say(f"skipped {msg}")
        if data.truncated:
            self.say(f"warning: {path}: {data.truncated} example(s) longer than {self.max_len} tokens: response cut")
        return data

    def say(self, msg: str) -> None:
        if self.world.is_main:
            tqdm.write(msg, file=sys.stderr)

    # ---- the run ------------------------------------------------------------------------------------
    def run(self) -> FinetuneResult:
        from model.peft import create_adapter

        c, world = self.c, self.world
        torch.manual_seed(c.seed)  # the adapter's init
        adapter = create_adapter(self.model, adapter_config(c)).to(world.device)
        params = adapter.trainable_parameters()
        world.broadcast_(params)
        adapter.train()
        self.adapter = adapter
        self._epoch, self._order = -1, []  # the epoch whose batch order is cached
        opt = torch.optim.AdamW(optimizer_groups(c, adapter), lr=c.lr, weight_decay=c.weight_decay)
        n_micro = math.ceil(len(self.train_set) / c.batch_size)
        self.steps_per_epoch = math.ceil(n_micro / c.grad_accum)
        total = self.steps_per_epoch * c.epochs
        total = min(total, c.max_steps) if c.max_steps else total
        sched = torch.optim.lr_scheduler.LambdaLR(opt, linear_schedule(total, math.ceil(c.warmup_ratio * total)))
        run_keys = {k: getattr(c, k) for k in TRAJECTORY}
        run_keys["lora_targets"] = list(c.lora_targets)
        run_keys |= {"train_sha256": _sha256(c.train), "dev_sha256": _sha256(c.dev)}

        st = _State()
        found = checkpoint.find(self.out / "last") if c.resume else None
        if found is not None:
            saved = checkpoint.load(found, self.model, adapter)
            for k, v in run_keys.items():
                if saved["run"].get(k) != v:
                    raise TrainError(
                        f"--resume: {found} was saved with {k}={saved['run'].get(k)!r}, this run has {v!r}"
                    )
            opt.load_state_dict(saved["optimizer"])
            sched.load_state_dict(saved["scheduler"])
            st = _State(**saved["state"])
            # a diverged run (same lr and data: checked) would only diverge again: it is finished, not trained
            note = f" (diverged: {st.diverged}; not training further)" if st.diverged else ""
            self.say(f"resuming {found} at step {st.step}/{total}{note}")
        elif c.resume:
            self.say(f"--resume: nothing to resume in {self.out}; starting a new run")
        if world.is_main:
            self.out.mkdir(parents=True, exist_ok=True)
        log = _Log(self.out / "metrics.jsonl", world.is_main, st.step if found is not None else None)

        def save_last() -> None:
            if world.is_main:
                state = {"run": run_keys, "optimizer": opt.state_dict(), "scheduler": sched.state_dict()}
                checkpoint.save(self.out / "last", adapter, state | {"state": dataclasses.asdict(st)})
            world.barrier()

        def evaluate() -> None:
            loss = dev_loss(self.model, adapter, self.dev_set, c.eval_batch_size or c.batch_size, world)
            best = loss < st.best_dev_loss
            if st.step == 0:
                st.initial_dev_loss = loss
            if best:
                st.best_dev_loss, st.best_step, st.bad_evals = loss, st.step, 0
                if world.is_main:
                    save_adapter(adapter, self.out / "best")
            else:
                st.bad_evals += 1
                st.stopped_early = st.bad_evals >= c.patience
            if st.step > 0:
                st.rising_evals = st.rising_evals + 1 if loss > st.initial_dev_loss else 0
                if not math.isfinite(loss):
                    st.diverged = f"dev loss {loss}"
                elif st.rising_evals >= c.diverge_patience:
                    st.diverged = (
                        f"dev loss {loss:.4g} > initial {st.initial_dev_loss:.4g} for {st.rising_evals} evaluations"
                    )
            log(event="eval", step=st.step, dev_loss=loss, best=best)
            save_last()

        if found is None:
            self.say(f"{c.method}: {adapter.num_trainable():,} trainable parameters, {total} steps")
            evaluate()
        interrupted = False
        bar = tqdm(total=total, initial=st.step, desc=c.method, disable=not (c.progress and world.is_main))
        while st.step < total and not st.stopped_early and not st.diverged:
            t0 = time.perf_counter()
            lr = sched.get_last_lr()[0]  # this step's
            loss, tokens = self._step(opt, params, st.step)
            sched.step()
            st.step += 1
            st.train_seconds += time.perf_counter() - t0
            st.train_tokens += tokens
            st.window.append(loss)
            tps = st.train_tokens / max(st.train_seconds, 1e-9)
            bar.update(1)
            bar.set_postfix(loss=f"{loss:.4f}", tok_s=f"{tps:.0f}")
            if st.step % c.log_every == 0 or st.step == total:
                log(event="train", step=st.step, train_loss=sum(st.window) / len(st.window), lr=lr, tokens_per_s=tps)
                st.window = []
            if self.on_step is not None and world.is_main:
                self.on_step(st.step, loss)
            if not math.isfinite(loss):  # the optimizer already took the step: no point evaluating it
                st.diverged = f"train loss {loss}"
                save_last()  # records the divergence, so --resume refuses it
            elif st.step % c.eval_every == 0 or st.step == total:
                evaluate()
            if st.diverged:
                log(event="diverged", step=st.step, reason=st.diverged)
                break
            if c.stop_after is not None and st.step >= c.stop_after and st.step < total and not st.stopped_early:
                if st.step % c.eval_every:
                    save_last()
                interrupted = True
                break
        bar.close()

        result = FinetuneResult(
            out=str(self.out),
            method=c.method,
            num_trainable=adapter.num_trainable(),
            steps=st.step,
            total_steps=total,
            initial_dev_loss=st.initial_dev_loss,
            best_dev_loss=st.best_dev_loss,
            best_step=st.best_step,
            stopped_early=st.stopped_early,
            interrupted=interrupted,
            train_seconds=st.train_seconds,
            tokens_per_second=st.train_tokens / max(st.train_seconds, 1e-9),
            world_size=world.size,
            diverged=st.diverged is not None,
            diverge_reason=st.diverged,
            improved=st.best_step > 0,
            lr=c.lr,
        )
        if st.diverged:
            self.say(
                f"train.finetune: diverged at step {st.step} ({st.diverged}) with lr {c.lr:g}; try --lr {c.lr / 3:.1g}"
            )
        elif not result.improved and not interrupted:
            self.say(
                f"train.finetune: no improvement: no step beat the initial dev loss {st.initial_dev_loss:.4g} "
                "(best/ is the untrained adapter)"
            )
        if self.test_set is not None and not interrupted:
            result.test_metric = getattr(self.metric, "__name__", "metric")
            result.test_score, result.n_test = self._test(), len(self.test_set)
            log(event="test", step=st.step, metric=result.test_metric, score=result.test_score, n=result.n_test)
            self.say(f"test {result.test_metric}: {result.test_score:.4f} on {result.n_test} examples")
        if world.is_main:  # atomic: a reader (train.suite) never sees half a result
            atomic_write(self.out / "result.json", json.dumps(dataclasses.asdict(result), indent=2) + "\n")
        return result

    def _step(self, opt: torch.optim.Optimizer, params: list[torch.nn.Parameter], step: int) -> tuple[float, int]:
        """One optimizer step over this step's micro-batches; (mean loss per target token, global tokens)."""
        c, world = self.c, self.world
        epoch, k = divmod(step, self.steps_per_epoch)
        if self._epoch != epoch:
            lengths = [len(e.ids) for e in self.train_set.examples]
            self._order = length_grouped_batches(lengths, c.batch_size, seed=c.seed * 1_000_003 + epoch)
            self._epoch = epoch
        micro = self._order[k * c.grad_accum : (k + 1) * c.grad_accum]
        examples = self.train_set.examples
        n_targets = sum(examples[i].n_targets for mb in micro for i in mb)  # global: every rank knows it
        torch.manual_seed(_step_seed(c.seed, step, world.rank))  # dropout masks
        loss_sum = torch.zeros((), device=world.device)
        for mb in micro:
            mine = [examples[i] for i in mb[world.rank :: world.size]]
            if not mine:
                continue
            batch = collate(mine).to(world.device)
            with autocast(world.device):
                loss = batch_loss(self.model, self.adapter, batch) / n_targets
            loss.backward()
            loss_sum += loss.detach()
        loss_sum = world.sync_grads(params, loss_sum)
        if c.max_grad_norm > 0:
            torch.nn.utils.clip_grad_norm_(params, c.max_grad_norm)
        opt.step()
        opt.zero_grad(set_to_none=True)
        return float(loss_sum), sum(len(examples[i].ids) for mb in micro for i in mb)

    def _test(self) -> float:
        """Beam-search the best adapter on the test prompts and score with the metric; writes test_predictions.jsonl."""

        c, world, data = self.c, self.world, self.test_set
        assert data is not None
        world.barrier()  # best/ is written
        best = load_adapter(self.out / "best", self.model)
        max_new = c.max_new_tokens or max(e.n_targets for e in data.examples)
        texts = generate(
            self.model,
            best,
            data,
            max_new_tokens=max_new,
            beams=c.beams,
            batch_size=c.eval_batch_size or c.batch_size,
            world=world,
        )
        scores = [float(self.metric(t, e.record)) for t, e in zip(texts, data.examples)]
        if world.is_main:
            with (self.out / "test_predictions.jsonl").open("w") as f:
                for t, s, e in zip(texts, scores, data.examples):
                    row = {"prompt": e.record["prompt"], "response": e.record["response"], "prediction": t, "score": s}
                    f.write(json.dumps(row) + "\n")
        return sum(scores) / len(scores)


def main(argv: list[str] | None = None) -> int:
    try:
        a = vars(build_parser().parse_args(argv))
    except SystemExit as e:  # --help, or a bad flag (one line already printed)
        return int(e.code or 0)
    a["lora_targets"] = tuple(t.strip() for t in a["lora_targets"].split(",") if t.strip())
    try:
        result = finetune(FinetuneConfig(**a))
    except (ValueError, OSError) as e:  # DataError, TrainError, CheckpointError, AdapterError are ValueErrors
        if os.environ.get("RANK", "0") == "0":
            print(f"error: {e}", file=sys.stderr)
        return EXIT_BAD_INPUT
    if os.environ.get("RANK", "0") == "0":
        print(json.dumps(dataclasses.asdict(result)))
    if result.diverged:  # the one-line reason is already on stderr
        return EXIT_DIVERGED
    return EXIT_NO_IMPROVEMENT if not result.improved and not result.interrupted else 0


if __name__ == "__main__":
    sys.exit(main())
