"""Tensor parallelism (model/tp.py, weights/sharded.py, infer/tp_engine.py): gloo ranks under torchrun against one
process, plus each format's per-rank slicing checked in one process (no process group needed for reading)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file

from infer import Engine, SamplingParams
from infer.generate import main as generate_main
from model import Llama
from model.peft import LoRAConfig, PARAConfig, create_adapter, model_fingerprint
from model.tp import TensorParallel
from tests.helpers import hf_permute, random_meta_state_dict, split_model_parallel, train_sentencepiece, write_meta_dir
from tests.tolerance import MODEL_PATH, assert_close
from weights import load_adapter, save_adapter
from weights.sharded import shard_state_dict
from weights.sources import GGUFSource, MetaSource, hf_source

ROOT = Path(__file__).resolve().parents[1]
PARAMS = {"dim": 64, "n_layers": 2, "n_heads": 4, "n_kv_heads": 2, "multiple_of": 32, "max_seq_len": 64}


def torchrun(n: int, argv: list[str], timeout: int = 180) -> subprocess.CompletedProcess:
    env = {**os.environ, "OMP_NUM_THREADS": "1", "OPENBLAS_NUM_THREADS": "1", "PYTHONPATH": str(ROOT)}
    env["PYTHONFAULTHANDLER"] = "1"  # a rank that aborts prints where
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc-per-node={n}", *argv]
    proc = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=timeout)
    assert proc.returncode == 0, proc.stderr[-12000:]
    return proc


def run_ranks(n: int, spec: dict, tmp: Path) -> list[dict]:
    (tmp / "spec.json").write_text(json.dumps(spec))
    torchrun(n, [str(ROOT / "tests" / "tp_worker.py"), str(tmp / "spec.json"), str(tmp)])
    return [torch.load(tmp / f"rank{k}.pt", weights_only=False) for k in range(n)]


def weight_bytes(model: torch.nn.Module) -> tuple[int, int]:
    """(all bytes, replicated bytes: norms and the RoPE table) of a one-process model."""
    total = sum(t.numel() * t.element_size() for t in [*model.parameters(), *model.buffers()])
    replicated = sum(t.numel() * t.element_size() for n, t in model.named_parameters() if "norm" in n)
    return total, replicated + model.rope_cos_sin.numel() * model.rope_cos_sin.element_size()


def check_decode_comm(comm: dict, args, tp: int, embedding: str) -> None:
    """One decode step of M rows: 2 all-reduces per layer of M·d·4 bytes (wo, w2) and the embedding's (an
    all-reduce for vocab rows, an all-gather of M·d/tp·4 for columns), and the logits' all-gather of
    M·ceil(V/tp)·4; plus rank 0's one broadcast of the step."""
    m, d = comm["rows"], args.dim
    row = m * d * 4
    reduces = 2 * args.n_layers + (embedding == "vocab")
    logits = m * -(-args.vocab_size // tp) * 4
    gathers = [logits] + ([m * d // tp * 4] if embedding == "dim" else [])
    assert comm["calls"]["all_reduce"] == reduces and comm["bytes"]["all_reduce"] == reduces * row
    assert comm["calls"]["all_gather"] == len(gathers) and comm["bytes"]["all_gather"] == sum(gathers)
    assert comm["calls"]["broadcast"] == 1
    print(f"decode step, {m} rows: {reduces} all-reduce x {row} B, all-gather {gathers} B, step {comm['bytes']}")


@pytest.fixture(scope="module")
def meta_dir(tmp_path_factory) -> Path:
    """A Llama-2-style tiny checkpoint in 2 model-parallel shards (embedding split on the model width)."""
    d = tmp_path_factory.mktemp("meta2")
    train_sentencepiece(d / "tokenizer.model", 400)
    sd = random_meta_state_dict(64, 2, 4, 2, 400, 192, seed=0)
    return write_meta_dir(d, {**PARAMS, "vocab_size": 400, "norm_eps": 1e-5}, split_model_parallel(sd, 2, False))


PROMPTS = [[1, 5, 9, 33, 2, 7], [1, 44, 12], [1, 300, 301, 302, 8]]


def test_meta_shards_tp2_equal_one_process(meta_dir, tmp_path):
    spec = {"model": str(meta_dir), "tp": 2, "prompts": PROMPTS, "new": 6, "logits": True, "share": True}
    ranks = run_ranks(2, spec, tmp_path)
    one = Llama.from_pretrained(meta_dir)  # merges the two shards
    with torch.no_grad():
        want = one(torch.tensor(PROMPTS[:1]))
    for k, r in enumerate(ranks):
        assert r["opened"] == [f"consolidated.{k:02d}.pth"]  # its own shard, nothing else
        assert_close(r["logits"], want, MODEL_PATH, f"rank {k} logits")
        assert r["kv_shape"][3] == 1  # 2 KV heads over 2 ranks: one each
        assert "outside the vocabulary" in r["error"]
        assert r["fingerprint"] == model_fingerprint(one)  # rebuilt from the width-split pieces
    solo = Engine(one, num_blocks=64, block_size=4).generate(PROMPTS, SamplingParams(max_new_tokens=6))
    assert all(r["tokens"] == [o.token_ids for o in solo] for r in ranks)
    engine = Engine(one, num_blocks=64, block_size=4)  # rank 0 shared this one while the others served
    engine.add_adapter("shared", load_adapter(tmp_path / "shared", one))
    shared = engine.generate(PROMPTS, SamplingParams(max_new_tokens=6), ["shared"] * 3)
    assert ranks[0]["shared_tokens"] == [o.token_ids for o in shared] != [o.token_ids for o in solo]
    assert ranks[0]["streamed"] == shared[0].text
    total, replicated = weight_bytes(one)
    assert ranks[0]["embedding"] == "dim"  # Llama 2's ParallelEmbedding layout, read from the rank's own shard
    assert all(r["bytes"] == (total - replicated) // 2 + replicated for r in ranks)  # <= 1/tp + replicated
    print(f"per-rank weight bytes {ranks[0]['bytes']} of {total} (replicated {replicated})")
    check_decode_comm(ranks[0]["decode_comm"], one.args, 2, "dim")


def _adapters(model: Llama, d: Path) -> dict[str, str]:
    """A PARA and a LoRA adapter (column- and row-parallel targets) far from the identity, saved as files."""
    g = torch.Generator().manual_seed(1)
    para = create_adapter(model, PARAConfig())
    lora = create_adapter(model, LoRAConfig(r=4, target_modules=("q_proj", "v_proj", "o_proj", "up_proj", "down_proj")))
    with torch.no_grad():  # b_up away from 1 moves the tokens whatever the pooled states; W_up ≠ 0 is sliced too
        for layer in para.layers:
            vg = layer["para"]
            vg.down.weight.copy_(torch.randn(vg.down.weight.shape, generator=g) * 0.02)  # as its own init, seeded here
            vg.up.bias.copy_(1 + torch.randn(vg.up.bias.shape, generator=g) * 0.2)
            vg.up.weight.copy_(torch.randn(vg.up.weight.shape, generator=g) * 0.02)
        for n, p in lora.named_parameters():
            std = 0.1 if "lora_B" in n else p.shape[1] ** -0.5
            p.copy_(torch.randn(p.shape, generator=g) * std)
    return {"para": str(save_adapter(para, d / "para")), "lora": str(save_adapter(lora, d / "lora"))}


def test_smollm2_tp3_mixed_adapters(smollm2, tmp_path):
    """SmolLM2's 3 KV heads over 3 ranks; a PARA row, a LoRA row and a base row in one batch."""
    tok = smollm2.tokenizer
    prompts = [tok.encode(s) for s in ("The capital of France is", "def add(a, b):", "Once upon a time")]
    files, rows = _adapters(smollm2, tmp_path), ["para", "lora", None]
    spec = {"model": "default", "tp": 3, "prompts": prompts, "new": 5, "adapters": files, "row_adapters": rows}
    ranks = run_ranks(3, spec, tmp_path)
    engine = Engine(smollm2, num_blocks=64, block_size=4)
    for name, d in files.items():
        engine.add_adapter(name, load_adapter(d, smollm2))
    want = [o.token_ids for o in engine.generate(prompts, SamplingParams(max_new_tokens=5), rows)]
    base = [o.token_ids for o in Engine(smollm2, num_blocks=64).generate(prompts, SamplingParams(max_new_tokens=5))]
    assert want[0] != base[0] and want[1] != base[1]  # each adapter matters
    assert all(r["tokens"] == want for r in ranks)
    total, replicated = weight_bytes(smollm2)
    assert all(r["bytes"] == (total - replicated) // 3 + replicated for r in ranks)
    assert all(r["kv_shape"][3] == 1 and r["fingerprint"] == model_fingerprint(smollm2) for r in ranks)
    print(f"SmolLM2 per-rank weight bytes {ranks[0]['bytes']} of {total} (replicated {replicated})")
    check_decode_comm(ranks[0]["decode_comm"], smollm2.args, 3, "vocab")


def test_cli_tp2_prints_what_tp1_prints(meta_dir, capsys):
    argv = ["--model", str(meta_dir), "--prompt", "the model", "--prompt", "quick brown fox", "--max-new-tokens", "6"]
    argv += ["--json"]
    assert generate_main(argv) == 0
    want = capsys.readouterr().out
    got = torchrun(2, ["-m", "infer.generate", "--tp", "2", *argv]).stdout
    assert got == want and len(want.splitlines()) == 2


def test_bad_tp_is_one_line(gguf_path, capsys):
    assert generate_main(["--model", "default", "--tp", "5", "--prompt", "x"]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and err.startswith("error: --tp 5 ") and "values that work: 1, 3" in err
    with pytest.raises(ValueError, match="needs 3 processes"):  # a good tp without torchrun
        Llama.from_pretrained("default", tp=3)


# ---- per-rank reading, in one process -------------------------------------------------------------------
def _check_slices(src, args, full: dict[str, torch.Tensor], size: int, embedding: str = "vocab") -> None:
    for rank in range(size):
        tp = TensorParallel(rank, size, embedding)
        got = shard_state_dict(src, args, tp)
        assert got.keys() == full.keys()
        for name, t in got.items():
            assert torch.equal(t, tp.shard(args, name, full[name])), (rank, name)


@pytest.mark.parametrize("size", [1, 4])  # a divisor and a multiple of the 2 shards (4: KV heads replicated)
def test_meta_ranks_read_their_shards(meta_dir, size):
    one = Llama.from_pretrained(meta_dir)
    full = {k: v for k, v in one.state_dict().items()}
    for rank in range(size):
        src = MetaSource(meta_dir)
        src.bind(rank, size)
        tp = TensorParallel(rank, size, "dim" if size > 1 else "vocab")
        got = shard_state_dict(src, src.args, tp)
        assert sorted(src._open) == ([0, 1] if size == 1 else [rank * 2 // size])  # whole shards only where needed
        assert all(torch.equal(t, tp.shard(one.args, k, full[k])) for k, t in got.items())


def test_hf_ranks_read_slices(tmp_path):
    """q/k rows are un-permuted per head after slicing: whole heads, so the rank's heads come out in Meta order."""
    sd = random_meta_state_dict(64, 2, 4, 2, 96, 192, seed=3)
    hf = {"model.embed_tokens.weight": sd["tok_embeddings.weight"], "model.norm.weight": sd["norm.weight"]}
    hf["lm_head.weight"] = sd["output.weight"]
    names = {"wq": "self_attn.q_proj", "wk": "self_attn.k_proj", "wv": "self_attn.v_proj", "wo": "self_attn.o_proj"}
    names.update(w1="mlp.gate_proj", w3="mlp.up_proj", w2="mlp.down_proj")
    for i in range(2):
        for meta, h in names.items():
            part = "attention" if meta.startswith("w") and meta[1] in "qkvo" else "feed_forward"
            w = sd[f"layers.{i}.{part}.{meta}.weight"]
            heads = {"wq": 4, "wk": 2}.get(meta)
            hf[f"model.layers.{i}.{h}.weight"] = w if heads is None else hf_permute(w, heads, w.shape[0], 64)
        hf[f"model.layers.{i}.input_layernorm.weight"] = sd[f"layers.{i}.attention_norm.weight"]
        hf[f"model.layers.{i}.post_attention_layernorm.weight"] = sd[f"layers.{i}.ffn_norm.weight"]
    save_file({k: v.contiguous() for k, v in hf.items()}, tmp_path / "model.safetensors")
    config = {"model_type": "llama", "hidden_size": 64, "num_hidden_layers": 2, "num_attention_heads": 4}
    config.update(num_key_value_heads=2, vocab_size=96, intermediate_size=192, max_position_embeddings=64)
    (tmp_path / "config.json").write_text(json.dumps(config))
    src = hf_source(tmp_path)
    _check_slices(src, src.args, sd, 2)


@pytest.mark.parametrize("ftype", ["F16", "BF16", "Q8_0", "Q4_1"])
def test_gguf_ranks_read_slices(tmp_path, monkeypatch, ftype):
    """Rows (raw rows) and columns: float types by element (F16) or byte (BF16), quant types along whole blocks
    (wo: 32 of 64 columns) or through them (w2: 48 of 96, dequantized in row chunks)."""
    import gguf

    from bench import gguf_writer
    from tests.helpers import tiny_meta_model
    from weights.gguf_file import load_gguf

    if ftype.startswith("Q"):  # the writer knows float types only: quantize 2-D tensors here
        qtype = getattr(gguf.GGMLQuantizationType, ftype)
        array = gguf_writer._array

        def quantized(t, _):
            if t.dim() == 1:
                return array(t, "F32")
            return gguf.quants.quantize(t.detach().float().numpy(), qtype), qtype

        monkeypatch.setattr(gguf_writer, "_array", quantized)
    path = gguf_writer.write_gguf(tiny_meta_model()[0], tmp_path / "tiny.gguf", "F32" if ftype[0] == "Q" else ftype)
    ckpt = load_gguf(path)
    _check_slices(GGUFSource(path), ckpt.args, ckpt.state_dict, 2)
