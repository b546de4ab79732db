"""What a fine-tuning run is told (`FinetuneConfig`, checked up front with one-line errors) and what it reports
(`FinetuneResult`, also OUT/result.json); `adapter_config` maps the first to an adapter's config."""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

METHODS = ("para", "lora", "ia3")
DEFAULT_RANK = {"para": 12, "lora": 8}
# each method's default learning rate: bench/lr_sweep.py's pick over lr ∈ {1e-4 .. 1e-2} on two tasks
# (bench/results/lr_sweep_cpu/README.md states the rule and the table)
DEFAULT_LR = {"para": 3e-3, "lora": 1e-2, "ia3": 1e-2}
# answers of a word or two (yes/no, a choice): at DEFAULT_LR the model collapses onto the label prior; the suite
# trains those tasks at these (bench/results/suite_cpu/README.md has the pilots)
SHORT_ANSWER_LR = {"para": 1e-3, "lora": 1e-3, "ia3": 1e-3}


class TrainError(ValueError):
    """A bad argument or setting; the one-line message names it."""


@dataclass
class FinetuneConfig:
    train: str
    dev: str
    out: str
    test: str | None = None
    model: str = "default"  # 'default', a .gguf file, a Meta or HF directory
    method: str = "para"
    chat: bool = False  # wrap prompts in the model's chat template
    r: int | None = None  # PARA / LoRA rank (default 12 / 8)
    lora_alpha: float | None = None  # default: r (scaling 1)
    lora_dropout: float = 0.0
    lora_targets: tuple[str, ...] = ("q_proj", "v_proj")
    lr: float | None = None  # None: DEFAULT_LR[method], resolved by check()
    pool_norm: bool = True  # PARA: VG reads pool / rms(pool); False: the paper's raw pool (--no-pool-norm)
    down_lr_rsqrt: bool = False  # PARA: W_down trained at lr / sqrt(dim) (the other parameters at lr)
    weight_decay: float = 0.0  # not on by default: it would pull PARA's b_up = 1 (the identity) towards 0
    warmup_ratio: float = 0.06
    epochs: int = 10
    batch_size: int = 16
    grad_accum: int = 1
    max_grad_norm: float = 1.0  # 0 = no clipping
    max_steps: int | None = None
    eval_every: int = 200
    patience: int = 10
    diverge_patience: int = 2  # evals in a row with dev loss above the step-0 one that count as divergence
    eval_batch_size: int | None = None  # default: batch_size
    max_len: int | None = None  # default: the model's max_seq_len
    max_new_tokens: int | None = None  # test generation; default: the longest test response (+ eos)
    beams: int = 3
    seed: int = 0
    skip_bad: bool = False
    resume: bool = False
    stop_after: int | None = None
    log_every: int = 10
    device: str | None = None  # default: cuda:LOCAL_RANK if available, else cpu
    progress: bool = True

    def check(self) -> None:
        if self.method not in METHODS:
            raise TrainError(f"--method {self.method!r} is unknown (choose one of {', '.join(METHODS)})")
        if self.method == "ia3" and self.r is not None:
            raise TrainError("--r does not apply to --method ia3 (it has no rank)")
        if self.method != "para" and (not self.pool_norm or self.down_lr_rsqrt):
            flag = "--no-pool-norm" if not self.pool_norm else "--down-lr-rsqrt"
            raise TrainError(f"{flag} applies to --method para only, not {self.method}")
        if self.lr is None:
            self.lr = DEFAULT_LR[self.method]
        positive = ("lr", "epochs", "batch_size", "grad_accum", "eval_every", "patience", "diverge_patience")
        positive += ("beams", "log_every")
        optional = ("r", "max_steps", "eval_batch_size", "max_len", "max_new_tokens", "stop_after", "lora_alpha")
        for name in positive + optional:
            v = getattr(self, name)
            if (v is not None or name in positive) and not v > 0:
                raise TrainError(f"--{name.replace('_', '-')} must be positive, got {v}")
        if not 0 <= self.warmup_ratio < 1:
            raise TrainError(f"--warmup-ratio must lie in [0, 1), got {self.warmup_ratio}")
        if self.weight_decay < 0 or self.max_grad_norm < 0:
            raise TrainError("--weight-decay and --max-grad-norm must be >= 0")


# settings that shape the training trajectory: a resumed run must share them
TRAJECTORY = (
    "method",
    "chat",
    "r",
    "lora_alpha",
    "lora_dropout",
    "lora_targets",
    "lr",
    "pool_norm",
    "down_lr_rsqrt",
    "weight_decay",
    "warmup_ratio",
    "epochs",
    "batch_size",
    "grad_accum",
    "max_grad_norm",
    "max_steps",
    "eval_every",
    "patience",
    "eval_batch_size",
    "max_len",
    "seed",
)


@dataclass
class FinetuneResult:
    out: str
    method: str
    num_trainable: int
    steps: int  # optimizer steps done
    total_steps: int  # the schedule's length
    initial_dev_loss: float
    best_dev_loss: float
    best_step: int
    stopped_early: bool
    interrupted: bool  # stopped by --stop-after: resume with --resume
    train_seconds: float
    tokens_per_second: float
    test_metric: str | None = None
    test_score: float | None = None
    n_test: int = 0
    world_size: int = 1  # processes that trained together
    diverged: bool = False  # stopped by divergence (see diverge_reason)
    diverge_reason: str | None = None  # e.g. "dev loss 17.4 > initial 6.46 for 2 evaluations"
    improved: bool = False  # some step beat the step-0 dev loss (best_step > 0)
    lr: float | None = None  # the peak learning rate the run trained at


def adapter_config(config: FinetuneConfig) -> Any:
    """The model.peft config of the chosen method."""
    from model.peft import IA3Config, LoRAConfig, PARAConfig

    try:
        if config.method == "para":
            return PARAConfig(r=config.r or DEFAULT_RANK["para"], pool_norm=config.pool_norm)
        if config.method == "lora":
            r = config.r or DEFAULT_RANK["lora"]
            return LoRAConfig(
                r=r,
                lora_alpha=config.lora_alpha or r,
                lora_dropout=config.lora_dropout,
                target_modules=tuple(config.lora_targets),
            )
        return IA3Config()
    except ValueError as e:
        raise TrainError(str(e)) from None


def optimizer_groups(config: FinetuneConfig, adapter: Any) -> list[dict[str, Any]]:
    """AdamW parameter groups: one at config.lr, plus PARA's W_down at lr / sqrt(dim) with --down-lr-rsqrt."""
    if not config.down_lr_rsqrt:
        return [{"params": adapter.trainable_parameters()}]
    named = [(n, p) for n, p in adapter.named_parameters() if p.requires_grad]
    down = [p for n, p in named if n.endswith("para.down.weight")]
    rest = [p for n, p in named if not n.endswith("para.down.weight")]
    assert config.lr is not None
    return [{"params": rest}, {"params": down, "lr": config.lr / math.sqrt(adapter.args.dim)}]
