"""bench/'s modules (decode.py's helpers in measure, report, parallama_rows, peers, llamacpp and gguf_writer;
kernels.py), on the tiny model and hand-made numbers; SmolLM2 only for the GGUF writer and llama.cpp (slow)."""

from __future__ import annotations

import json
import math
import mmap
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from bench import decode, gemm_ab, gguf_writer, llamacpp, measure, parallama_rows, peers, report
from bench import kernels as bk
from infer.engine import Engine
from infer.sampling import SamplingParams
from model import Llama
from tests.helpers import TINY, hf_permute, random_meta_state_dict, tiny_hf_oracle, tiny_meta_model
from tests.tolerance import KERNEL, MODEL_PATH, ORACLE_DEEP, PATH, assert_close, assert_far

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def tiny(one_torch_thread):
    return tiny_meta_model()[0]


def check_schema(r: dict) -> None:
    for key, typ in report.ROW_SCHEMA.items():
        assert key in r, key
        assert type(r[key]) is typ, (key, type(r[key]))
    assert r["engine"] in ("parallama", "transformers", "peft", "llama.cpp")
    assert r["method"] in (*parallama_rows.METHODS, "mixed")
    assert all(math.isfinite(r[k]) and r[k] >= 0 for k in ("tps", "decode_tps", "prefill_tps", "peak_mem_mib"))


def fake(engine: str, method: str, tps: float, beams: int = 1, batch: int = 1, **kw) -> dict:
    """A row with made-up figures: tok/s = decode = prefill = tps."""
    n = kw.get("requests", batch)
    return report.row(
        engine,
        method,
        beams=beams,
        batch=batch,
        prompt_len=10,
        new_tokens=4,
        t_total=n * 4 / tps,
        t_prefill=1.0,
        kv_bytes=0,
        peak_mem_mib=0.0,
        decode_tps=tps,
        prefill_tps=tps,
        **kw,
    )


# ---- rows and schema ---------------------------------------------------------------------------------------------


def test_row_schema_and_rates():
    r = report.row(
        "transformers",
        "base",
        beams=1,
        batch=2,
        prompt_len=100,
        new_tokens=11,
        t_total=2.0,
        t_prefill=0.5,
        kv_bytes=123,
        peak_mem_mib=4,
    )
    check_schema(r)
    assert r["tps"] == pytest.approx(2 * 11 / 2.0)  # new tokens of every request / wall time incl. prefill
    assert r["decode_tps"] == pytest.approx(2 * 10 / 1.5)  # the tokens after the first / time after the prefill
    assert r["prefill_tps"] == pytest.approx(2 * 100 / 0.5)
    assert (r["tenants"], r["requests"], r["mode"]) == (1, 2, "batched")
    s = report.row(
        "parallama",
        "para",
        beams=1,
        batch=1,
        requests=8,
        tenants=8,
        mode="sequential",
        prompt_len=10,
        new_tokens=4,
        t_total=4.0,
        t_prefill=1.0,
        kv_bytes=0,
        peak_mem_mib=0.0,
    )
    assert s["tps"] == pytest.approx(8 * 4 / 4.0) and (s["batch"], s["tenants"]) == (1, 8)


def test_request_adapters():
    assert parallama_rows.request_adapters("base", 2) == [None, None]
    assert parallama_rows.request_adapters("lora", 2) == ["lora", "lora"]
    assert parallama_rows.request_adapters("mixed", 5) == [None, "para", "ia3", "lora", None]
    assert parallama_rows.request_adapters("para", 5, tenants=3) == ["para0", "para1", "para2", "para0", "para1"]


def test_bench_parallama_rows(tiny):
    ids = list(range(5, 13))  # 8 prompt tokens + 3 new = 11 tokens: one 16-token block per sequence
    per_token = 2 * TINY["n_layers"] * 2 * (TINY["dim"] // TINY["n_heads"]) * 4  # K and V, 2 kv heads, fp32
    assert measure.kv_bytes_per_token(tiny) == per_token
    r = parallama_rows.bench_parallama(tiny, ids, 3, 1, 1, "para", 1)
    check_schema(r)
    assert r["kv_bytes"] == 16 * per_token and "decode_gbs" in r
    m = parallama_rows.bench_parallama(tiny, ids, 3, 1, 1, "mixed", 4)
    assert (m["batch"], m["tenants"], m["kv_bytes"]) == (4, 4, 4 * 16 * per_token)

    regs = parallama_rows.tenant_adapters(tiny, 3)
    names = list(regs)
    seq = parallama_rows.bench_parallama(
        tiny, ids, 3, 1, 1, "para", 3, adapters=regs, assign=names, tenants=3, sequential=True
    )
    check_schema(seq)
    assert (seq["batch"], seq["requests"], seq["tenants"], seq["mode"]) == (1, 3, 3, "sequential")
    assert seq["kv_bytes"] == 16 * per_token  # one request at a time
    beams = parallama_rows.bench_parallama(tiny, ids, 3, 2, 1, "base", 1)
    assert beams["beams"] == 2 and beams["kv_bytes"] >= 2 * 16 * per_token
    # a step reads the weights and both beams' K/V (context mid-generation) and gives the request one token
    want = measure.bytes_per_decode_step(tiny, 8 + 3 // 2, 2) * beams["decode_tps"] / 1e9
    assert beams["decode_gbs"] == pytest.approx(want)


def test_tenant_adapters_differ(tiny):
    regs = parallama_rows.tenant_adapters(tiny, 3)
    pooled = torch.randn(1, TINY["dim"])
    vecs = [a.scales(0, pooled)["q"] for a in regs.values()]
    assert not torch.allclose(vecs[0], torch.ones_like(vecs[0]))  # not the identity a fresh adapter is
    assert not torch.allclose(vecs[0], vecs[1]) and not torch.allclose(vecs[1], vecs[2])
    again = parallama_rows.tenant_adapters(tiny, 3)  # seeded
    assert torch.equal(again["para1"].scales(0, pooled)["q"], vecs[1])


def test_bytes_per_decode_step_hand_count():
    from model import Llama, ModelArgs

    d, L, H, kv, V, F = 32, 2, 4, 2, 50, 48
    with torch.device("meta"):
        args = ModelArgs(dim=d, n_layers=L, n_heads=H, n_kv_heads=kv, vocab_size=V, hidden_dim=F, tie_embeddings=True)
        model = Llama(args)
    hd = d // H
    per_layer = (H * hd + 2 * kv * hd) * d + d * H * hd + 3 * F * d + 2 * d  # wqkv, wo, w1 w2 w3, two norms
    weights = (V * d + L * per_layer + d) * 4  # the tied embedding / output counted once, plus the final norm
    assert measure.weight_bytes(model) == weights
    kv_token = 2 * L * kv * hd * 4
    assert measure.bytes_per_decode_step(model, 0, 0) == weights
    assert measure.bytes_per_decode_step(model, 10, 3) == weights + 3 * 10 * kv_token


# ---- targets ---------------------------------------------------------------------------------------------------


def test_summary_targets():
    rows = [
        fake("parallama", "base", 100.0),
        fake("parallama", "para", 99.0),  # 0.99 of base: within 2%
        fake("parallama", "lora", 90.0),  # PARA only 1.1x LoRA: not met
        fake("transformers", "base", 30.0),  # parallama 3.33x: met (decode and prefill)
        fake("peft", "lora", 20.0),
        fake("parallama", "para", 400.0, batch=8, tenants=8),
        fake("parallama", "para", 410.0, batch=8),  # 8 adapters 0.976x one adapter: met
        fake("parallama", "para", 120.0, batch=1, requests=8, tenants=8, mode="sequential"),
        fake("peft", "lora", 150.0, batch=8, tenants=8),  # 2.67x: not met
        fake("transformers", "base", 200.0, batch=8),
    ]
    rows[0]["roof_frac"] = 0.55
    kv = {"paged_bytes": 104, "needed_bytes": 100}
    t = {x["target"]: x for x in report.summarize(rows, kv, tenants=8)}
    assert t["decode tok/s vs transformers (beams 1)"]["met"] is True
    assert t["decode tok/s vs transformers (beams 1)"]["ratio"] == pytest.approx(100 / 30)
    assert t["prefill tok/s vs transformers (beams 1)"]["met"] is True
    assert t["decode bandwidth / measured roof (beams 1, batch 1)"]["met"] is False
    assert t["PARA / base tok/s (beams 1, batch 1)"]["met"] is True
    assert t["PARA / LoRA-unmerged tok/s (beams 1, batch 1)"]["ratio"] == pytest.approx(1.1)
    assert t["PARA / LoRA-unmerged tok/s (beams 1, batch 1)"]["met"] is False
    assert t["parallama / peft lora tok/s (beams 1, batch 1)"]["met"] is None  # reported, no goal
    w = "8 tenants, beams 1: "
    assert t[w + "8 PARA adapters / one adapter tok/s"]["ratio"] == pytest.approx(400 / 410)
    assert t[w + "8 PARA adapters / one adapter tok/s"]["met"] is True
    assert t[w + "parallama mixed PARA / peft mixed LoRA tok/s"]["met"] is False
    assert t[w + "peft mixed LoRA / its base batch tok/s"]["ratio"] == pytest.approx(0.75)
    assert t[w + "one batch / 8 sequential runs tok/s"]["ratio"] == pytest.approx(400 / 120)
    assert t["paged KV bytes / bytes the tokens need (ragged batch)"]["met"] is True  # 1.04 <= 1.05
    assert "PARA / base tok/s (beams 1, batch 8)" not in t  # no base row at batch 8
    kv_bad = report.summarize(rows, {"paged_bytes": 110, "needed_bytes": 100})[-1]
    assert kv_bad["met"] is False and kv_bad["at_most"]

    # only targets whose rows ran: no transformers row, no LoRA row, no tenants
    only = {x["target"] for x in report.summarize([fake("parallama", "base", 1.0), fake("parallama", "para", 2.0)])}
    assert only == {"PARA / base tok/s (beams 1, batch 1)"}
    text = report.format_summary(report.summarize(rows, kv, tenants=8))
    assert "| not met |" in text and "| met |" in text and "≤ 1.05" in text


def test_paired_ratio_cancels_drift_between_rounds():
    """Rows run in the same interleaved rounds compare round by round: a machine twice as fast in round 2
    moves both rows alike, so the paired ratio is the per-round 0.9, while the ratio of medians is not."""
    base, para = fake("parallama", "base", 100.0), fake("parallama", "para", 99.0)
    base["runs_tps"], para["runs_tps"] = [100.0, 200.0, 100.0], [90.0, 180.0, 90.0]
    t = report._target("PARA / base", para, base, "tps", 0.98)
    assert t["paired"] and t["ratio"] == pytest.approx(0.9) and t["met"] is False
    para["runs_tps"] = [90.0, 180.0]  # not the same rounds: the medians' ratio
    t = report._target("PARA / base", para, base, "tps", 0.98)
    assert not t["paired"] and t["ratio"] == pytest.approx(0.99) and t["met"] is True
    assert "per-round" not in report.format_summary([t])


def test_interleaved_rounds_rotate_the_order():
    order = []

    class Case:
        def __init__(self, name):
            self.name = name

        def run(self):
            order.append(self.name)

        def row(self):
            return {"name": self.name}

    rows = parallama_rows.run_interleaved([Case("a"), Case("b"), Case("c")], runs=4)
    assert [r["name"] for r in rows] == ["a", "b", "c"]
    assert order == [*"abc", *"bca", *"cab", *"abc"]


def test_table_and_roof():
    rows = [fake("parallama", "base", 50.0), fake("peft", "ia3", 10.0), fake("transformers", "base", 20.0)]
    rows[0]["decode_gbs"] = 10.0
    report.add_roof(rows, 40.0)
    assert rows[0]["roof_frac"] == pytest.approx(0.25) and "roof_frac" not in rows[1]
    table = report.format_table(rows)
    assert "| 25% |" in table and "| 0.500x |" in table  # peft rows compare with the transformers base


# ---- measurement -----------------------------------------------------------------------------------------------


def test_bandwidth_helpers():
    samples = measure.measure_bandwidth("cpu", 16 * 2**20, reads=2)
    assert len(samples) == 2 and all(s > 0 for s in samples)
    s = measure.bandwidth_summary([10.0, 30.0], [20.0])
    assert (s["max"], s["median"], s["min"], s["used"]) == (30.0, 20.0, 10.0, "max")
    assert measure.bandwidth_buffer_bytes(0, 32 * 2**20) >= 4 * 32 * 2**20
    assert measure.bandwidth_buffer_bytes(2**31, 32 * 2**20) == 2**31  # at least the weights a decode step reads
    assert measure.bandwidth_buffer_bytes(0, None) == 512 * 2**20


def test_peak_memory_cpu():
    # fresh pages from the kernel: a heap allocation may reuse pages an earlier test left resident (then the
    # high-water mark does not move, and the outcome would depend on test order)
    with measure.PeakMemory("cpu") as m:
        buf = mmap.mmap(-1, 64 * 2**20)
        for i in range(0, len(buf), mmap.PAGESIZE):
            buf[i] = 1  # touch every page
        buf.close()
    if not m.hwm:
        pytest.skip("no resettable RSS high-water mark here (/proc/self/clear_refs)")
    assert 50 <= m.mib < 1024


def test_plot_without_matplotlib(monkeypatch, capsys, tmp_path):
    monkeypatch.setitem(sys.modules, "matplotlib", None)  # import matplotlib -> ImportError
    monkeypatch.setitem(sys.modules, "matplotlib.pyplot", None)
    assert report.plot([fake("parallama", "base", 1.0)], tmp_path / "x.png") is False
    assert report.MPL_MISSING in capsys.readouterr().out
    assert not (tmp_path / "x.png").exists()


@pytest.mark.skipif(not gemm_ab.available(), reason="torch without MKL's packed GEMM")
def test_gemm_ab_packed_products_match(tiny):
    """The packed-once GEMM gives F.linear's products (the bench checks before it times) for every projection."""
    weights = gemm_ab.layer_weights(tiny)
    assert len(weights) == tiny.args.n_layers and [w.shape for w in weights[0]] == [
        (tiny.args.q_dim + 2 * tiny.args.kv_dim, tiny.args.dim),
        (tiny.args.dim, tiny.args.q_dim),
        (2 * tiny.args.ffn_dim, tiny.args.dim),
        (tiny.args.dim, tiny.args.ffn_dim),
    ]
    result = gemm_ab.measure(weights, rows=13, rounds=2)
    assert result["max_rel_diff"] <= PATH.bound and result["rows"] == 13 and result["rounds"] == 2
    assert result["unpacked_ms"] > 0 and result["packed_ms"] > 0 and result["speedup"] > 0
    assert gemm_ab.main(["--rows", "0"]) == 2


def test_compiled_step_falls_back(tiny, capsys):
    # no torch.compile here: only the fallback is under test
    step = parallama_rows.CompiledStep.__new__(parallama_rows.CompiledStep)
    calls = []
    step.eager = lambda *a: calls.append(a) or "eager"

    def broken(*a):
        raise RuntimeError("no compiler\nmore")

    step.compiled, step.error = broken, None
    assert step(1) == "eager" and step(2) == "eager"
    assert step.error == "RuntimeError: no compiler" and calls == [(1,), (2,)]
    assert capsys.readouterr().err.count("--compile failed") == 1


def test_parse_args():
    a = decode.parse_args(["--quick", "--methods", "lora"])
    assert (a.runs, a.beams, a.batch, a.methods, a.tenants, a.device) == (3, [1], [1], ["base", "para"], 0, "cpu")
    for bad in (["--tenants", "1"], ["--runs", "0"], ["--dtype", "int8"]):
        with pytest.raises(SystemExit):
            decode.parse_args(bad)
    if not torch.cuda.is_available():
        with pytest.raises(SystemExit):
            decode.parse_args(["--device", "cuda"])


# ---- peers ------------------------------------------------------------------------------------------------------


def test_peft_peers_on_tiny_transformers(one_torch_thread):
    pytest.importorskip("peft")
    _, sd = tiny_meta_model()
    hf = tiny_hf_oracle(sd)
    ids = [3, 5, 7, 9, 11, 13]
    x = torch.tensor([ids] * 3)
    with torch.no_grad():
        plain = hf(x).logits
    pm = peers.peft_model(hf, "lora", 3)
    names = ["t0", "t1", "t2"]
    with torch.no_grad():
        mixed = pm(x, adapter_names=names).logits
    assert_far(mixed[0], mixed[1], MODEL_PATH)
    assert_far(mixed[1], mixed[2], MODEL_PATH)
    r = peers.bench_hf(
        pm,
        ids,
        3,
        1,
        1,
        batch=3,
        engine="peft",
        method="lora",
        tenants=3,
        weights=1000,
        generate_kwargs={"adapter_names": names},
    )
    check_schema(r)
    assert (r["batch"], r["tenants"], r["engine"]) == (3, 3, "peft") and r["decode_gbs"] > 0
    hf = pm.unload()
    clock = peers.StepClock()
    with torch.no_grad():
        hf.generate(x[:1], max_new_tokens=4, min_new_tokens=4, do_sample=False, logits_processor=[clock])
    assert len(clock.times) == 4 and clock.decode_tps(1) > 0  # one call per new token: prefill, then 3 decodes
    clock.times = [10.0, 10.5, 11.0]
    assert clock.decode_tps(2) == pytest.approx(2 * 2 / 1.0)
    ia3 = peers.peft_model(hf, "ia3")
    check_schema(peers.bench_hf(ia3, ids, 3, 2, 1, engine="peft", method="ia3"))
    hf = ia3.unload()
    with torch.no_grad():
        torch.testing.assert_close(hf(x).logits, plain)  # unload gives the plain model back


# ---- the GGUF writer and llama.cpp ---------------------------------------------------------------------------------

PROMPT = "The history of science is the study of"


def logits_of(model: Llama, ids: list[int]) -> torch.Tensor:
    with torch.no_grad():
        return model(torch.tensor([ids]))[0]


def greedy(model: Llama, ids: list[int], new: int) -> list[int]:
    engine = Engine(model, num_blocks=(len(ids) + new) // 16 + 2)
    return engine.generate([ids], SamplingParams(max_new_tokens=new, ignore_eos=True))[0].token_ids


def tied_tiny() -> Llama:
    from model import ModelArgs

    t = TINY
    sd = random_meta_state_dict(
        t["dim"], t["n_layers"], t["n_heads"], 2, t["vocab_size"], t["hidden_dim"], 1, tied=True
    )
    with torch.device("meta"):
        model = Llama(ModelArgs(**t, n_kv_heads=2, max_seq_len=64, tie_embeddings=True))
    model.load_weights(sd)
    model.setup_rope("cpu")
    return model.eval()


def test_gguf_writer_round_trip(tiny, tmp_path):
    """Written and loaded back by parallama's own GGUF loader, the weights are bit-exact (wq/wk rows in
    the order GGUF holds them), a tied head is left out and comes back tied, and the logits agree."""
    ids = [3, 5, 7, 9, 11, 13]
    for name, model in (("untied", tiny), ("tied", tied_tiny())):
        back = Llama.from_pretrained(gguf_writer.write_gguf(model, tmp_path / f"{name}.gguf"))
        assert back.args.tie_embeddings == model.args.tie_embeddings and back.tokenizer is None
        want, got = model.state_dict(), back.state_dict()
        assert set(got) == set(want) and all(torch.equal(got[k], want[k]) for k in want), name
        assert_close(logits_of(back, ids), logits_of(model, ids), PATH, msg=name)

    import gguf

    reader = gguf.GGUFReader(tmp_path / "tied.gguf")
    names = {t.name: t for t in reader.tensors}
    assert "output.weight" not in names and "token_embd.weight" in names  # llama.cpp reuses the embedding
    q = names["blk.0.attn_q.weight"]
    assert q.tensor_type == gguf.GGMLQuantizationType.F32 and q.shape.tolist() == [TINY["dim"], TINY["dim"]]
    assert names["blk.0.ffn_up.weight"].shape.tolist() == [TINY["dim"], TINY["hidden_dim"]]  # ne0 = in features
    assert sum(int(t.n_bytes) for t in reader.tensors) == gguf_writer.gguf_bytes(tied_tiny(), "F32")

    # negative control: wq of one layer in HF's half-split RoPE row order, the layout mistake a writer can make
    sd = dict(tiny.state_dict())
    wq = "layers.0.attention.wq.weight"
    sd[wq] = hf_permute(sd[wq], TINY["n_heads"], TINY["dim"], TINY["dim"])
    bad = Llama.from_pretrained(gguf_writer.write_gguf(tiny, tmp_path / "bad.gguf", tensors=sd))
    assert_far(logits_of(bad, ids), logits_of(tiny, ids), PATH)


def test_gguf_writer_16_bit_files(tiny, tmp_path):
    from weights.gguf_file import load_gguf, read_gguf_metadata

    for ftype, dtype, file_type in (("F16", torch.float16, 1), ("BF16", torch.bfloat16, 32)):
        path = gguf_writer.write_gguf(tiny, tmp_path / f"{ftype}.gguf", ftype)
        assert read_gguf_metadata(path)["general.file_type"] == file_type
        got = load_gguf(path).state_dict
        for k, v in tiny.state_dict().items():  # matrices rounded to the type, norms kept in F32
            assert torch.equal(got[k], v if v.dim() == 1 else v.to(dtype).float()), (ftype, k)
    with pytest.raises(ValueError, match="ftype"):
        gguf_writer.write_gguf(tiny, tmp_path / "x.gguf", "Q4_0")


@pytest.fixture(scope="module")
def smollm2_f32(smollm2, tmp_path_factory):
    from weights.default import default_gguf_path

    path = tmp_path_factory.mktemp("gguf") / "smollm2-f32.gguf"
    return gguf_writer.write_gguf(smollm2, path, tokenizer_from=default_gguf_path())


@pytest.mark.slow
def test_gguf_writer_smollm2_round_trip(smollm2, smollm2_f32):
    """The default model (dequantized from Q4_1) written as F32 with its tokenizer: reloaded, the same
    tokenizer and weights and logits."""
    back = Llama.from_pretrained(smollm2_f32)
    ids = smollm2.tokenizer.encode(PROMPT, bos=False)
    assert back.tokenizer.encode(PROMPT, bos=False) == ids
    assert back.args == smollm2.args
    assert_close(logits_of(back, ids), logits_of(smollm2, ids), PATH)


@pytest.mark.slow
def test_llamacpp_matches_parallama_on_smollm2(smollm2, smollm2_f32):
    """llama.cpp on the F32 file, as the bench runs it: parallama's greedy tokens, and first-step logits
    within ORACLE_DEEP (the bound for another implementation of this 30-layer model on the same weights:
    transformers). Measured here: 1.5e-6 relative (max abs 3.6e-5 on logits up to 24.5), 35x under the
    bound; llama.cpp's F32 GEMMs and its F32 K/V cache differ from parallama's only in summation order."""
    pytest.importorskip("llama_cpp")
    ids = smollm2.tokenizer.encode(PROMPT, bos=False)
    case = llamacpp.LlamaCppCase(smollm2, smollm2_f32, ids, 8)  # its warm-up run is a greedy generation
    try:
        assert case.llm.tokenize(PROMPT.encode(), add_bos=False) == ids  # the tokenizer fields came across
        want = greedy(smollm2, ids, 8)
        assert case.tokens == want
        case.llm.reset()
        got = torch.from_numpy(case.logits(ids).copy())
        assert_close(got, logits_of(smollm2, ids)[-1], ORACLE_DEEP)
        assert int(got.argmax()) == want[0]
    finally:
        case.close()


def test_llamacpp_rows_interleaved_on_tiny(tiny):
    """llama.cpp's cases (F32, and F16 for a 16-bit run) in the same rounds as a parallama case, on an
    ids-only file of the tiny model: rows in the schema, paired targets, greedy tokens = parallama's."""
    pytest.importorskip("llama_cpp")
    ids = list(range(5, 13))
    with llamacpp.cases(tiny, ids, 3, torch.float16, None, threads=1) as cs:
        assert [c.ftype for c in cs] == ["F32", "F16"]
        assert cs[0].tokens == greedy(tiny, ids, 3)
        n_ctx = cs[0].llm.n_ctx()
        paths = [Path(c.llm.model_path) for c in cs]
        rows = parallama_rows.run_interleaved([parallama_rows.ParallamaCase(tiny, ids, 3, 1), *cs], runs=2)
    assert not any(p.exists() for p in paths)  # the temp files are gone
    for r in rows:
        check_schema(r)
    p, f32, f16 = rows
    assert (f32["engine"], f32["gguf_type"], f32["kv_type"], f32["threads"]) == ("llama.cpp", "F32", "F32", 1)
    assert f32["kv_bytes"] == n_ctx * 2 * TINY["n_layers"] * 2 * (TINY["dim"] // TINY["n_heads"]) * 4
    assert f16["kv_bytes"] == f32["kv_bytes"] // 2 and f32["decode_gbs"] > 0
    assert all(len(r[k]) == 2 for r in rows for k in ("runs_tps", "runs_decode_tps", "runs_prefill_tps"))
    t = {x["target"]: x for x in report.summarize(rows)}
    d = t["decode tok/s vs llama.cpp F32 (beams 1, batch 1)"]
    assert d["paired"] and d["goal"] == 1.0
    assert t["prefill tok/s vs llama.cpp F16 (beams 1, batch 1)"]["goal"] is None  # the 16-bit file: reported
    assert "| llama.cpp F16 | base |" in report.format_table(rows)


def test_llamacpp_targets_and_flags():
    rows = [fake("parallama", "base", 100.0), fake("llama.cpp", "base", 200.0)]
    rows[1]["gguf_type"] = "F32"
    t = {x["target"]: x for x in report.summarize(rows)}
    assert t["decode tok/s vs llama.cpp F32 (beams 1, batch 1)"]["ratio"] == pytest.approx(0.5)
    assert t["decode tok/s vs llama.cpp F32 (beams 1, batch 1)"]["met"] is False
    assert t["prefill tok/s vs llama.cpp F32 (beams 1, batch 1)"]["met"] is False
    assert decode.parse_args([]).peers == ["transformers", "llamacpp"]
    assert decode.parse_args(["--no-peers"]).peers == decode.parse_args(["--peers"]).peers == []
    assert "off" in llamacpp.skip_reason(decode.parse_args(["--peers", "transformers"]))
    if llamacpp.available():
        assert llamacpp.skip_reason(decode.parse_args(["--peers", "llamacpp"])) is None
        assert "beams 1, batch 1 only" in llamacpp.skip_reason(decode.parse_args(["--beams", "3"]))
    assert llamacpp.gguf_types(torch.float32) == ["F32"] and llamacpp.gguf_types(torch.bfloat16) == ["F32", "BF16"]


def test_decode_main_llamacpp_rows_or_one_line(tiny, monkeypatch, tmp_path, capsys):
    """decode.main on the tiny model (bandwidth and ragged-KV figures stubbed): with llama_cpp its F32 row
    runs beside parallama's; without it, one line says so and the run goes on."""
    monkeypatch.setattr(decode, "Llama", type("L", (), {"from_pretrained": staticmethod(lambda *a, **k: tiny)}))
    monkeypatch.setattr(decode, "make_prompt", lambda tokenizer, n: list(range(5, 5 + n)))
    monkeypatch.setattr(decode, "measure_bandwidth", lambda *a, **k: [10.0])
    kv = dict.fromkeys(("needed_bytes", "paged_bytes", "contiguous_batch_max_bytes", "contiguous_max_seq_len_bytes"), 1)
    monkeypatch.setattr(decode, "kv_memory_ragged", lambda *a, **k: {"lens": [1], "new_tokens": 1, **kv})
    monkeypatch.setattr(llamacpp, "tokenizer_gguf", lambda source: None)  # the tiny model has no tokenizer
    argv = ["--runs", "1", "--new-tokens", "3", "--prompt-len", "8", "--peers", "llamacpp", "--json"]
    if llamacpp.available():
        assert decode.main([*argv, str(tmp_path / "with.json")]) == 0
        rows = json.loads((tmp_path / "with.json").read_text())["rows"]
        assert [(r["engine"], r.get("gguf_type")) for r in rows] == [("parallama", None), ("llama.cpp", "F32")]
    capsys.readouterr()
    monkeypatch.setitem(sys.modules, "llama_cpp", None)  # import llama_cpp -> ImportError
    assert decode.main([*argv, str(tmp_path / "without.json")]) == 0
    said = [line for line in capsys.readouterr().err.splitlines() if "llama.cpp" in line]
    assert len(said) == 1 and said[0].endswith(llamacpp.MISSING)
    rows = json.loads((tmp_path / "without.json").read_text())["rows"]
    assert [r["engine"] for r in rows] == ["parallama"]


# ---- bench/kernels.py ----------------------------------------------------------------------------------------------


@pytest.mark.skipif(torch.cuda.is_available(), reason="the CPU skip path")
def test_kernels_bench_skips_on_cpu():
    p = subprocess.run([sys.executable, str(ROOT / "bench" / "kernels.py")], capture_output=True, text=True, timeout=60)
    assert p.returncode == 0, p.stderr
    assert p.stdout.strip() == bk.SKIP


def test_kernel_cases_match_twins(monkeypatch):
    """Every case's kernel and twin agree on a tiny shape (the interpreter on CPU), so the timings compare like
    with like."""
    pytest.importorskip("triton")
    from kernels import linear_scale

    device = "cuda" if torch.cuda.is_available() else "cpu"
    if device == "cpu":
        from triton.runtime.interpreter import InterpretedFunction

        if not isinstance(linear_scale.linear_scale_kernel, InterpretedFunction):
            pytest.skip("TRITON_INTERPRET was not set before triton was imported")
    monkeypatch.setitem(bk.MODELS, "tiny", (64, 4, 2, 16, 96))
    cases = bk.cases("tiny", 3, torch.float32, 40, device=device)
    assert [c[0] for c in cases] == ["linear_scale", "gated_up", "rms_norm", "rope", "paged_attention_decode"]
    for name, kernel, twin, moved in cases:
        assert_close(kernel(), twin(), KERNEL, msg=name)
        assert moved > 0


# ---------------------------------------------------------------- op budget


def test_op_counter_counts_top_level_calls_and_views():
    from bench.opcount import OpCounter

    x = torch.ones(4, 3)
    with OpCounter() as c:
        y = torch.add(x, 1)
        z = y.view(-1)
        assert z.numel() == 12  # metadata: not an op
        torch.mm(x, x.t())
    s = c.summary(n_layers=2)
    assert s["by_op"] == {"add": 1, "view": 1, "t": 1, "mm": 1}
    assert (s["torch_ops"], s["views"], s["launches"], s["torch_ops_per_layer"]) == (4, 2, 2, 2.0)


def _tiny_engine(backend: str, n_layers: int):
    from infer.engine import Engine
    from model import Llama, ModelArgs
    from tests.helpers import random_meta_state_dict

    sd = random_meta_state_dict(64, n_layers, 4, 2, 97, 96, seed=0)
    args = ModelArgs(dim=64, n_layers=n_layers, n_heads=4, n_kv_heads=2, vocab_size=97, hidden_dim=96, max_seq_len=64)
    with torch.device("meta"):
        model = Llama(args, backend=backend)
    model.load_weights({k: v.clone() for k, v in sd.items()})
    model.setup_rope("cpu")
    return Engine(model.eval(), num_blocks=16, block_size=4)


@pytest.mark.parametrize("backend", ["torch", "cpu", "triton"])
def test_decode_op_budget_is_per_layer(backend):
    """Each added layer adds the same count; on triton each layer makes exactly the model's 8 fused-kernel calls
    (2 RMSNorms, the QKV, O and down projections, RoPE with the KV write, the gated up projection, paged decode
    attention) and launches nothing else."""
    from bench.opcount import decode_step_ops
    from infer.sampling import SamplingParams
    from model.peft import PARAConfig, create_adapter

    if backend == "triton" and os.environ.get("TRITON_INTERPRET") != "1":
        pytest.skip("needs Triton's interpreter (tests/conftest.py sets it without CUDA)")
    counts = []
    for n_layers in (2, 4, 6):
        engine = _tiny_engine(backend, n_layers)
        engine.add_adapter("para", create_adapter(engine.model, PARAConfig(r=4)))
        params = SamplingParams(max_new_tokens=3, ignore_eos=True)
        counts.append(decode_step_ops(engine, list(range(1, 8)), params, adapter="para"))
        assert "forward_step" not in vars(engine.model)  # the counting wrapper is gone
    for key in ("torch_ops", "launches", "kernels"):
        per_layer = [(b[key] - a[key]) / 2 for a, b in zip(counts, counts[1:])]
        assert per_layer[0] == per_layer[1], (key, per_layer)
    kernels_per_layer = (counts[1]["kernels"] - counts[0]["kernels"]) / 2
    assert kernels_per_layer == (8 if backend == "triton" else 0)
    if backend == "triton":  # and nothing else launches per layer: RoPE and the KV write are one kernel
        assert (counts[1]["launches"] - counts[0]["launches"]) / 2 == 8


def test_op_budget_targets():
    from bench.opcount import budget_targets

    ops = {"para": {"torch_ops_per_layer": 20.0, "launches_per_layer": 7.5}}
    cpu = {t["target"]: t for t in budget_targets(ops, "cpu")}
    assert cpu["decode torch ops per layer (cpu backend, para, batch 1)"]["met"] is False
    assert cpu["decode launches per layer (cpu backend, para, batch 1)"]["goal"] is None
    tri = {t["target"]: t for t in budget_targets(ops, "triton")}
    assert tri["decode launches per layer (triton backend, para, batch 1)"]["met"] is True


@pytest.mark.parametrize("compiled", [False, True], ids=["per-op", "compiled-layer"])
def test_decode_profile_times_every_op_and_restores_them(compiled):
    from bench.step_profile import decode_profile, format_profile
    from infer.sampling import SamplingParams
    from kernels import native

    if compiled and not native.available():
        pytest.skip("the compiled decode layer did not build here")
    engine = _tiny_engine("cpu", 2)
    ops = engine.model.ops
    before = dict(vars(ops))
    if not compiled:
        ops.decode_layer = None  # the per-op path (the ops object is shared: restored below)
    try:
        p = decode_profile(engine, list(range(1, 8)), SamplingParams(max_new_tokens=5, ignore_eos=True))
        assert vars(ops) == {**before, "decode_layer": before["decode_layer"] if compiled else None}
    finally:
        vars(ops).clear()
        vars(ops).update(before)
    assert p["steps"] == 3  # 5 new tokens: the first engine step makes 2 (prefill, decode), 3 steps follow
    assert all(ms > 0 for ms in p["ops_ms"].values())
    if compiled:  # per step: one call for all layers, the output projection, the final norm's add
        assert p["calls"] == {"decode_layers": 1, "decode_linear": 1, "add_rms_norm": 1}
    else:
        # hand count for 2 layers: Q|K|V, O and down projections per layer; the first layer's input norm has
        # no residual to add, the final norm does
        want = {"linear_scale": 6, "gated_up": 2, "lm_head": 1, "paged_attention": 2, "rope_write_kv": 2}
        assert p["calls"] == {**want, "rms_norm": 1, "add_rms_norm": 4}
    assert p["outside_ops_ms"] < p["step_ms"]
    assert "| **step** |" in format_profile(p)


def test_remaining_arithmetic():
    from bench.step_profile import remaining

    p = {"step_ms": 50.0, "ops_ms": {"linear_scale": 20.0, "gated_up": 10.0, "lm_head": 5.0, "paged_attention": 3.0}}
    p["outside_ops_ms"] = 7.0
    one, two = remaining(p, 538_000_000, 50.0, "llama.cpp F32")
    # 538 MB in 35 ms = 15.4 GB/s; the peer's step 20 ms = 26.9 GB/s; 35 / 20 = 1.75x, 15 / 20 = 0.75x
    assert "projections 35.0 ms = 538 MB at 15.4 GB/s" in one and "everything else 15.0 ms" in one
    assert "step 20.0 ms" in two and "26.9 GB/s" in two and "1.75x" in two and "0.75x" in two
    assert len(remaining(p, 538_000_000, None, "llama.cpp F32")) == 1


def test_prefill_profile_counts_one_prefill_and_its_flops():
    from bench.step_profile import format_profile, prefill_flops, prefill_profile

    engine = _tiny_engine("cpu", 2)
    ops = engine.model.ops
    before = dict(vars(ops))
    p = prefill_profile(engine, list(range(1, 8)), runs=3)
    assert vars(ops) == before  # every op restored
    assert p["steps"] == 3
    # hand count for 2 layers over the 7 prompt rows (a prefill never takes the compiled decode layers)
    want = {"linear_scale": 6, "gated_up": 2, "lm_head": 1, "paged_attention": 2, "rope_write_kv": 2}
    assert p["calls"] == {**want, "rms_norm": 1, "add_rms_norm": 4}
    assert 0 < p["outside_ops_ms"] < p["step_ms"]
    assert "| **prefill** |" in format_profile(p, "prefill")
    m, a = engine.model, engine.model.args
    per_layer = a.dim * (a.q_dim + 2 * a.kv_dim) + a.q_dim * a.dim + 3 * a.dim * a.ffn_dim
    assert prefill_flops(m, 7) == 2 * 7 * a.n_layers * per_layer + 2 * a.vocab_size * a.dim


def test_prefill_remaining_arithmetic():
    from bench.step_profile import prefill_remaining

    p = {"step_ms": 250.0, "ops_ms": {"linear_scale": 100.0, "gated_up": 90.0, "lm_head": 4.0, "paged_attention": 30.0}}
    p["outside_ops_ms"] = 26.0
    one, two = prefill_remaining(p, 58_000_000_000, 1096.0, "transformers", 274, 1.2)
    # 58 GFLOP in 194 ms = 299 GFLOP/s; the peer's 274 tokens at 1096 tok/s = 250 ms; / 1.2 = 208.3 ms,
    # 208.3 - 194 = 14.3 ms left for what takes 56 ms now
    assert "projections 194.0 ms = 58.0 GFLOP at 299 GFLOP/s" in one and "everything else 56.0 ms" in one
    assert "paged_attention 30.0" in one
    assert "prefill 250.0 ms" in two and "208.3 ms" in two and "leaves 14.3 ms" in two and "takes 56.0 ms" in two
    assert len(prefill_remaining(p, 58_000_000_000, None, "transformers", 274, 1.2)) == 1


def test_transformers_in_the_same_rounds_is_paired(one_torch_thread):
    """An HFCase timed in parallama's rounds carries one figure per round, so the prefill target is the median
    of per-round ratios (hand-checked here), not a ratio of medians from different minutes."""
    model, sd = tiny_meta_model()
    hf = tiny_hf_oracle(sd)
    ids = [3, 5, 7, 9, 11, 13]
    ours, theirs = parallama_rows.run_interleaved(
        [parallama_rows.ParallamaCase(model, ids, 3, 1), peers.HFCase(hf, ids, 3, 1, weights=1000)], 3
    )
    check_schema(theirs)
    assert theirs["engine"] == "transformers" and theirs["decode_gbs"] > 0
    assert len(ours["runs_prefill_tps"]) == len(theirs["runs_prefill_tps"]) == 3
    t = report._target("prefill", ours, theirs, "prefill_tps", 1.2)
    per_round = [a / b for a, b in zip(ours["runs_prefill_tps"], theirs["runs_prefill_tps"])]
    assert t["paired"] and t["ratio"] == pytest.approx(sorted(per_round)[1])
    assert theirs["prefill_tps"] == pytest.approx(
        len(ids) / sorted(len(ids) / r for r in theirs["runs_prefill_tps"])[1]
    )
    alone = peers.bench_hf(hf, ids, 3, 1, 3)  # timed in rounds of its own: never paired with parallama's
    assert "runs_prefill_tps" not in alone and not report._target("p", ours, alone, "prefill_tps", 1.2)["paired"]
