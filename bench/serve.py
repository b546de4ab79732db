"""Serving load test: `python -m infer.serve` on 127.0.0.1, streaming clients at several concurrencies.

    python bench/serve.py [--model default] [--concurrency 1 4 16] [--rounds 3] [--max-tokens 16]
                          [--prompt-len 48] [--requests-per-client 2] [--max-seconds 240]
                          [--out bench/results/serve_cpu]

The server runs in a process of its own (`python -m infer.serve`, bound to 127.0.0.1, on a free port), with fresh
PARA (r=12 on q/v/u), (IA)³ (k/v/down) and LoRA (r=8 on q/v, unmerged) adapters written to a temp dir and loaded
with --adapter. Three loads run at each concurrency c: every request on the base model; base, PARA and (IA)³ in
turn; base, PARA, (IA)³ and LoRA in turn. A load is c clients, each sending `--requests-per-client` streaming
completions one after another (greedy, ignore_eos, so every request makes exactly --max-tokens tokens). Rounds
interleave the loads, so a drifting machine shifts them alike, and each mix's ratio to the base load is the
median of its per-round ratios.

Reported per concurrency × load: tokens/s (completion tokens over the load's wall time), p50/p99 time to first
token, p50/p99 inter-token latency (the gaps between a stream's token events, each spread over the tokens it
brought; a request's first step prefills and decodes, so its first event holds two tokens). Targets: the
PARA/(IA)³ mix >= 0.95x the base load's tok/s, the mix with LoRA >= 0.85x (anchors: Punica 0.88-0.97x on GPU,
vLLM multi-LoRA 0.66x). Bounded: --rounds × loads × concurrencies runs of c × --requests-per-client requests, and no
new round starts past --max-seconds.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import platform
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch

ROOT = Path(__file__).resolve().parents[1]
# run as a script: the repo root instead of bench/ on the path (bench/kernels.py would shadow the kernels
# package, and a bench module named like a standard-library one that module)
sys.path[:] = [str(ROOT)] + [p for p in sys.path if Path(p or ".").resolve() != ROOT / "bench"]

from bench.report import _target, format_summary  # noqa: E402

LOADS = {  # name -> the models its requests name in turn (None = the base model)
    "base": [None],
    "para_ia3_mix": [None, "para", "ia3"],
    "lora_mix": [None, "para", "ia3", "lora"],
}
GOALS = {"para_ia3_mix": 0.95, "lora_mix": 0.85}
BUSY = (
    "The machine was busy with other work when this run started (load average above its CPU count): the ratios are"
    " unreliable"
)
TEXT = (
    "The history of science is the study of the development of science and scientific knowledge, including both "
    "the natural and social sciences. "
)

_T0 = time.perf_counter()


def log(msg: str) -> None:
    print(f"[{time.perf_counter() - _T0:6.1f}s] {msg}", file=sys.stderr, flush=True)


def percentile(xs: Sequence[float], q: float) -> float:
    """The q-th percentile (0..100) by linear interpolation; nan for no samples."""
    if not xs:
        return float("nan")
    s = sorted(xs)
    k = (len(s) - 1) * q / 100
    lo = int(k)
    hi = min(lo + 1, len(s) - 1)
    return s[lo] + (s[hi] - s[lo]) * (k - lo)


# ---- the clients ----------------------------------------------------------------------------------------------
async def one_request(client: Any, model: str, prompt: str, max_tokens: int) -> dict[str, Any]:
    """One streaming completion: its token count, time to first token and the gaps between token events."""
    body = {"model": model, "prompt": prompt, "max_tokens": max_tokens, "temperature": 0, "stream": True}
    body.update(ignore_eos=True, return_token_ids=True)
    t0 = time.perf_counter()
    times: list[float] = []
    itl: list[float] = []
    tokens = 0
    async with client.stream("POST", "/v1/completions", json=body) as resp:
        if resp.status_code != 200:
            raise RuntimeError(f"{model}: HTTP {resp.status_code}: {(await resp.aread()).decode()[:200]}")
        async for line in resp.aiter_lines():
            if not line.startswith("data: {"):
                continue
            n = len(json.loads(line[6:])["choices"][0].get("token_ids", []))
            if n:
                times.append(time.perf_counter())
                if len(times) > 1:  # an event's gap, spread over the tokens it brought
                    itl += [(times[-1] - times[-2]) / n] * n
                tokens += n
    if tokens != max_tokens:
        raise RuntimeError(f"{model}: {tokens} tokens streamed, {max_tokens} asked")
    return {"tokens": tokens, "ttft": times[0] - t0, "itl": itl}


async def run_load(
    url: str, models: list[str], concurrency: int, per_client: int, prompts: list[str], max_tokens: int
) -> dict[str, Any]:
    """`concurrency` clients, each sending `per_client` requests in turn; request i names models[i % len]."""
    import httpx

    n = concurrency * per_client
    results: list[dict[str, Any]] = []
    async with httpx.AsyncClient(base_url=url, timeout=600, limits=httpx.Limits(max_connections=concurrency)) as c:

        async def worker(w: int) -> None:
            for k in range(per_client):
                i = w + k * concurrency
                results.append(await one_request(c, models[i % len(models)], prompts[i % len(prompts)], max_tokens))

        t0 = time.perf_counter()
        await asyncio.gather(*(worker(w) for w in range(concurrency)))
        wall = time.perf_counter() - t0
    tokens = sum(r["tokens"] for r in results)
    return {
        "requests": n,
        "tokens": tokens,
        "wall_s": wall,
        "tps": tokens / wall,
        "ttft": [r["ttft"] for r in results],
        "itl": [g for r in results for g in r["itl"]],
    }


def make_row(load: str, concurrency: int, runs: list[dict[str, Any]], max_tokens: int) -> dict[str, Any]:
    """One table row from a load's runs (one per round): median tok/s, latency percentiles over every request."""
    ttft = [x for r in runs for x in r["ttft"]]
    itl = [x for r in runs for x in r["itl"]]
    return {
        "load": load,
        "models": [m or "base" for m in LOADS.get(load, [None])],
        "concurrency": concurrency,
        "max_tokens": max_tokens,
        "requests": sum(r["requests"] for r in runs),
        "tps": statistics.median(r["tps"] for r in runs),
        "runs_tps": [r["tps"] for r in runs],
        "ttft_p50_ms": 1e3 * percentile(ttft, 50),
        "ttft_p99_ms": 1e3 * percentile(ttft, 99),
        "itl_p50_ms": 1e3 * percentile(itl, 50),
        "itl_p99_ms": 1e3 * percentile(itl, 99),
    }


def targets(rows: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Each mix's tok/s over the base load's at the same concurrency (median of per-round ratios)."""
    out = []
    for c in sorted({r["concurrency"] for r in rows}):
        base = next((r for r in rows if r["load"] == "base" and r["concurrency"] == c), None)
        for load, goal in GOALS.items():
            mix = next((r for r in rows if r["load"] == load and r["concurrency"] == c), None)
            t = _target(f"{load} / base tok/s (concurrency {c})", mix, base, "tps", goal)
            if t is not None:
                out.append(t)
    return out


def format_rows(rows: list[dict[str, Any]]) -> str:
    lines = [
        "| concurrency | load | requests | tok/s | vs base | TTFT p50 ms | TTFT p99 ms | ITL p50 ms | ITL p99 ms |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        base = next((b for b in rows if b["load"] == "base" and b["concurrency"] == r["concurrency"]), None)
        rel = f"{r['tps'] / base['tps']:.3f}x" if base else "-"
        lines.append(
            f"| {r['concurrency']} | {r['load']} | {r['requests']} | {r['tps']:.1f} | {rel} | {r['ttft_p50_ms']:.0f} "
            f"| {r['ttft_p99_ms']:.0f} | {r['itl_p50_ms']:.0f} | {r['itl_p99_ms']:.0f} |"
        )
    return "\n".join(lines)


# ---- the server -------------------------------------------------------------------------------------------------
def write_adapters(model_source: str, directory: Path) -> dict[str, Path]:
    """Fresh PARA, (IA)³ and LoRA adapters of the model, saved for --adapter (the bench's own model copy is freed)."""
    from model import Llama
    from model.peft import IA3Config, LoRAConfig, PARAConfig, create_adapter
    from weights.adapters import save_adapter

    model = Llama.from_pretrained(model_source)
    out = {}
    for name, config in (("para", PARAConfig()), ("ia3", IA3Config()), ("lora", LoRAConfig(r=8))):
        out[name] = save_adapter(create_adapter(model, config), directory / name)
    return out


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def start_server(model: str, adapters: dict[str, Path], port: int, max_batch: int) -> subprocess.Popen:
    cmd = [sys.executable, "-m", "infer.serve", "--model", model, "--host", "127.0.0.1", "--port", str(port)]
    cmd += ["--max-batch", str(max_batch), "--log-level", "warning"]
    for name, path in adapters.items():
        cmd += ["--adapter", f"{name}={path}"]
    env = {k: v for k, v in os.environ.items() if k != "PARALLAMA_API_KEY"}
    return subprocess.Popen(cmd, cwd=ROOT, env=env, start_new_session=True)


def wait_healthy(url: str, proc: subprocess.Popen, timeout: float = 300) -> None:
    import httpx

    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"the server exited with code {proc.returncode}")
        try:
            if httpx.get(url + "/health", timeout=2).status_code == 200:
                return
        except httpx.HTTPError:
            pass
        time.sleep(0.5)
    raise RuntimeError(f"the server did not answer /health within {timeout:.0f} s")


def stop_server(proc: subprocess.Popen) -> None:
    if proc.poll() is None:
        os.killpg(proc.pid, signal.SIGINT)  # uvicorn shuts down cleanly on SIGINT
        try:
            proc.wait(30)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()


# ---- main -----------------------------------------------------------------------------------------------------
def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default="default")
    ap.add_argument("--concurrency", type=int, nargs="+", default=[1, 4, 16])
    ap.add_argument("--rounds", type=int, default=3, help="interleaved rounds (each mix's ratio: median per round)")
    ap.add_argument("--requests-per-client", type=int, default=2)
    ap.add_argument("--max-tokens", type=int, default=16)
    ap.add_argument("--prompt-len", type=int, default=48, help="prompt tokens, about")
    ap.add_argument("--max-batch", type=int, default=32)
    ap.add_argument("--max-seconds", type=float, default=240, help="no new round starts after this")
    ap.add_argument("--out", type=Path, default=ROOT / "bench" / "results" / "serve_cpu")
    a = ap.parse_args(argv)
    if min(a.rounds, a.requests_per_client, a.max_tokens, a.prompt_len, a.max_batch, *a.concurrency) < 1:
        ap.error("--rounds, --requests-per-client, --max-tokens, --prompt-len, --max-batch and --concurrency >= 1")
    return a


def prompts(n: int, words: int) -> list[str]:
    """n distinct prompts of about `words` tokens (different first words: no two requests are the same)."""
    body = " ".join((TEXT * (1 + words // 20)).split()[:words])
    return [f"Note {i}. {body}" for i in range(n)]


def main(argv: Sequence[str] | None = None) -> int:
    a = parse_args(argv)
    load_before = os.getloadavg()
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    with tempfile.TemporaryDirectory(prefix="parallama-serve-bench-") as tmp:
        log(f"fresh adapters of {a.model} -> {tmp}")
        adapters = write_adapters(a.model, Path(tmp))
        log(f"starting python -m infer.serve on {url}")
        proc = start_server(a.model, adapters, port, a.max_batch)
        try:
            wait_healthy(url, proc)
            rows = asyncio.run(bench(url, a))
        finally:
            stop_server(proc)
    tg = targets(rows)
    print(f"\n{a.model}, {a.max_tokens} new tokens per request, prompts of ~{a.prompt_len} words\n")
    print(format_rows(rows))
    print("\nTargets (ratios measured in this run):\n")
    print(format_summary(tg))
    loadavg = {"before": load_before, "after": os.getloadavg()}
    # judged before the run: afterwards the 1-minute average holds this bench's own server and clients
    busy = loadavg["before"][0] > (os.cpu_count() or 1)
    if busy:
        print(f"\n{BUSY} (load average {loadavg['before'][0]:.1f} before, {loadavg['after'][0]:.1f} after)")
    write_results(a, rows, tg, loadavg, busy)
    return 0


async def bench(url: str, a: argparse.Namespace) -> list[dict[str, Any]]:
    texts = prompts(max(a.concurrency) * a.requests_per_client, a.prompt_len)
    # warm-up at every concurrency with every model: the first load to meet a batch size would pay its
    # one-time costs (buffers sized by the row count, first-touched KV blocks) and the base load goes first
    log(f"warm-up: {', '.join(map(str, a.concurrency))} concurrent requests over the four models")
    for c in a.concurrency:
        await run_load(url, [a.model, "para", "ia3", "lora"], c, 1, texts, 4)
    runs: dict[tuple[int, str], list[dict[str, Any]]] = {}
    for rnd in range(a.rounds):
        if rnd and time.perf_counter() - _T0 > a.max_seconds:
            log(f"--max-seconds {a.max_seconds:.0f} reached: stopping after {rnd} rounds")
            break
        for c in a.concurrency:
            order = list(LOADS) if rnd % 2 == 0 else list(reversed(LOADS))  # alternate who goes first
            for load in order:
                models = [a.model if m is None else m for m in LOADS[load]]
                r = await run_load(url, models, c, a.requests_per_client, texts, a.max_tokens)
                runs.setdefault((c, load), []).append(r)
                log(f"round {rnd + 1} c={c:<2} {load:<12} {r['tps']:6.1f} tok/s ({r['requests']} requests)")
    return [make_row(load, c, runs[(c, load)], a.max_tokens) for c in a.concurrency for load in LOADS]


def write_results(
    a: argparse.Namespace, rows: list[dict[str, Any]], tg: list[dict[str, Any]], loadavg: dict[str, Any], busy: bool
) -> None:
    a.out.mkdir(parents=True, exist_ok=True)
    machine = {"python": platform.python_version(), "torch": torch.__version__, "cpus": os.cpu_count()}
    machine["loadavg_1m_5m_15m"] = loadavg
    rounds = min(len(r["runs_tps"]) for r in rows)
    args = {k: str(v) if isinstance(v, Path) else v for k, v in vars(a).items()}
    args["out"] = os.path.relpath(a.out, ROOT) if a.out.is_absolute() else str(a.out)
    (a.out / "serve.json").write_text(
        json.dumps({"machine": machine, "args": args, "rows": rows, "targets": tg}, indent=1) + "\n"
    )
    cmd = "python bench/serve.py " + " ".join(argv_of(a))
    (a.out / "README.md").write_text(
        f"# Serving load test, {a.model} (CPU)\n\n"
        f"Machine: {machine['cpus']} CPUs, Python {machine['python']}, "
        f"torch {machine['torch']}; read the ratios, not the absolute numbers. Load average (1 min) "
        f"{loadavg['before'][0]:.1f} before the run, {loadavg['after'][0]:.1f} after"
        + (f". **{BUSY}**" if busy else "")
        + ".\n\n"
        f"```bash\n{cmd}\n```\n\n"
        f"{a.max_tokens} new tokens per streaming request (greedy, ignore_eos), {a.requests_per_client} requests per "
        f"client, {rounds} interleaved rounds (of {a.rounds} asked; --max-seconds stops new ones); tok/s is the median "
        "round, 'vs base' the ratio of those medians, a target the median of the per-round ratios; latencies pool "
        "every request. Loads: "
        "`base` = every request on the base model, `para_ia3_mix` = base / PARA / (IA)³ in turn, `lora_mix` = base / "
        "PARA / (IA)³ / LoRA in turn (fresh adapters: PARA r=12 q/v/u, (IA)³ k/v/down, LoRA r=8 q/v unmerged).\n\n"
        f"{format_rows(rows)}\n\n## Targets\n\n{format_summary(tg)}\n"
    )
    log(f"wrote {a.out / 'serve.json'} and {a.out / 'README.md'}")


def argv_of(a: argparse.Namespace) -> list[str]:
    out = ["--model", a.model, "--concurrency", *map(str, a.concurrency), "--rounds", str(a.rounds)]
    out += ["--requests-per-client", str(a.requests_per_client), "--max-tokens", str(a.max_tokens)]
    return out + ["--prompt-len", str(a.prompt_len), "--max-seconds", f"{a.max_seconds:g}"]


if __name__ == "__main__":
    sys.exit(main())
