"""The suite's summary: per-cell mean ± std over seeds, the paired per-seed PARA − LoRA difference, where PARA
wins, the markdown table and the bar plot."""

from __future__ import annotations

import statistics
import sys
from pathlib import Path
from typing import Any

LABELS = {"para": "PARA", "lora": "LoRA", "ia3": "(IA)³", "base": "base (zero-shot)"}
TASK_LABELS = {"hsm": "HSM", "q2sql": "Q2SQL", "squad": "SQuAD", "boolq": "BoolQ", "copa": "COPA"}


def cell_stats(runs: list[dict[str, Any]]) -> dict[str, dict[str, dict[str, Any]]]:
    """{method: {task: {"mean", "std", "median", "n", "scores"}}} over finished runs with a test score (std: the
    sample std, n − 1; 0.0 for one seed)."""
    cells: dict[str, dict[str, list[float]]] = {}
    for r in runs:
        if r.get("test_score") is not None:
            cells.setdefault(r["method"], {}).setdefault(r["task"], []).append(r["test_score"])
    return {
        m: {t: _stats(s) | {"median": statistics.median(s)} for t, s in by_task.items()} for m, by_task in cells.items()
    }


def _stats(xs: list[float]) -> dict[str, Any]:
    return {
        "mean": statistics.fmean(xs),
        "std": statistics.stdev(xs) if len(xs) > 1 else 0.0,
        "n": len(xs),
        "scores": xs,
    }


def paired(runs: list[dict[str, Any]], a: str = "para", b: str = "lora") -> dict[str, dict[str, Any]]:
    """{task: {"mean", "std", "n", "scores", "seeds", "wins"}} of the per-seed difference a − b of test scores,
    over the seeds where both finished (same seed, same data: the difference cancels what the seed shares);
    wins: on how many of those seeds a ≥ b."""
    score = {(r["method"], r["task"], r["seed"]): r["test_score"] for r in runs if r.get("test_score") is not None}
    out: dict[str, dict[str, Any]] = {}
    for task in dict.fromkeys(r["task"] for r in runs):
        seeds = sorted(s for m, t, s in score if m == a and t == task and (b, task, s) in score)
        if seeds:
            diffs = [score[a, task, s] - score[b, task, s] for s in seeds]
            out[task] = _stats(diffs) | {"seeds": seeds, "wins": sum(d >= 0 for d in diffs)}
    return out


def para_wins(cells: dict[str, dict[str, dict[str, Any]]], tasks: list[str]) -> list[str]:
    """Tasks where PARA's mean is >= every other fine-tuned method's that was run."""
    others = [m for m in ("lora", "ia3") if m in cells]
    wins = []
    for t in tasks:
        para = cells.get("para", {}).get(t)
        if para is not None and others and all(t in cells[m] and para["mean"] >= cells[m][t]["mean"] for m in others):
            wins.append(t)
    return wins


def format_table(summary: dict[str, Any]) -> str:
    """Markdown: one row per method (base first), #params, one column per task (mean ± std %, seeds if fewer),
    then PARA − LoRA per seed when both ran."""
    tasks, seeds = summary["tasks"], summary["seeds"]
    head = "| Method | #Params | " + " | ".join(TASK_LABELS.get(t, t) for t in tasks) + " |"
    lines = [head, "|" + "---|" * (len(tasks) + 2)]
    if summary.get("zero_shot"):
        zs = summary["zero_shot"]
        lines.append(f"| {LABELS['base']} | 0 | " + " | ".join(_pct(zs.get(t)) for t in tasks) + " |")
    for m in ("ia3", "lora", "para"):
        if m not in summary["methods"]:
            continue
        b = summary["budgets"][m]
        label = LABELS[m] + (f" (r={b['r']})" if b["r"] is not None else "")
        cells = summary["cells"].get(m, {})
        row = []
        for t in tasks:
            c = cells.get(t)
            row.append("–" if c is None else _spread(c) + ("" if c["n"] == seeds else f" ({c['n']}/{seeds})"))
        lines.append(f"| {label} | {_count(b['params'])} | " + " | ".join(row) + " |")
    diff = summary.get("paired") or {}
    if diff:
        row = [
            ("–" if t not in diff else _spread(diff[t], sign=True) + f" ({diff[t]['wins']}/{diff[t]['n']})")
            for t in tasks
        ]
        lines.append("| PARA − LoRA, per seed | | " + " | ".join(row) + " |")
    note = f"\nTest score ×100, mean ± std (sample) over {seeds} seed(s); (k/{seeds}): only k seeds finished."
    if diff:
        note += "\nPARA − LoRA: the per-seed difference (same seed, same data), mean ± std; "
        note += "(w/n): PARA ≥ LoRA on w of n seeds."
    return "\n".join(lines) + "\n" + note + "\n"


def _spread(c: dict[str, Any], sign: bool = False) -> str:
    mean = f"{100 * c['mean']:+.1f}" if sign else _pct(c["mean"])
    return mean if c["n"] < 2 else f"{mean} ± {100 * c['std']:.1f}"


def _pct(x: float | None) -> str:
    return "–" if x is None else f"{100 * x:.1f}"


def _count(n: int) -> str:
    return f"{n / 1e6:.2f}M" if n >= 100_000 else f"{n / 1e3:.1f}K"


def plot(summary: dict[str, Any], path: Path) -> bool:
    """Grouped bars per task (base and each method); False (with a message) when matplotlib is missing."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print("matplotlib is not importable: no plot written", file=sys.stderr)
        return False
    tasks = summary["tasks"]
    series = ([("base", summary["zero_shot"])] if summary.get("zero_shot") else []) + [
        (m, {t: c["mean"] for t, c in summary["cells"].get(m, {}).items()}) for m in summary["methods"]
    ]
    width = 0.8 / max(1, len(series))
    fig, ax = plt.subplots(figsize=(1.6 * len(tasks) + 2, 3.5))
    for k, (name, scores) in enumerate(series):
        xs = [i + (k - (len(series) - 1) / 2) * width for i in range(len(tasks))]
        ax.bar(xs, [100 * (scores.get(t) or 0.0) for t in tasks], width, label=LABELS.get(name, name))
    ax.set_xticks(range(len(tasks)), [TASK_LABELS.get(t, t) for t in tasks])
    ax.set_ylabel(f"test score (mean of {summary['seeds']} seeds)")
    ax.set_ylim(0, 100)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return True
