"""`python -m train.finetune`'s argument parser (kept apart from the training loop in train/finetune.py)."""

from __future__ import annotations

import argparse

from infer.cli import ArgumentParser
from train.config import DEFAULT_LR, FinetuneConfig


def build_parser() -> argparse.ArgumentParser:
    d = FinetuneConfig("", "", "")
    p = ArgumentParser(
        prog="python -m train.finetune",
        description="Fine-tune a PARA, LoRA or (IA)³ adapter on JSONL instruction data (the base model stays frozen).",
    )
    a = p.add_argument
    lrs = ", ".join(f"{m} {lr:g}" for m, lr in DEFAULT_LR.items())
    a("--model", default=d.model, help="'default' (SmolLM2-135M-Instruct), a .gguf file, a Meta or an HF directory")
    a("--method", default=d.method, help="para | lora | ia3")
    a("--train", required=True, help='JSONL, one {"prompt": ..., "response": ...} per line')
    a("--dev", required=True, help="JSONL: dev loss for early stopping and the best checkpoint")
    a("--test", help="JSONL: scored after training (beam search through the engine)")
    a("--out", required=True, help="output directory")
    a("--chat", action="store_true", help="wrap prompts in the model's chat template")
    a("--r", type=int, help="PARA / LoRA rank (default 12 / 8)")
    a(
        "--no-pool-norm",
        dest="pool_norm",
        action="store_false",
        help="PARA: the paper's exact form, VG reads the raw residual stream (default: pool / rms(pool), stabler)",
    )
    a("--down-lr-rsqrt", action="store_true", help="PARA: train W_down at lr / sqrt(dim)")
    a("--lora-alpha", type=float, help="LoRA alpha (default: r)")
    a("--lora-dropout", type=float, default=d.lora_dropout)
    a("--lora-targets", default=",".join(d.lora_targets), help="comma-separated projections (peft names)")
    a("--lr", type=float, default=d.lr, help=f"peak learning rate (default per method: {lrs})")
    a("--weight-decay", type=float, default=d.weight_decay)
    a("--warmup-ratio", type=float, default=d.warmup_ratio)
    a("--epochs", type=int, default=d.epochs)
    a("--batch-size", type=int, default=d.batch_size, help="examples per micro-batch, over all ranks")
    a("--grad-accum", type=int, default=d.grad_accum, help="micro-batches per optimizer step")
    a("--max-grad-norm", type=float, default=d.max_grad_norm, help="0 = no clipping")
    a("--max-steps", type=int, help="cap on optimizer steps (sets the schedule's length)")
    a("--eval-every", type=int, default=d.eval_every, help="optimizer steps between dev evaluations")
    a("--patience", type=int, default=d.patience, help="evals without dev improvement before stopping")
    a(
        "--diverge-patience",
        type=int,
        default=d.diverge_patience,
        help="evals in a row with dev loss above the initial one before stopping as diverged (exit 3)",
    )
    a("--eval-batch-size", type=int)
    a("--max-len", type=int, help="max tokens per example (default: the model's context); longer: response cut")
    a("--max-new-tokens", type=int, help="test generation budget (default: longest test response)")
    a("--beams", type=int, default=d.beams)
    a("--seed", type=int, default=d.seed)
    a("--skip-bad", action="store_true", help="skip (and report) malformed lines instead of stopping")
    a("--resume", action="store_true", help="continue from OUT/last")
    a("--stop-after", type=int, help="stop after this step as an interruption would (resume later)")
    a("--log-every", type=int, default=d.log_every)
    a("--device", help="default: cuda (cuda:LOCAL_RANK under torchrun) when available, else cpu")
    a("--no-progress", dest="progress", action="store_false", help="no progress bar")
    return p
