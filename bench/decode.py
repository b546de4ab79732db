"""Decode benchmark in the PARA paper's Table-4 method: prompt 274 tokens, 32 new tokens, batch 1.

    python bench/decode.py [--runs 5] [--beams 1 3] [--methods base para ia3 lora] [--batch 1 8] [--json out.json]

Methods run on fresh adapters (PARA r=12 on q/v/u, (IA)³ on k/v/down, LoRA r=8 on q/v, unmerged);
"mixed" gives the requests of a batch base, PARA, (IA)³ and LoRA in turn.

tokens/s = new tokens / wall time including prefill (the paper's figure); decode tok/s excludes
the prefill, timed separately as a 1-token generation. Peers run in the same process on the same
weights: transformers `generate` on the same GGUF. Reports the median of --runs after a warm-up.
"""

from __future__ import annotations

import argparse
import json
import platform
import resource
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from infer.engine import Engine  # noqa: E402
from infer.sampling import SamplingParams  # noqa: E402
from model import Llama  # noqa: E402
from model.peft import IA3Config, LoRAConfig, PARAConfig, create_adapter  # noqa: E402
from weights.default import default_gguf_path  # noqa: E402

TEXT = (
    "The history of science is the study of the development of science and scientific knowledge, including both "
    "the natural and social sciences. Science is a body of empirical, theoretical, and practical knowledge about "
    "the natural world, produced by scientists who emphasize the observation, explanation, and prediction of "
    "real-world phenomena. "
)


def make_prompt(tokenizer, n: int) -> list[int]:
    ids: list[int] = []
    while len(ids) < n:
        ids += tokenizer.encode(TEXT, bos=False)
    return ids[:n]


def measure_bandwidth(mib: int = 256, runs: int = 5) -> float:
    """The machine's streaming read bandwidth in GB/s: median of sums over a buffer far larger than cache."""
    buf = torch.ones(mib * 2**20 // 4)
    t = timed(buf.sum, runs)
    return buf.numel() * 4 / t / 1e9


def bytes_per_decode_step(model: Llama, context: int, rows: int) -> int:
    """What one decode step must read at least: every weight once (tied embeddings once) plus each row's K/V."""
    weights = sum(p.numel() * p.element_size() for p in model.parameters())  # parameters() dedups tied weights
    kv = 2 * model.args.n_layers * model.args.kv_dim * model.tok_embeddings.weight.element_size() * context
    return weights + rows * kv


def peak_rss_mib() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # Linux: KiB


def timed(fn, runs: int) -> float:
    fn()  # warm-up
    times = []
    for _ in range(runs):
        t = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t)
    return statistics.median(times)


METHODS = ("base", "para", "ia3", "lora")


def row(
    engine: str,
    beams: int,
    prompt_len: int,
    new: int,
    t_total: float,
    t_prefill: float,
    kv_bytes: int,
    method: str = "base",
    batch: int = 1,
) -> dict:
    return {
        "engine": engine,
        "method": method,
        "beams": beams,
        "batch": batch,
        "tenants": 1 if method != "mixed" else len(METHODS),
        "prompt_len": prompt_len,
        "new_tokens": new,
        "tps": batch * new / t_total,
        "decode_tps": batch * (new - 1) / max(t_total - t_prefill, 1e-9),
        "prefill_tps": batch * prompt_len / t_prefill,
        "peak_mem_mib": float("nan"),
        "kv_bytes": kv_bytes,
    }


def bench_parallama(
    model: Llama, ids: list[int], new: int, beams: int, runs: int, method: str = "base", batch: int = 1
) -> dict:
    engine = Engine(model, num_blocks=64 * batch * beams, max_batch=max(32, batch * beams))
    configs = {"para": PARAConfig(), "ia3": IA3Config(), "lora": LoRAConfig()}
    for name, cfg in configs.items():
        engine.add_adapter(name, create_adapter(model, cfg))
    cycle = METHODS if method == "mixed" else (method,)
    adapters = [None if (m := cycle[i % len(cycle)]) == "base" else m for i in range(batch)]

    params = SamplingParams(max_new_tokens=new, beams=beams, ignore_eos=True)

    def run() -> tuple[float, float, float]:
        """(wall time, first step = prefill + one decode, decode tok/s of the later steps) of one batch."""
        reqs = [engine.add_request(ids, params, adapter=name) for name in adapters]
        t0 = time.perf_counter()
        engine.step()
        t1 = time.perf_counter()
        steps = 0
        while engine.has_unfinished():
            engine.step()
            steps += 1
        t2 = time.perf_counter()
        assert all(len(r.output_ids) == new for r in reqs) or beams > 1
        return t2 - t0, t1 - t0, batch * steps / max(t2 - t1, 1e-9)

    rss = peak_rss_mib()
    run()  # warm-up
    results = [run() for _ in range(runs)]
    t_total, t_first, decode_tps = (statistics.median(r[i] for r in results) for i in range(3))
    per_token = 2 * model.args.n_layers * model.args.kv_dim * model.tok_embeddings.weight.element_size()
    kv = per_token * (len(ids) + new) * beams * batch
    out = row("parallama", beams, len(ids), new, t_total, t_first, kv, method, batch)
    # measured directly: steps after the first are pure decode (one token per request)
    out["decode_tps"] = decode_tps
    out["prefill_tps"] = batch * len(ids) / t_first  # a lower bound: the first step also decodes once
    out["peak_mem_mib"] = peak_rss_mib() - rss  # CPU: growth of the process's peak RSS during the runs
    step_bytes = bytes_per_decode_step(model, len(ids) + new // 2, batch * beams)  # mid-generation context
    out["decode_gbs"] = step_bytes * decode_tps / (batch * beams) / 1e9
    return out


def bench_transformers(ids: list[int], new: int, beams: int, runs: int) -> dict:
    from transformers import AutoModelForCausalLM

    gguf = default_gguf_path()
    hf = AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name, dtype=torch.float32).eval()
    x = torch.tensor([ids])

    def run(n: int):
        with torch.no_grad():
            hf.generate(x, max_new_tokens=n, min_new_tokens=n, do_sample=False, num_beams=beams, pad_token_id=2)

    t_prefill = timed(lambda: run(1), runs)
    t_total = timed(lambda: run(new), runs)
    cfg = hf.config
    per_token = 2 * cfg.num_hidden_layers * cfg.num_key_value_heads * (cfg.hidden_size // cfg.num_attention_heads) * 4
    return row("transformers", beams, len(ids), new, t_total, t_prefill, per_token * (len(ids) + new) * beams)


def kv_memory_ragged(model: Llama, lens: list[int], new: int, block_size: int = 16) -> dict:
    """Peak paged KV bytes for a ragged batch vs the bytes its tokens need and a contiguous cache."""
    engine = Engine(model, num_blocks=512, block_size=block_size)
    g = torch.Generator().manual_seed(0)
    prompts = [torch.randint(100, 40000, (n,), generator=g).tolist() for n in lens]
    engine.generate(prompts, SamplingParams(max_new_tokens=new, ignore_eos=True))
    per_token = 2 * model.args.n_layers * model.args.kv_dim * model.tok_embeddings.weight.element_size()
    needed = sum(n + new for n in lens) * per_token
    paged = engine.peak_blocks_used * block_size * per_token
    padded = len(lens) * (max(lens) + new) * per_token
    full = len(lens) * model.args.max_seq_len * per_token
    return {"lens": lens, "new_tokens": new, "needed_bytes": needed, "paged_bytes": paged,
            "contiguous_batch_max_bytes": padded, "contiguous_max_seq_len_bytes": full}  # fmt: skip


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--runs", type=int, default=5)
    ap.add_argument("--prompt-len", type=int, default=274)
    ap.add_argument("--new-tokens", type=int, default=32)
    ap.add_argument("--beams", type=int, nargs="+", default=[1])
    ap.add_argument("--methods", nargs="+", default=["base"], choices=[*METHODS, "mixed"])
    ap.add_argument("--batch", type=int, nargs="+", default=[1], help="requests generated together")
    ap.add_argument("--backend", default="auto", help="auto | torch | cpu | triton (kernels/ops.py)")
    ap.add_argument("--no-peers", action="store_true", help="skip transformers")
    ap.add_argument("--json", type=Path)
    ap.add_argument("--quick", action="store_true", help="base and PARA vs transformers, beams 1, batch 1, 3 runs")
    a = ap.parse_args()
    if a.quick:
        a.runs, a.beams, a.batch, a.methods = 3, [1], [1], ["base", "para"]
    torch.manual_seed(0)
    model = Llama.from_pretrained("default", backend=a.backend)
    ids = make_prompt(model.tokenizer, a.prompt_len)
    rows = []
    for beams in a.beams:
        for batch in a.batch:
            for method in a.methods:
                if method == "mixed" and batch < len(METHODS):
                    continue  # a mixed batch needs a request per method
                print(f"parallama {method} beams={beams} batch={batch} ...", file=sys.stderr, flush=True)
                rows.append(bench_parallama(model, ids, a.new_tokens, beams, a.runs, method, batch))
        if not a.no_peers:
            print(f"transformers beams={beams} ...", file=sys.stderr, flush=True)
            rows.append(bench_transformers(ids, a.new_tokens, beams, a.runs))
    kv = kv_memory_ragged(model, [17, 80, 150, 274, 33], a.new_tokens)
    bandwidth = measure_bandwidth()
    machine = {"python": platform.python_version(), "torch": torch.__version__, "cpu": platform.processor(),
               "threads": torch.get_num_threads()}  # fmt: skip
    print(f"\nSmolLM2-135M fp32 CPU, backend {model.ops.backend}, prompt {a.prompt_len}, {a.new_tokens} new, "
          f"median of {a.runs}\n")  # fmt: skip
    print("| engine | method | beams | batch | tok/s | decode tok/s | prefill tok/s | decode vs base | of roof |")
    print("|---|---|---|---|---|---|---|---|---|")
    by = {(r["engine"], r["method"], r["beams"], r["batch"]): r for r in rows}
    for r in rows:
        b = by.get((r["engine"], "base", r["beams"], r["batch"]))
        rel = f"{r['decode_tps'] / b['decode_tps']:.3f}x" if b else "-"
        roof = f"{r['decode_gbs'] / bandwidth:.0%}" if "decode_gbs" in r else "-"
        print(f"| {r['engine']} | {r['method']} | {r['beams']} | {r['batch']} | {r['tps']:.1f} | "
              f"{r['decode_tps']:.1f} | {r['prefill_tps']:.0f} | {rel} | {roof} |")  # fmt: skip
    for beams in a.beams:
        p, t = by.get(("parallama", "base", beams, 1)), by.get(("transformers", "base", beams, 1))
        if p and t:
            ratios = {k: p[k] / t[k] for k in ("tps", "decode_tps", "prefill_tps")}
            print(f"\nbeams={beams}: parallama/transformers tok/s {ratios['tps']:.2f}x, "
                  f"decode {ratios['decode_tps']:.2f}x, prefill {ratios['prefill_tps']:.2f}x")  # fmt: skip
    weights = bytes_per_decode_step(model, 0, 0)
    print(
        f"\nmeasured read bandwidth {bandwidth:.1f} GB/s; weights {weights / 1e6:.0f} MB per decode step "
        f"-> batch-1 roof {bandwidth * 1e9 / weights:.0f} tok/s ('of roof': decode bytes/s over the bandwidth)"
    )
    mib = 1 / 2**20
    print(f"\nKV for ragged batch {kv['lens']} + {kv['new_tokens']} new: needed {kv['needed_bytes'] * mib:.1f} MiB, "
          f"paged peak {kv['paged_bytes'] * mib:.1f} MiB ({kv['paged_bytes'] / kv['needed_bytes']:.3f}x), "
          f"contiguous padded-to-longest {kv['contiguous_batch_max_bytes'] * mib:.1f} MiB, "
          f"contiguous max_seq_len {kv['contiguous_max_seq_len_bytes'] * mib:.0f} MiB")  # fmt: skip
    if a.json:
        a.json.write_text(
            json.dumps({"machine": machine, "bandwidth_gbs": bandwidth, "rows": rows, "kv_ragged": kv}, indent=1)
        )
    return 0


if __name__ == "__main__":
    sys.exit(main())
