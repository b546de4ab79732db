"""Measure the spread behind each bound in tests/tolerance.py: `python -m tests.measure_tolerance [--cases N]`.

Every kind runs the comparisons its tests make, over N (>= 20) seeds with shapes drawn per seed, and prints
the largest error (max|got - want| / max|want|), the median and the bound in force. Run it on a new machine
kind, or after a change to a GEMM path, before moving a bound. About 3 minutes on 2 cores.
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
from collections.abc import Callable, Iterator
from pathlib import Path

if "triton" not in sys.modules:
    os.environ.setdefault("TRITON_INTERPRET", "1")  # the kernels run in Triton's interpreter on CPU
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402

from kernels import cpu  # noqa: E402
from kernels import reference as ref  # noqa: E402
from tests import tolerance  # noqa: E402
from tests.tolerance import error  # noqa: E402


def _gen(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def _shape(seed: int) -> tuple[int, int, int]:
    """(M, K, N): few-row GEMVs and prefill-sized GEMMs, ragged and model-sized widths."""
    g = _gen(10_000 + seed)
    pick = lambda xs: xs[int(torch.randint(len(xs), (1,), generator=g))]  # noqa: E731
    return pick([1, 2, 3, 5, 6, 9, 17, 40]), pick([50, 100, 576, 1536]), pick([37, 192, 576, 1536])


def _paged(seed: int, H: int, n_kv: int, hd: int, lens: list[int], bs: int = 4):
    g = _gen(seed)
    width = -(-max(lens) // bs)
    n_blocks = len(lens) * width + 3
    k, v = torch.randn(2, n_blocks, bs, n_kv, hd, generator=g).unbind(0)
    tables = torch.randperm(n_blocks, generator=g)[: len(lens) * width].view(len(lens), width)
    return k, v, tables


# ---------------------------------------------------------------- PATH


def path_errors(seed: int) -> Iterator[float]:
    M, K, N = _shape(seed)
    g = _gen(seed)
    x, w = torch.randn(M, K, generator=g), torch.randn(N, K, generator=g) / K**0.5
    want = F.linear(x, w)
    with torch.no_grad():
        yield error(cpu.blas_linear(x, w), want)  # the compiled GEMVs (a few rows) vs torch
        old = cpu.GEMV_CHUNK_BYTES, cpu.native.available
        cpu.GEMV_CHUNK_BYTES, cpu.native.available = 8 * K * 4, lambda: False  # numpy's, in chunks of 8 rows
        yield error(cpu.blas_linear(x, w), want)
        cpu.GEMV_CHUNK_BYTES, cpu.native.available = old
    yield error(torch.cat([F.linear(x[i : i + 1], w) for i in range(M)]), want)  # per-row GEMV vs batched
    yield error(F.linear(F.pad(x, (0, 0, 0, 7)), w)[:M], want)  # padded rows
    r2s = torch.randint(0, 3, (M,), generator=g)
    scale = torch.rand(3, N, generator=g) + 0.5
    with torch.no_grad():
        yield error(cpu.linear_scale(x, w, scale, r2s), ref.linear_scale(x, w, scale, r2s))  # in place
        w13 = torch.randn(2 * N, K, generator=g) / K**0.5
        wg, wu = w13.split(N)
        want = ref.gated_up(x, wg, wu, scale, r2s)
        yield error(cpu.gated_up(x, wg, wu, scale, r2s), want)  # one stacked GEMM, epilogue in place
        yield error(cpu.gated_up(x, wg.clone(), wu.clone(), scale, r2s), want)
        nw = torch.rand(K, generator=g) + 0.5
        yield error(cpu.rms_norm(x, nw, 1e-5), ref.rms_norm(x, nw, 1e-5))  # one row: numpy's form
    lens = [int(n) for n in torch.randint(1, 40, (1 + seed % 4,), generator=g)]
    H, n_kv, hd = 6, 2, 8 + 8 * (seed % 3)
    k, v, tables = _paged(seed, H, n_kv, hd, lens)
    S, seq_lens = len(lens), torch.tensor(lens)
    q = torch.randn(S, H, hd, generator=g)
    args = (q, k, v, tables, seq_lens, seq_lens - 1, torch.arange(S), torch.zeros(S, dtype=torch.long), 1)
    yield error(cpu.paged_attention(*args), ref.paged_attention(*args))
    table = ref.rope_table(ref.rope_frequencies(hd, 10000.0), 64)
    pos = torch.randint(0, 64, (M,), generator=g)
    qk = torch.randn(M, H, hd, generator=g)
    yield error(cpu.rope(qk, table[pos]), ref.rope(qk, table[pos]))
    # hand-written forms of the same math: Meta's complex RoPE, attention as an explicit softmax
    inv = ref.rope_frequencies(hd, 10000.0)
    cis = torch.polar(torch.ones(64, hd // 2), torch.outer(torch.arange(64).float(), inv))[pos]
    want = torch.view_as_real(torch.view_as_complex(qk.reshape(M, H, hd // 2, 2)) * cis[:, None]).flatten(2)
    yield error(ref.rope(qk, table[pos]), want)
    T = 3 + seed % 9
    q, kk, vv = torch.randn(3, 2, T, H, hd, generator=g).unbind(0)
    kk, vv = kk[:, :, :n_kv], vv[:, :, :n_kv]
    kr, vr = kk.repeat_interleave(H // n_kv, dim=2), vv.repeat_interleave(H // n_kv, dim=2)
    scores = torch.einsum("bthd,bshd->bhts", q, kr) / hd**0.5
    scores = scores.masked_fill(torch.triu(torch.ones(T, T, dtype=torch.bool), 1), float("-inf"))
    yield error(ref.attention(q, kk, vv), torch.einsum("bhts,bshd->bthd", scores.softmax(-1), vr))


# ---------------------------------------------------------------- MODEL_PATH / ORACLE


def _tiny_shape(seed: int) -> dict:
    n_heads, n_kv = [(4, 2), (4, 4), (6, 2), (4, 1)][seed % 4]
    return dict(n_heads=n_heads, n_kv_heads=n_kv, dim=16 * n_heads, vocab=61 + 12 * (seed % 3), ffn=96 + 8 * (seed % 5))


def _tiny(seed: int, backend: str = "torch"):
    from model import Llama, ModelArgs
    from tests.helpers import random_meta_state_dict

    s = _tiny_shape(seed)
    sd = random_meta_state_dict(s["dim"], 2, s["n_heads"], s["n_kv_heads"], s["vocab"], s["ffn"], seed)
    args = ModelArgs(
        dim=s["dim"],
        n_layers=2,
        n_heads=s["n_heads"],
        n_kv_heads=s["n_kv_heads"],
        vocab_size=s["vocab"],
        hidden_dim=s["ffn"],
        max_seq_len=96,
    )
    with torch.device("meta"):
        model = Llama(args, backend=backend)
    model.load_weights({k: t.clone() for k, t in sd.items()})
    model.setup_rope("cpu")
    return model.eval(), sd


def _trained(model, config, seed: int, spread: float = 0.3):
    from model.peft import create_adapter

    torch.manual_seed(seed)
    adapter = create_adapter(model, config)
    with torch.no_grad():
        for name, p in adapter.named_parameters():
            if "bias" not in name:
                p.add_(spread * torch.randn_like(p))
    return adapter.eval()


@torch.no_grad()
def model_path_errors(seed: int) -> Iterator[float]:
    from infer.cache import BlockTable, PagedKVCache
    from model.peft import PARAConfig
    from model.step import AdapterStep

    model, sd = _tiny(seed)
    vocab = model.args.vocab_size
    g = _gen(seed)
    para = _trained(model, PARAConfig(), seed)
    lens = [int(n) for n in torch.randint(2, 20, (3,), generator=g)]
    seqs = [torch.randint(0, vocab, (n + 4,), generator=g) for n in lens]
    # padded batch vs each row alone
    batch = torch.stack([torch.cat([s, s.new_zeros(max(lens) + 4 - len(s))]) for s in seqs])
    full = model(batch, adapter=para, prompt_lens=torch.tensor(lens))
    for i, (s, n) in enumerate(zip(seqs, lens)):
        yield error(full[i, : len(s)], model(s[None], adapter=para, prompt_lens=torch.tensor([n]))[0])
    # cpu backend vs the torch backend
    fast, _ = _tiny(seed, backend="cpu")
    yield error(fast(batch, adapter=para, prompt_lens=torch.tensor(lens)), full)
    # paged prefill + cached decode (PARA vectors pooled at prefill) vs the no-cache forward
    cache = PagedKVCache(model.args, num_blocks=40, block_size=4)
    tables = [BlockTable() for _ in seqs]
    pools = {p: AdapterStep.make_pool(model.args, p, 2) for p in ("qkv", "u")}
    step = cache.prepare_step(tables, lens, all_logits=True)
    last = torch.tensor([sum(lens[: i + 1]) - 1 for i in range(len(lens))])[:1]
    step.adapters = AdapterStep(
        pools, torch.tensor([1] * lens[0] + [0] * sum(lens[1:])), [(para, last, torch.tensor([1]))]
    )
    got = model.forward_step(torch.cat([s[:n] for s, n in zip(seqs, lens)]), step, cache.k, cache.v)
    want = torch.cat([model(s[None, :n], adapter=a)[0] for s, n, a in zip(seqs, lens, [para, None, None])])
    yield error(got, want)
    for t in range(4):
        step = cache.prepare_step(tables, [1] * len(seqs))
        step.adapters = AdapterStep(pools, torch.tensor([1] + [0] * (len(seqs) - 1)))
        got = model.forward_step(torch.stack([s[n + t] for s, n in zip(seqs, lens)]), step, cache.k, cache.v)
        for row, (s, n, a) in enumerate(zip(seqs, lens, [para, None, None])):
            yield error(got[row], model(s[None, : n + t + 1], adapter=a, prompt_lens=torch.tensor([n]))[0, -1])


@torch.no_grad()
def oracle_errors(seed: int) -> Iterator[float]:
    import tempfile

    import peft

    from tests.helpers import hf_logits, tiny_hf_oracle, tiny_meta_model
    from weights.adapters import load_adapter

    n_kv = (1, 2, 4)[seed % 3]
    model, sd = tiny_meta_model(n_kv, seed=seed)
    oracle = tiny_hf_oracle(sd, n_kv)
    g = _gen(seed)
    tokens = torch.randint(0, 97, (2, 5 + seed % 20), generator=g)
    yield error(model(tokens), hf_logits(oracle, tokens))
    targets = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"][: 2 + seed % 6]
    if seed % 2:
        cfg = peft.LoraConfig(r=3, lora_alpha=5, target_modules=targets, use_rslora=bool(seed % 4 == 1))
    else:  # the projections parallama's (IA)³ supports
        targets = ["k_proj", "v_proj", "down_proj", "q_proj", "up_proj"][: 2 + seed % 4]
        cfg = peft.IA3Config(target_modules=targets, feedforward_modules=[t for t in targets if t == "down_proj"])
    pm = peft.get_peft_model(oracle, cfg)
    torch.manual_seed(seed)
    for name, p in pm.named_parameters():
        if "lora_" in name or "ia3_" in name:
            p.data.add_(0.3 * torch.randn_like(p))
    pm.eval()
    with tempfile.TemporaryDirectory() as d:
        pm.save_pretrained(d)
        adapter = load_adapter(d, model)
        yield error(model(tokens, adapter=adapter), pm(input_ids=tokens).logits.float())


_SMOL: list = []


@torch.no_grad()
def oracle_deep_errors(seed: int) -> Iterator[float]:
    if not _SMOL:
        import transformers

        from model import Llama
        from tests.conftest import smollm2_gguf

        path = smollm2_gguf()
        hf = transformers.AutoModelForCausalLM.from_pretrained(path.parent, gguf_file=path.name, dtype=torch.float32)
        _SMOL.extend([Llama.from_pretrained("default"), hf.eval()])
    ours, hf = _SMOL
    from tests.helpers import sentences

    ids = torch.tensor([ours.tokenizer.encode(" ".join(sentences(1 + seed % 6, seed)), bos=False)[:64]])
    yield error(ours(ids), hf(ids).logits.float())
    yield error(ours.hidden_states(ids), hf(ids, output_hidden_states=True).hidden_states[-1])


_TRAIN_DIR: list = []


def _rel(pair: list[float]) -> float:
    return abs(pair[0] - pair[1]) / abs(pair[1])


def trained_errors(seed: int) -> Iterator[float]:
    """tests/test_train_ddp.py's comparison: the same run as 2 gloo ranks and as one process; the losses logged
    along the way and the dev loss each saved adapter gives (single weights are ill-conditioned: see there)."""
    import json
    import subprocess
    import tempfile

    from tests.test_train import make_tiny_dir, write_toy
    from tests.test_train_ddp import file_dev_losses
    from train.finetune import FinetuneConfig, finetune

    if not _TRAIN_DIR:
        d = Path(tempfile.mkdtemp(prefix="tolerance-"))
        _TRAIN_DIR.extend([d, make_tiny_dir(d / "tiny"), write_toy(d / "data")])
    root, tiny, toy = _TRAIN_DIR
    out = root / f"run{seed}"
    flags = dict(
        method=("para", "lora", "ia3")[seed % 3],
        lr=(3e-2, 3e-2, 1e-1)[seed % 3],
        batch_size=7,
        grad_accum=2,
        epochs=1,
        eval_every=2,
        log_every=1,
        seed=seed,
    )
    argv = [f"--{k.replace('_', '-')}={v}" for k, v in flags.items()]
    argv += [f"--model={tiny}", f"--train={toy['train']}", f"--dev={toy['dev']}", f"--out={out / 'ddp'}"]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(Path(__file__).resolve().parents[1])}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2", "-m", "train.finetune"]
    subprocess.run([*cmd, *argv, "--no-progress"], env=env, capture_output=True, check=True, timeout=600)
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        finetune(
            FinetuneConfig(
                **flags,
                model=str(tiny),
                train=str(toy["train"]),
                dev=str(toy["dev"]),
                out=str(out / "one"),
                progress=False,
            )
        )
    finally:
        torch.set_num_threads(n)
    yield _rel(file_dev_losses(out / "ddp" / "best", out / "one" / "best", model_dir=tiny, dev=toy["dev"]))
    yield _rel(file_dev_losses(out / "ddp" / "last", out / "one" / "last", model_dir=tiny, dev=toy["dev"]))
    rows = [[json.loads(s) for s in (out / r / "metrics.jsonl").read_text().splitlines()] for r in ("ddp", "one")]
    for ra, rb in zip(*rows):
        yield from (_rel([ra[k], rb[k]]) for k in ("train_loss", "dev_loss") if k in ra)


# ---------------------------------------------------------------- KERNEL / LOW


def _kernel_cases(seed: int, dtype: torch.dtype) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
    """(kernel output, twin on the same inputs) for the five kernels, in `dtype`."""
    from kernels.gated_up import fused_gated_up
    from kernels.linear_scale import fused_linear_scale
    from kernels.paged_attention import paged_attention_decode, reference_decode
    from kernels.rms_norm import fused_rms_norm
    from kernels.rope import fused_rope

    M, K, N = _shape(seed)
    K, N = min(K, 576), min(N, 576)  # the interpreter is slow; the tiles still cover several programs
    g = _gen(seed)
    x = torch.randn(M, K, generator=g).to(dtype)
    w = (torch.randn(N, K, generator=g) / K**0.5).to(dtype)
    r2s = torch.randint(0, 3, (M,), generator=g)
    scale = (torch.rand(3, N, generator=g) + 0.5).to(dtype)
    yield fused_linear_scale(x, w, scale, r2s), ref.linear_scale(x, w, scale, r2s)
    yield fused_gated_up(x, w, w.flip(0), scale, r2s), ref.gated_up(x, w, w.flip(0), scale, r2s)
    nw = (torch.rand(K, generator=g) + 0.5).to(dtype)
    yield fused_rms_norm(x * 3, nw, 1e-5), ref.rms_norm(x * 3, nw, 1e-5)
    hd = (32, 48, 64)[seed % 3]
    qk = torch.randn(2, 7, 3, hd, generator=g).to(dtype)
    cs = ref.rope_table(ref.rope_frequencies(hd, 10000.0), 7)
    yield fused_rope(qk, cs), ref.rope(qk, cs)
    lens = [int(n) for n in torch.randint(1, 50, (1 + seed % 3,), generator=g)]
    k, v, tables = _paged(seed, 4, 2, hd, lens, bs=16)
    q = torch.randn(len(lens), 4, hd, generator=g)
    sl = torch.tensor(lens, dtype=torch.int32)
    q, k, v = q.to(dtype), k.to(dtype), v.to(dtype)
    yield paged_attention_decode(q, k, v, tables.int(), sl), reference_decode(q, k, v, tables, sl)


def kernel_errors(seed: int) -> Iterator[float]:
    for got, want in _kernel_cases(seed, torch.float32):
        yield error(got, want)


def low_errors(dtype: torch.dtype) -> Callable[[int], Iterator[float]]:
    """fp16 through the interpreter (the twin in fp16 on the same inputs); for both 16-bit dtypes, torch's
    own reduced-precision CPU ops against the fp32 twin on the same rounded inputs, rounded to the dtype:
    the GPU tests' comparison, made by an implementation this machine can run (bf16 tl.dot is wrong in the
    interpreter)."""

    def errors(seed: int) -> Iterator[float]:
        if dtype == torch.float16:
            for got, want in _kernel_cases(seed, dtype):
                yield error(got.float(), want.float())
        M, K, N = _shape(seed)
        g = _gen(seed)
        x, w = torch.randn(M, K, generator=g).to(dtype), (torch.randn(N, K, generator=g) / K**0.5).to(dtype)
        scale = (torch.rand(1, N, generator=g) + 0.5).to(dtype)
        want = ref.linear_scale(x.float(), w.float(), scale.float()).to(dtype)
        yield error(ref.linear_scale(x, w, scale).float(), want.float())
        want = ref.gated_up(x.float(), w.float(), w.flip(0).float(), scale.float()).to(dtype)
        yield error(ref.gated_up(x, w, w.flip(0), scale).float(), want.float())
        nw = (torch.rand(K, generator=g) + 0.5).to(dtype)
        want = ref.rms_norm(x.float() * 3, nw.float(), 1e-5).to(dtype)
        yield error(ref.rms_norm(x * 3, nw, 1e-5).float(), want.float())

    return errors


MEASURES: list[tuple[tolerance.Kind, Callable[[int], Iterator[float]]]] = [
    (tolerance.PATH, path_errors),
    (tolerance.MODEL_PATH, model_path_errors),
    (tolerance.ORACLE, oracle_errors),
    (tolerance.ORACLE_DEEP, oracle_deep_errors),
    (tolerance.TRAINED, trained_errors),
    (tolerance.KERNEL, kernel_errors),
    (tolerance.LOW[torch.float16], low_errors(torch.float16)),
    (tolerance.LOW[torch.bfloat16], low_errors(torch.bfloat16)),
]


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--cases", type=int, default=20, help="seeds (each with its own shapes) per kind")
    p.add_argument("--kinds", nargs="*", help="only these kinds (names as in tests/tolerance.py)")
    args = p.parse_args(argv)
    torch.set_num_threads(max(1, torch.get_num_threads()))
    print("| kind | cases | comparisons | max error | median | bound in force | max / bound |")
    print("|---|---|---|---|---|---|---|")
    for kind, measure in MEASURES:
        if args.kinds and kind.name not in args.kinds:
            continue
        errs = [e for seed in range(args.cases) for e in measure(seed)]
        worst = max(errs)
        print(
            f"| {kind.name} | {args.cases} | {len(errs)} | {worst:.3g} | {statistics.median(errs):.3g} | "
            f"{kind.bound:.3g} | {worst / kind.bound:.2f} |",
            flush=True,
        )
    return 0


if __name__ == "__main__":
    sys.exit(main())
