"""Why PARA's paper form diverges: per-layer pooled-input norms, pre-activation spread, |l - 1| and per-group
gradient norms along the first optimizer steps, for the paper's raw pool and the RMS-normalised pool
(and, with --down-lr-rsqrt, the normalised pool with W_down trained at lr / sqrt(dim)).

    python -m bench.para_norms --task hsm --lr 3e-3 --steps 10 --out bench/results/lr_sweep_cpu/para_norms.json

The forms start from the same init (seed), see the same batches as `train.finetune` (its length-grouped
order and its warm-up / linear-decay schedule over `--total-steps`), and take AdamW steps with gradient
clipping at 1.0. Per step and per layer: the RMS of the pooled layer input (the raw residual stream at each
row's last prompt token, mean over the batch), the std of VG's pre-activation pool_used · W_downᵀ,
max |l - 1| over the batch's rows and vector entries (after the previous step's update: step 0 is the
identity), and the gradient norms of W_down, W_up and b_up before clipping. JSON out; a summary on stdout.
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


def measure(model: Any, examples: list[Any], pool_norm: bool, down_lr_rsqrt: bool, a: argparse.Namespace) -> dict:
    from model.peft import PARAConfig, create_adapter
    from train.config import FinetuneConfig, optimizer_groups
    from train.data import collate, length_grouped_batches
    from train.evaluate import batch_loss
    from train.finetune import linear_schedule

    torch.manual_seed(a.seed)  # the same init as train.finetune's seed
    adapter = create_adapter(model, PARAConfig(pool_norm=pool_norm))
    adapter.train()
    params = adapter.trainable_parameters()
    groups = optimizer_groups(FinetuneConfig("", "", "", lr=a.lr, down_lr_rsqrt=down_lr_rsqrt), adapter)
    opt = torch.optim.AdamW(groups, lr=a.lr, weight_decay=0.0)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, linear_schedule(a.total_steps, math.ceil(0.06 * a.total_steps)))
    order = length_grouped_batches([len(e.ids) for e in examples], a.batch_size, seed=a.seed * 1_000_003)
    n_layers = model.args.n_layers
    seen: dict[int, dict[str, float]] = {}
    scales = adapter.scales

    def recording(i: int, pooled: torch.Tensor | None) -> dict[str, torch.Tensor]:
        out = scales(i, pooled)
        assert pooled is not None
        with torch.no_grad():
            x = pooled.float()
            used = x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + model.args.norm_eps) if pool_norm else x
            vg = adapter.layers[i]["para"]
            seen[i] = {
                "pool_rms": float(x.pow(2).mean(-1).sqrt().mean()),
                "preact_std": float((used @ vg.down.weight.float().T).std()),
                "max_l_dev": max(float((v.float() - 1).abs().max()) for v in out.values()),
            }
        return out

    adapter.scales = recording  # type: ignore[method-assign]
    steps = []
    for step in range(a.steps):
        mb = order[step % len(order)]
        batch = collate([examples[i] for i in mb])
        seen.clear()
        loss = batch_loss(model, adapter, batch) / batch.n_targets
        loss.backward()
        grads = {
            g: [float(getattr(getattr(adapter.layers[i]["para"], m), w).grad.norm()) for i in range(n_layers)]
            for g, m, w in (("W_down", "down", "weight"), ("W_up", "up", "weight"), ("b_up", "up", "bias"))
        }
        total = float(torch.nn.utils.clip_grad_norm_(params, 1.0))
        lr = sched.get_last_lr()[0]
        opt.step()
        sched.step()
        opt.zero_grad(set_to_none=True)
        layers = [seen[i] for i in range(n_layers)]
        steps.append(
            {
                "step": step,
                "lr": lr,
                "loss": float(loss.detach()),
                "grad_norm_total": total,
                "grad_norm": grads,
                "pool_rms": [x["pool_rms"] for x in layers],
                "preact_std": [x["preact_std"] for x in layers],
                "max_l_dev": [x["max_l_dev"] for x in layers],
            }
        )
        worst = max(range(n_layers), key=lambda i: layers[i]["max_l_dev"])
        form = ("norm" if pool_norm else "paper") + ("/rsqrt" if down_lr_rsqrt else "")
        print(
            f"{form:11s} step {step:2d} loss {float(loss):8.4f} |g| {total:9.3g} "
            f"max|l-1| {layers[worst]['max_l_dev']:.4g} (layer {worst})",
            file=sys.stderr,
            flush=True,
        )
    with torch.no_grad():  # after the last update
        batch = collate([examples[i] for i in order[0]])
        seen.clear()
        batch_loss(model, adapter, batch)
        final = [seen[i]["max_l_dev"] for i in range(n_layers)]
    return {"pool_norm": pool_norm, "down_lr_rsqrt": down_lr_rsqrt, "steps": steps, "final_max_l_dev": final}


def summary(result: dict[str, Any]) -> str:
    lines = []
    for name, form in result["forms"].items():
        s0, s1 = form["steps"][0], form["steps"][1] if len(form["steps"]) > 1 else None
        layers = len(s0["pool_rms"])
        pick = sorted({0, layers // 2, layers - 1})
        lines.append(f"{name}: losses " + " ".join(f"{s['loss']:.3g}" for s in form["steps"]))
        for i in pick:
            after1 = f"{s1['max_l_dev'][i]:.3g}" if s1 else "-"
            gd = max(s["grad_norm"]["W_down"][i] for s in form["steps"])
            gu = max(s["grad_norm"]["W_up"][i] for s in form["steps"])
            gb = max(s["grad_norm"]["b_up"][i] for s in form["steps"])
            lines.append(
                f"  layer {i:2d}: pool rms {s0['pool_rms'][i]:.3g}, preact std {s0['preact_std'][i]:.3g}, "
                f"max|l-1| after step 1 {after1}, at the end {form['final_max_l_dev'][i]:.3g}; "
                f"max grad norm W_down {gd:.3g} W_up {gu:.3g} b_up {gb:.3g}"
            )
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m bench.para_norms", description=__doc__.splitlines()[0])
    a = p.add_argument
    a("--model", default="default")
    a("--task", default="hsm")
    a("--n-train", type=int, default=96)
    a("--chat", action=argparse.BooleanOptionalAction, default=False)
    a("--lr", type=float, default=3e-3)
    a("--steps", type=int, default=10)
    a("--total-steps", type=int, default=30, help="the schedule's length (warm-up 6%%, then linear decay)")
    a("--batch-size", type=int, default=8)
    a("--seed", type=int, default=0)
    a("--threads", type=int)
    a("--down-lr-rsqrt", action="store_true", help="also measure pool_norm with W_down at lr / sqrt(dim)")
    a("--work", default="/tmp/para_norms", help="where the task data is generated")
    a("--out", default="bench/results/lr_sweep_cpu/para_norms.json")
    args = p.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    from model import Llama
    from train.data import load_dataset
    from train.tasks import TASKS

    paths = TASKS[args.task].generate(Path(args.work) / args.task, 0, args.n_train, 16, 1)
    model = Llama.from_pretrained(args.model)
    examples = load_dataset(paths["train"], model.tokenizer, chat=args.chat, max_len=model.args.max_seq_len).examples
    t0 = time.perf_counter()
    todo = [("paper", False, False), ("pool_norm", True, False)]
    if args.down_lr_rsqrt:
        todo.append(("pool_norm_down_lr_rsqrt", True, True))
    forms = {name: measure(model, examples, norm, down, args) for name, norm, down in todo}
    settings = {k: v for k, v in vars(args).items() if k not in ("out", "work", "threads")}
    result = {"settings": settings, "wall_seconds": time.perf_counter() - t0, "forms": forms}
    result["summary"] = summary(result)
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(result, indent=1) + "\n")
    print(result["summary"])
    return 0


if __name__ == "__main__":
    sys.exit(main())
