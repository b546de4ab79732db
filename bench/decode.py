"""Decode benchmark in the PARA paper's Table-4 method: prompt 274 tokens, 32 new tokens, batch 1.

    python bench/decode.py [--runs 5] [--beams 1 3] [--methods base para ia3 lora mixed] [--batch 1 8]
                           [--tenants 8] [--device cpu|cuda] [--dtype float32|bfloat16|float16]
                           [--model default|DIR|FILE.gguf] [--backend auto] [--compile]
                           [--peers transformers llamacpp | --no-peers]
                           [--json out.json] [--plot out.png] [--quick]

Methods run on fresh adapters (PARA r=12 on q/v/u, (IA)³ on k/v/down, LoRA r=8 on q/v, unmerged);
"mixed" gives the requests of a batch base, PARA, (IA)³ and LoRA in turn. `--tenants N` adds three
parallama rows (N requests with N different PARA adapters in one batch, the same batch with one
adapter, the N requests one after another) and the peft peer of the first (N LoRA adapters on one
PeftModel, one mixed batch through `adapter_names`) against the same batch on the plain model.

tokens/s = new tokens / wall time including prefill (the paper's figure); decode tok/s excludes
the prefill: parallama times the engine's pure decode steps, the peers (transformers `generate` on
the same weights, peft LoRA / (IA)³ on that model) the steps inside `generate` (a no-op logits
processor notes when each step's logits arrive). prefill tok/s = prompt tokens / time to the first token in
every row (parallama: `Request.first_token_time`; transformers: a 1-token generate; llama.cpp: the first eval).
llama.cpp (base, beams 1, batch 1, CPU) runs GGUFs of the exact weights (F32, and the run's 16-bit type)
written to a temp dir, timed like the engine's steps and interleaved with the parallama rows of its setting.
Every row reports the median of --runs after a warm-up (parallama rows of one beams × batch setting, and
the tenant rows, are run interleaved, round by round, so a drifting machine shifts them alike), the peak
memory growth around its set-up and warm-up run, and its KV bytes; the machine's memory bandwidth is
measured before and after the runs and each row's decode bytes/s is reported as a fraction of it. A
summary lists the issue's targets as ratios.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import math
import platform
import re
import shutil
import sys
import time
import warnings
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch

# the repo root ahead of bench/ (a script's own folder): `bench.*` imports as a package, and `kernels` is the
# kernels/ package, not bench/kernels.py
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench import llamacpp  # noqa: E402
from bench.measure import (  # noqa: E402
    bandwidth_buffer_bytes,
    bandwidth_summary,
    l3_bytes,
    measure_bandwidth,
    weight_bytes,
)
from bench.opcount import budget_targets, decode_step_ops  # noqa: E402
from bench.parallama_rows import (  # noqa: E402
    METHODS,
    Case,
    CompiledStep,
    ParallamaCase,
    kv_memory_ragged,
    run_interleaved,
    tenant_adapters,
)
from bench.peers import HFCase, bench_hf, load_hf_peer, peft_model  # noqa: E402
from bench.report import PREFILL_GOAL, add_roof, find, format_summary, format_table, plot, summarize  # noqa: E402
from bench.step_profile import (  # noqa: E402
    decode_profile,
    format_profile,
    prefill_flops,
    prefill_profile,
    prefill_remaining,
    remaining,
)
from infer.engine import Engine  # noqa: E402
from infer.sampling import SamplingParams  # noqa: E402
from model import Llama  # noqa: E402
from model.peft import PARAConfig, create_adapter  # noqa: E402

TEXT = (
    "The history of science is the study of the development of science and scientific knowledge, including both "
    "the natural and social sciences. Science is a body of empirical, theoretical, and practical knowledge about "
    "the natural world, produced by scientists who emphasize the observation, explanation, and prediction of "
    "real-world phenomena. "
)
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
PEERS = ("transformers", "llamacpp")

_T0 = time.perf_counter()


def log(msg: str) -> None:
    """Progress on stderr (stdout holds the table), stamped with the seconds since start."""
    print(f"[{time.perf_counter() - _T0:6.1f}s] {msg}", file=sys.stderr, flush=True)


def make_prompt(tokenizer: Any, n: int) -> list[int]:
    ids: list[int] = []
    while len(ids) < n:
        ids += tokenizer.encode(TEXT, bos=False)
    return ids[:n]


# ---- main ------------------------------------------------------------------------------------------------------


def machine_info(device: str, dtype: str, backend: str) -> dict[str, Any]:
    info: dict[str, Any] = {
        "python": platform.python_version(),
        "torch": torch.__version__,
        "cpu": platform.processor(),
        "threads": torch.get_num_threads(),
        "device": device,
        "dtype": dtype,
        "backend": backend,
        "compilers": {c: shutil.which(c) for c in ("gcc", "g++", "cc")},
    }
    try:
        m = re.search(r"^model name\s*:\s*(.+)$", Path("/proc/cpuinfo").read_text(), re.M)
        info["cpu"] = m.group(1).strip() if m else info["cpu"]
    except OSError:
        pass
    if device == "cuda":
        info["gpu"] = torch.cuda.get_device_name()
    for lib in ("transformers", "peft", "llama_cpp"):
        try:
            info[lib] = __import__(lib).__version__
        except ImportError:
            pass
    return info


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--runs", type=int, default=5, help="measured runs per row (median), after one warm-up")
    ap.add_argument("--prompt-len", type=int, default=274)
    ap.add_argument("--new-tokens", type=int, default=32)
    ap.add_argument("--beams", type=int, nargs="+", default=[1])
    ap.add_argument("--methods", nargs="+", default=["base"], choices=[*METHODS, "mixed"])
    ap.add_argument("--batch", type=int, nargs="+", default=[1], help="requests generated together")
    ap.add_argument("--tenants", type=int, default=0, help="N requests with N different PARA adapters (0: off)")
    ap.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    ap.add_argument("--dtype", default="float32", choices=list(DTYPES))
    ap.add_argument("--model", default="default", help="default | a Meta or HF directory | a .gguf file")
    ap.add_argument("--backend", default="auto", help="auto | torch | cpu | triton (kernels/ops.py)")
    ap.add_argument("--compile", action="store_true", help="run the engine's step through torch.compile")
    ap.add_argument(
        "--peers",
        nargs="*",
        default=list(PEERS),
        choices=PEERS,
        help="peers to run: transformers (and peft), llamacpp (default both; none given: parallama only)",
    )
    ap.add_argument("--no-peers", action="store_true", help="parallama only (= --peers with none)")
    ap.add_argument("--json", type=Path, help="write the results here")
    ap.add_argument("--plot", type=Path, help="bar chart of the rows (needs matplotlib)")
    ap.add_argument("--quick", action="store_true", help="base and PARA vs the peers, beams 1, batch 1, 3 runs")
    a = ap.parse_args(argv)
    if a.no_peers:
        a.peers = []
    if a.quick:
        a.runs, a.beams, a.batch, a.methods = 3, [1], [1], ["base", "para"]
    if a.device == "cuda" and not torch.cuda.is_available():
        ap.error("--device cuda: CUDA is not available to this torch build / machine")
    if a.tenants == 1 or a.tenants < 0:
        ap.error("--tenants needs N >= 2 (0 = off)")
    if min(a.runs, *a.beams, *a.batch, a.prompt_len, a.new_tokens) < 1:
        ap.error("--runs, --beams, --batch, --prompt-len and --new-tokens must be >= 1")
    return a


def main(argv: Sequence[str] | None = None) -> int:
    a = parse_args(argv)
    warnings.filterwarnings("ignore", category=FutureWarning)  # transformers / peft deprecation notes, not results
    torch.manual_seed(0)
    log(f"loading {a.model} ({a.dtype}, {a.device}, backend {a.backend})")
    model = Llama.from_pretrained(a.model, dtype=DTYPES[a.dtype], device=a.device, backend=a.backend)
    model.requires_grad_(False)
    ids = make_prompt(model.tokenizer, a.prompt_len)
    machine = machine_info(a.device, a.dtype, model.ops.backend)
    step: CompiledStep | None = None
    if a.compile:
        if a.device == "cpu" and not any(machine["compilers"].values()):
            log("--compile: no C++ compiler (gcc/g++/cc) found; inductor will likely fail and fall back")
        step = CompiledStep(model)
        model.forward_step = step  # set on the instance: the engine calls model.forward_step

    # one short generation first: the weights' first-touch page faults (they are mmapped), thread pools and,
    # with --compile, the compilation then count for no row
    log("warm-up generation" + (" (compiling)" if step else ""))
    Engine(model, num_blocks=math.ceil((len(ids) + 2) / 16) + 1).generate(
        [ids], SamplingParams(max_new_tokens=2, ignore_eos=True)
    )
    log("op budget of a decode step (base, PARA)")
    ops = {}
    for method in ("base", "para"):
        engine = Engine(model, num_blocks=math.ceil((len(ids) + 4) / 16) + 1)
        if method == "para":
            engine.add_adapter("para", create_adapter(model, PARAConfig()))
        params = SamplingParams(max_new_tokens=3, ignore_eos=True)
        ops[method] = decode_step_ops(engine, ids, params, adapter=None if method == "base" else "para")
    log("time by op of a decode step (base)")
    profile = decode_profile(
        Engine(model, num_blocks=math.ceil((len(ids) + 17) / 16) + 1),
        ids,
        SamplingParams(max_new_tokens=17, ignore_eos=True),
    )
    log("time by op of a prefill (base)")
    pre_profile = prefill_profile(Engine(model, num_blocks=math.ceil((len(ids) + 1) / 16) + 1), ids)
    weights = weight_bytes(model)
    bw_bytes = bandwidth_buffer_bytes(weights, None if a.device == "cuda" else l3_bytes())
    log(f"memory bandwidth before the runs ({bw_bytes / 2**20:.0f} MiB buffer)")
    bw_before = measure_bandwidth(a.device, bw_bytes)

    rows: list[dict[str, Any]] = []
    no_llamacpp = llamacpp.skip_reason(a)
    if no_llamacpp:
        log(no_llamacpp)
    elif len(a.beams) > 1 or len(a.batch) > 1 or len(a.methods) > 1 or a.tenants:
        log("llama.cpp: base at beams 1, batch 1 only (no beam search, batching or adapters through its binding)")

    def add(r: dict[str, Any]) -> None:
        rows.append(r)
        log(
            f"  -> {r['tps']:.1f} tok/s, decode {r['decode_tps']:.1f}, prefill {r['prefill_tps']:.0f}, "
            f"peak +{r['peak_mem_mib']:.0f} MiB"
        )

    hf, why = (
        (None, "transformers peers off (--peers without transformers, or --no-peers)")
        if "transformers" not in a.peers
        else load_hf_peer(a.model, DTYPES[a.dtype], a.device)
    )
    for beams in a.beams:
        for batch in a.batch:
            methods = [m for m in a.methods if not (m == "mixed" and batch < len(METHODS))]  # mixed: one per method
            log(f"parallama {', '.join(methods)} beams={beams} batch={batch} ({a.runs} interleaved runs)")
            cases: list[Case] = [ParallamaCase(model, ids, a.new_tokens, beams, m, batch) for m in methods]
            with contextlib.ExitStack() as stack:
                if not no_llamacpp and beams == batch == 1 and "base" in methods:
                    types = llamacpp.gguf_types(DTYPES[a.dtype])
                    log(f"llama.cpp {', '.join(types)}: GGUFs of these weights, timed in the same rounds")
                    tok = llamacpp.tokenizer_gguf(a.model)
                    cases += stack.enter_context(llamacpp.cases(model, ids, a.new_tokens, DTYPES[a.dtype], tok))
                if hf is not None and beams == batch == 1 and "base" in methods:
                    log("transformers base: timed in the same rounds")
                    cases.append(HFCase(hf, ids, a.new_tokens, 1, weights=weights))
                for r in run_interleaved(cases, a.runs):
                    add(r)
        if a.tenants:
            n = a.tenants
            regs = tenant_adapters(model, n)
            log(
                f"parallama tenants: {n} PARA adapters in one batch, one adapter in the same batch, "
                f"{n} sequential runs; beams={beams} ({a.runs} interleaved runs)"
            )
            cases = [
                ParallamaCase(
                    model, ids, a.new_tokens, beams, "para", n, adapters=regs, assign=assign, tenants=t, sequential=seq
                )
                for assign, t, seq in (
                    ([f"para{i}" for i in range(n)], n, False),
                    (["para0"] * n, 1, False),
                    ([f"para{i}" for i in range(n)], n, True),
                )
            ]
            for r in run_interleaved(cases, a.runs):
                add(r)

    if hf is None:
        log(why)
    else:
        try:
            import peft  # noqa: F401

            have_peft = True
        except ImportError:
            have_peft = False
            log("peft is not installed; peft peers skipped")
        for beams in a.beams:
            for batch in a.batch:
                if find(rows, engine="transformers", method="base", beams=beams, batch=batch) is None:
                    log(f"transformers base beams={beams} batch={batch} ({a.runs} runs)")
                    add(bench_hf(hf, ids, a.new_tokens, beams, a.runs, batch=batch, weights=weights))
                for method in ("lora", "ia3"):
                    if method in a.methods and have_peft:
                        log(f"peft {method} beams={beams} batch={batch} ({a.runs} runs)")
                        pm = peft_model(hf, method)
                        add(
                            bench_hf(
                                pm,
                                ids,
                                a.new_tokens,
                                beams,
                                a.runs,
                                batch=batch,
                                engine="peft",
                                method=method,
                                weights=weights,
                            )
                        )
                        hf = pm.unload()  # the plain model again, for the next peer
            if a.tenants:
                n = a.tenants
                if find(rows, engine="transformers", method="base", beams=beams, batch=n) is None:
                    log(f"transformers base beams={beams} batch={n} ({a.runs} runs)")
                    add(bench_hf(hf, ids, a.new_tokens, beams, a.runs, batch=n, weights=weights))
                if have_peft:
                    log(f"peft tenants: {n} LoRA adapters, one mixed batch (adapter_names) beams={beams}")
                    pm = peft_model(hf, "lora", n)
                    kw = {"adapter_names": [f"t{i}" for i in range(n)]}
                    add(
                        bench_hf(
                            pm,
                            ids,
                            a.new_tokens,
                            beams,
                            a.runs,
                            batch=n,
                            engine="peft",
                            method="lora",
                            tenants=n,
                            weights=weights,
                            generate_kwargs=kw,
                        )
                    )
                    hf = pm.unload()
        del hf

    log("paged KV memory of a ragged batch")
    kv = kv_memory_ragged(model, [17, 80, 150, 274, 33], a.new_tokens)
    log("memory bandwidth after the runs")
    bw_after = measure_bandwidth(a.device, bw_bytes)
    bw = bandwidth_summary(bw_before, bw_after)
    bandwidth = bw[bw["used"]]  # the max: the best rate this machine showed in this run
    add_roof(rows, bandwidth)
    if step is not None:
        machine["compile"] = "eager fallback: " + step.error if step.error else "torch.compile (inductor)"

    print(
        f"\n{a.model} {a.dtype} {a.device}, backend {model.ops.backend}, prompt {a.prompt_len}, "
        f"{a.new_tokens} new, median of {a.runs}{', compiled' if step and not step.error else ''}\n"
    )
    print(format_table(rows))
    for beams in a.beams:
        p = find(rows, engine="parallama", method="base", beams=beams, batch=1)
        t = find(rows, engine="transformers", method="base", beams=beams, batch=1)
        if p and t:
            ratios = {k: p[k] / t[k] for k in ("tps", "decode_tps", "prefill_tps")}
            print(
                f"\nbeams={beams}: parallama/transformers tok/s {ratios['tps']:.2f}x, "
                f"decode {ratios['decode_tps']:.2f}x, prefill {ratios['prefill_tps']:.2f}x"
            )
    kind = "copy (read + write)" if a.device == "cuda" else "read"
    print(
        f"\nmeasured {kind} bandwidth {bandwidth:.1f} GB/s (max of {len(bw_before) + len(bw_after)} samples; "
        f"median {bw['median']:.1f}, spread {bw['min']:.1f}-{bw['max']:.1f}; before {bw['before']}, after "
        f"{bw['after']}); weights {weights / 1e6:.0f} MB per decode step -> batch-1 roof "
        f"{bandwidth * 1e9 / weights:.0f} tok/s ('of roof': decode bytes/s over the bandwidth)"
    )
    mib = 1 / 2**20
    print(
        f"\nKV for ragged batch {kv['lens']} + {kv['new_tokens']} new: needed {kv['needed_bytes'] * mib:.1f} MiB, "
        f"paged peak {kv['paged_bytes'] * mib:.1f} MiB ({kv['paged_bytes'] / kv['needed_bytes']:.3f}x), "
        f"contiguous padded-to-longest {kv['contiguous_batch_max_bytes'] * mib:.1f} MiB, "
        f"contiguous max_seq_len {kv['contiguous_max_seq_len_bytes'] * mib:.0f} MiB"
    )
    targets = summarize(rows, kv, a.tenants) + budget_targets(ops, model.ops.backend)
    print("\nTargets (ratios measured in this run; '-' = reported, no goal):\n")
    print(format_summary(targets))
    print(f"\nTime by op of a base decode step (backend {model.ops.backend}):\n")
    print(format_profile(profile))
    peer = find(rows, engine="llama.cpp", gguf_type="F32", method="base", beams=1, batch=1)
    gap = remaining(profile, weights, peer["decode_tps"] if peer else None, "llama.cpp F32")
    print("\nWhat remains:\n" + "\n".join(f"- {line}" for line in gap))
    print(f"\nTime by op of a prefill of {len(ids)} tokens (base, backend {model.ops.backend}):\n")
    print(format_profile(pre_profile, "prefill"))
    hf = find(rows, engine="transformers", method="base", beams=1, batch=1)
    pre_gap = prefill_remaining(
        pre_profile,
        prefill_flops(model, len(ids)),
        hf["prefill_tps"] if hf else None,
        "transformers",
        len(ids),
        PREFILL_GOAL,
    )
    print("\nWhat remains of the prefill:\n" + "\n".join(f"- {line}" for line in pre_gap))
    if a.json:
        a.json.write_text(
            json.dumps(
                {
                    "machine": machine,
                    "bandwidth_gbs": bandwidth,
                    "bandwidth": bw,
                    "rows": rows,
                    "kv_ragged": kv,
                    "ops_per_layer": ops,
                    "decode_profile": profile,
                    "remaining": gap,
                    "prefill_profile": pre_profile,
                    "prefill_remaining": pre_gap,
                    "targets": targets,
                    "args": {k: str(v) if isinstance(v, Path) else v for k, v in vars(a).items()},
                },
                indent=1,
            )
        )
        log(f"wrote {a.json}")
    if a.plot and plot(rows, a.plot):
        log(f"wrote {a.plot}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
