"""Rows, targets and reports of the decode benchmark: one result row per engine × method × setting in the
JSON schema other tools read (`ROW_SCHEMA`), the issue's targets as measured ratios (`summarize`; rows timed
in the same interleaved rounds compare round by round), the Markdown tables and the optional bar chart.
"""

from __future__ import annotations

import statistics
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Any

ROOF_GOAL = 0.85  # batch-1 decode bytes/s over the measured bandwidth

# The JSON schema other tools read: every row carries these keys with these types (extra keys are allowed).
ROW_SCHEMA: dict[str, type] = {
    "engine": str,
    "method": str,
    "beams": int,
    "batch": int,
    "tenants": int,
    "prompt_len": int,
    "new_tokens": int,
    "tps": float,
    "decode_tps": float,
    "prefill_tps": float,
    "peak_mem_mib": float,
    "kv_bytes": int,
}
MPL_MISSING = "matplotlib is not installed; skipping --plot"


def row(
    engine: str,
    method: str,
    *,
    beams: int,
    batch: int,
    prompt_len: int,
    new_tokens: int,
    t_total: float,
    t_prefill: float,
    kv_bytes: int,
    peak_mem_mib: float,
    tenants: int = 1,
    requests: int | None = None,
    mode: str = "batched",
    decode_tps: float | None = None,
    prefill_tps: float | None = None,
) -> dict[str, Any]:
    """One result row in the JSON schema (ROW_SCHEMA keys first).

    `requests` requests (default: batch) of new_tokens each took t_total, of which t_prefill was the
    prefill; decode/prefill tok/s default to what those two times imply (measured figures override them).
    mode: "batched" (the requests ran together) or "sequential" (one after another, batch 1 each).
    """
    n = batch if requests is None else requests
    return {
        "engine": engine,
        "method": method,
        "beams": int(beams),
        "batch": int(batch),
        "tenants": int(tenants),
        "prompt_len": int(prompt_len),
        "new_tokens": int(new_tokens),
        "tps": float(n * new_tokens / t_total),
        "decode_tps": float(
            decode_tps if decode_tps is not None else n * (new_tokens - 1) / max(t_total - t_prefill, 1e-9)
        ),
        "prefill_tps": float(prefill_tps if prefill_tps is not None else n * prompt_len / t_prefill),
        "peak_mem_mib": float(peak_mem_mib),
        "kv_bytes": int(kv_bytes),
        "requests": int(n),
        "mode": mode,
    }


def add_roof(rows: Iterable[dict[str, Any]], bandwidth_gbs: float) -> None:
    """roof_frac = the decode bytes/s a row achieved over the measured bandwidth (where decode_gbs is known)."""
    for r in rows:
        if "decode_gbs" in r and bandwidth_gbs > 0:
            r["roof_frac"] = r["decode_gbs"] / bandwidth_gbs


def find(rows: Sequence[dict[str, Any]], **keys: Any) -> dict[str, Any] | None:
    """The first row whose fields equal `keys`; tenants=1 and mode="batched" unless given."""
    want = {"tenants": 1, "mode": "batched", **keys}
    return next((r for r in rows if all(r.get(k) == v for k, v in want.items())), None)


def _target(
    name: str, num: dict | None, den: dict | None, key: str, goal: float | None, at_most: bool = False
) -> dict[str, Any] | None:
    """num[key] / den[key] against the goal. Rows timed in the same interleaved rounds (both carry
    `runs_{key}` of one length) give the median of the per-round ratios instead ("paired"): each round's
    two runs were back to back, so the machine's drift between rounds cancels."""
    if num is None or den is None or not den[key]:
        return None
    a, b = num.get(f"runs_{key}"), den.get(f"runs_{key}")
    paired = bool(a and b and len(a) == len(b) and all(b))
    ratio = statistics.median(x / y for x, y in zip(a, b)) if paired else num[key] / den[key]
    met = None if goal is None else (ratio <= goal if at_most else ratio >= goal)
    return {"target": name, "ratio": ratio, "goal": goal, "at_most": at_most, "met": met, "paired": paired}


PREFILL_GOAL = 1.2  # parallama prefill tok/s over transformers' (issue 16)


def summarize(
    rows: Sequence[dict[str, Any]], kv: dict[str, Any] | None = None, tenants: int = 0
) -> list[dict[str, Any]]:
    """The issue's targets as measured ratios, each {"target", "ratio", "goal", "at_most", "met"}; only
    targets whose rows were run appear. goal None marks an informational ratio (met None)."""
    out: list[dict[str, Any] | None] = []
    beams_seen = sorted({r["beams"] for r in rows})
    batches = sorted({r["batch"] for r in rows})
    for b in beams_seen:
        p = find(rows, engine="parallama", method="base", beams=b, batch=1)
        t = find(rows, engine="transformers", method="base", beams=b, batch=1)
        out.append(_target(f"decode tok/s vs transformers (beams {b})", p, t, "decode_tps", 2.5))
        out.append(_target(f"prefill tok/s vs transformers (beams {b})", p, t, "prefill_tps", PREFILL_GOAL))
        out.append(_target(f"tok/s vs transformers (beams {b})", p, t, "tps", None))
        if b == 1 and p is not None and "roof_frac" in p:
            rf = p["roof_frac"]
            out.append(
                {
                    "target": "decode bandwidth / measured roof (beams 1, batch 1)",
                    "ratio": rf,
                    "goal": ROOF_GOAL,
                    "at_most": False,
                    "met": rf >= ROOF_GOAL,
                }
            )
        if b == 1:  # llama.cpp runs beams 1, batch 1: goals against its F32 file, its 16-bit file reported
            for ftype in sorted({r.get("gguf_type", "") for r in rows if r["engine"] == "llama.cpp"}):
                lc = find(rows, engine="llama.cpp", method="base", beams=1, batch=1, gguf_type=ftype)
                goal = 1.0 if ftype == "F32" else None
                where = f"llama.cpp {ftype} (beams 1, batch 1)"
                out.append(_target(f"decode tok/s vs {where}", p, lc, "decode_tps", goal))
                out.append(_target(f"prefill tok/s vs {where}", p, lc, "prefill_tps", goal))
                out.append(_target(f"tok/s vs {where}", p, lc, "tps", None))
        for n in batches:
            where = f"beams {b}, batch {n}"
            base, para = (find(rows, engine="parallama", method=m, beams=b, batch=n) for m in ("base", "para"))
            lora, ia3 = (find(rows, engine="parallama", method=m, beams=b, batch=n) for m in ("lora", "ia3"))
            out.append(_target(f"PARA / base tok/s ({where})", para, base, "tps", 0.98))
            out.append(_target(f"PARA / LoRA-unmerged tok/s ({where})", para, lora, "tps", 1.25))
            for m, mine in (("lora", lora), ("ia3", ia3)):
                theirs = find(rows, engine="peft", method=m, beams=b, batch=n)
                out.append(_target(f"parallama / peft {m} tok/s ({where})", mine, theirs, "tps", None))
    if tenants > 1:
        for b in beams_seen:
            where = f"{tenants} tenants, beams {b}"
            mixed = find(rows, engine="parallama", method="para", beams=b, batch=tenants, tenants=tenants)
            one = find(rows, engine="parallama", method="para", beams=b, batch=tenants)
            seq = find(rows, engine="parallama", method="para", beams=b, tenants=tenants, mode="sequential")
            peft_mixed = find(rows, engine="peft", method="lora", beams=b, batch=tenants, tenants=tenants)
            hf_base = find(rows, engine="transformers", method="base", beams=b, batch=tenants)
            out.append(_target(f"{where}: {tenants} PARA adapters / one adapter tok/s", mixed, one, "tps", 0.95))
            out.append(_target(f"{where}: parallama mixed PARA / peft mixed LoRA tok/s", mixed, peft_mixed, "tps", 3))
            out.append(_target(f"{where}: peft mixed LoRA / its base batch tok/s", peft_mixed, hf_base, "tps", None))
            out.append(_target(f"{where}: one batch / {tenants} sequential runs tok/s", mixed, seq, "tps", None))
    if kv:
        out.append(
            {
                "target": "paged KV bytes / bytes the tokens need (ragged batch)",
                "ratio": kv["paged_bytes"] / kv["needed_bytes"],
                "goal": 1.05,
                "at_most": True,
                "met": kv["paged_bytes"] <= 1.05 * kv["needed_bytes"],
            }
        )
    return [t for t in out if t is not None]


def format_summary(targets: Sequence[dict[str, Any]]) -> str:
    lines = ["| target | measured | goal | |", "|---|---|---|---|"]
    for t in targets:
        goal = "-" if t["goal"] is None else f"{'≤' if t['at_most'] else '≥'} {t['goal']:g}"
        met = "-" if t["met"] is None else "met" if t["met"] else "not met"
        how = " (median of per-round ratios)" if t.get("paired") else ""
        lines.append(f"| {t['target']} | {t['ratio']:.3f}{how} | {goal} | {met} |")
    return "\n".join(lines)


def engine_label(r: dict[str, Any]) -> str:
    """The engine, and for llama.cpp's rows the file type they ran (F32, F16, BF16)."""
    return f"{r['engine']} {r['gguf_type']}" if "gguf_type" in r else r["engine"]


def format_table(rows: Sequence[dict[str, Any]]) -> str:
    lines = [
        "| engine | method | beams | batch | tenants | mode | tok/s | decode tok/s | prefill tok/s | peak MiB "
        "| KV MiB | decode vs base | of roof |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        base_engine = "transformers" if r["engine"] == "peft" else r["engine"]
        # llama.cpp's rows differ by file type (gguf_type; None on the other engines' rows)
        b = find(
            rows, engine=base_engine, method="base", beams=r["beams"], batch=r["batch"], gguf_type=r.get("gguf_type")
        )
        rel = f"{r['decode_tps'] / b['decode_tps']:.3f}x" if b and b["decode_tps"] and r["mode"] == "batched" else "-"
        roof = f"{r['roof_frac']:.0%}" if "roof_frac" in r else "-"
        lines.append(
            f"| {engine_label(r)} | {r['method']} | {r['beams']} | {r['batch']} | {r['tenants']} | {r['mode']} "
            f"| {r['tps']:.1f} | {r['decode_tps']:.1f} | {r['prefill_tps']:.0f} | {r['peak_mem_mib']:.0f} "
            f"| {r['kv_bytes'] / 2**20:.1f} | {rel} | {roof} |"
        )
    return "\n".join(lines)


def plot(rows: Sequence[dict[str, Any]], path: Path) -> bool:
    """A bar chart of tok/s and decode tok/s per row; matplotlib is optional (imported only here)."""
    try:
        import matplotlib

        matplotlib.use("Agg")  # no display needed
        import matplotlib.pyplot as plt
    except ImportError:
        print(MPL_MISSING)
        return False
    labels = [
        f"{engine_label(r)} {r['method']}\nbeams {r['beams']} batch {r['batch']}"
        + (f"\n{r['tenants']} tenants" if r["tenants"] > 1 else "")
        + (" seq" if r["mode"] == "sequential" else "")
        for r in rows
    ]
    x = range(len(rows))
    fig, ax = plt.subplots(figsize=(max(6.0, 1.1 * len(rows)), 4.5))
    ax.bar([i - 0.2 for i in x], [r["tps"] for r in rows], 0.4, label="tok/s (incl. prefill)")
    ax.bar([i + 0.2 for i in x], [r["decode_tps"] for r in rows], 0.4, label="decode tok/s")
    ax.set_xticks(list(x), labels, rotation=40, ha="right", fontsize=7)
    ax.set_ylabel("tokens / s")
    ax.set_title(f"decode benchmark: prompt {rows[0]['prompt_len']}, {rows[0]['new_tokens']} new")
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return True
