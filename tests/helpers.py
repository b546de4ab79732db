"""Test-side builders for tiny checkpoints and their transformers oracles.

Everything here is written from the formats' own definitions (Meta's fairscale sharding, HF's
conversion-script permutation, Meta's FFN rule), never by calling the loaders under test.
"""

from __future__ import annotations

import base64
import io
import json
import math
import random
from pathlib import Path

import torch

WORDS = (
    "the a an of and to in is was for on with as by at from that this it be are were has have had not but or "
    "model weight tensor shard layer head token rope norm vocab batch cache kernel llama alpaca camel river "
    "mountain quick brown fox jumps over lazy dog seven bright stars shine above quiet valley morning evening "
    "engineer writes tests checks numbers carefully before lunch tiny random checkpoint loads correctly"
).split()

# Llama 3's pre-tokenizer split pattern (from Meta's tokenizer.py), used for the tiktoken oracle.
LLAMA3_PAT = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}"
    r"| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"
)
LLAMA3_MERGES = [
    b"th",
    b"he",
    b"the",
    b" t",
    b" the",
    b"in",
    b"ng",
    b"ing",
    b" a",
    b"an",
    b"and",
    b" and",
    b"er",
    b"es",
    b"st",
    b"te",
    b"tes",
    b"test",
    b"tests",
    b" tests",
]


def sentences(n: int, seed: int = 0) -> list[str]:
    rng = random.Random(seed)
    out = []
    for _ in range(n):
        words = [rng.choice(WORDS) for _ in range(rng.randint(4, 14))]
        s = " ".join(words).capitalize() + rng.choice([".", "!", "?", ", 42.", " (7)."])
        out.append(s)
    return out


def train_sentencepiece(path: Path, vocab_size: int = 400) -> Path:
    """A Llama-2-style tokenizer.model: BPE with byte fallback, <unk>=0 <s>=1 </s>=2."""
    import sentencepiece as spm

    buf = io.BytesIO()
    spm.SentencePieceTrainer.train(
        sentence_iterator=iter(sentences(600)),
        model_writer=buf,
        model_type="bpe",
        vocab_size=vocab_size,
        byte_fallback=True,
        character_coverage=1.0,
        add_dummy_prefix=True,
        minloglevel=2,
    )
    path.write_bytes(buf.getvalue())
    return path


def llama3_ranks() -> dict[bytes, int]:
    """256 single bytes (in a shuffled rank order, as real rank files are not byte-ordered) + a few merges."""
    order = list(range(256))
    random.Random(3).shuffle(order)
    ranks = {bytes([b]): r for r, b in enumerate(order)}
    for m in LLAMA3_MERGES:
        ranks[m] = len(ranks)
    return ranks


def write_tiktoken_model(path: Path) -> int:
    """Meta's Llama 3 tokenizer.model layout: `base64(token) rank` per line. Returns n_base."""
    ranks = llama3_ranks()
    lines = [f"{base64.b64encode(tok).decode()} {rank}" for tok, rank in sorted(ranks.items(), key=lambda kv: kv[1])]
    path.write_text("\n".join(lines) + "\n")
    return len(ranks)


def meta_ffn_dim(dim: int, multiple_of: int, ffn_dim_multiplier: float | None) -> int:
    """Meta's FeedForward sizing, as written in llama/model.py."""
    hidden = int(2 * (4 * dim) / 3)
    if ffn_dim_multiplier is not None:
        hidden = int(ffn_dim_multiplier * hidden)
    return multiple_of * ((hidden + multiple_of - 1) // multiple_of)


def hf_permute(w: torch.Tensor, n_heads: int, dim1: int, dim2: int) -> torch.Tensor:
    """HF's convert_llama_weights_to_hf.py `permute`: Meta interleaved pairs → rotate-half rows."""
    return w.view(n_heads, dim1 // n_heads // 2, 2, dim2).transpose(1, 2).reshape(dim1, dim2)


def random_meta_state_dict(
    dim: int, n_layers: int, n_heads: int, n_kv_heads: int, vocab: int, ffn: int, seed: int, tied: bool = False
) -> dict[str, torch.Tensor]:
    """Full (unsplit) Meta-named weights with O(1) activations: attention is far from uniform and
    norms are far from 1, so a wrong permutation / split / replica shows up in the logits."""
    g = torch.Generator().manual_seed(seed)
    hd = dim // n_heads

    def lin(out_f: int, in_f: int, gain: float = 1.0) -> torch.Tensor:
        return torch.randn(out_f, in_f, generator=g) * (gain / math.sqrt(in_f))

    def norm() -> torch.Tensor:
        return 1.0 + 0.3 * torch.randn(dim, generator=g)

    # a tied embedding is also the output head: scale it like one so logits stay O(1) (fp32 resolution)
    sd = {"tok_embeddings.weight": torch.randn(vocab, dim, generator=g) * (1 / math.sqrt(dim) if tied else 1.0)}
    for i in range(n_layers):
        p = f"layers.{i}."
        sd[p + "attention.wq.weight"] = lin(n_heads * hd, dim, 2.0)
        sd[p + "attention.wk.weight"] = lin(n_kv_heads * hd, dim, 2.0)
        sd[p + "attention.wv.weight"] = lin(n_kv_heads * hd, dim)
        sd[p + "attention.wo.weight"] = lin(dim, n_heads * hd)
        sd[p + "feed_forward.w1.weight"] = lin(ffn, dim)
        sd[p + "feed_forward.w2.weight"] = lin(dim, ffn)
        sd[p + "feed_forward.w3.weight"] = lin(ffn, dim)
        sd[p + "attention_norm.weight"] = norm()
        sd[p + "ffn_norm.weight"] = norm()
    sd["norm.weight"] = norm()
    if not tied:
        sd["output.weight"] = lin(vocab, dim)
    return sd


_COL = ("attention.wq.", "attention.wk.", "attention.wv.", "feed_forward.w1.", "feed_forward.w3.", "output.")
_ROW = ("attention.wo.", "feed_forward.w2.")


def split_model_parallel(sd: dict[str, torch.Tensor], n: int, vocab_parallel_embedding: bool) -> list[dict]:
    """What each of Meta's n model-parallel ranks saved: ColumnParallelLinear keeps a slice of the
    output rows, RowParallelLinear a slice of the input columns, ParallelEmbedding (Llama 1/2) a slice
    of the embedding dim, VocabParallelEmbedding (Llama 3) a slice of the vocab; norms are replicated."""
    shards: list[dict[str, torch.Tensor]] = [{} for _ in range(n)]
    for k, t in sd.items():
        if k == "tok_embeddings.weight":
            d = 0 if vocab_parallel_embedding else 1
        elif any(c in k for c in _COL):
            d = 0
        elif any(r in k for r in _ROW):
            d = 1
        else:
            d = None
        parts = [t] * n if d is None else list(t.chunk(n, dim=d))
        assert d is None or all(p.shape[d] * n == t.shape[d] for p in parts), k
        for s, p in zip(shards, parts):
            s[k] = p.clone()  # clone: torch.save of a view would write the whole storage
    return shards


def write_meta_dir(d: Path, params: dict, shards: list[dict], rope_freqs: torch.Tensor | None = None) -> Path:
    d.mkdir(parents=True, exist_ok=True)
    (d / "params.json").write_text(json.dumps(params))
    for i, s in enumerate(shards):
        s = dict(s)
        if rope_freqs is not None:
            s["rope.freqs"] = rope_freqs.clone()  # Llama 1 saved this buffer in every shard
        torch.save(s, d / f"consolidated.{i:02d}.pth")
    return d


def hf_oracle(sd: dict[str, torch.Tensor], config):
    """transformers' LlamaForCausalLM holding Meta weights `sd`, converted as HF's script does."""
    from transformers import LlamaForCausalLM

    dim, n_heads = config.hidden_size, config.num_attention_heads
    n_kv = config.num_key_value_heads
    hd = dim // n_heads
    hf = {
        "model.embed_tokens.weight": sd["tok_embeddings.weight"],
        "model.norm.weight": sd["norm.weight"],
        "lm_head.weight": sd.get("output.weight", sd["tok_embeddings.weight"]),
    }
    for i in range(config.num_hidden_layers):
        p, q = f"layers.{i}.", f"model.layers.{i}."
        hf[q + "self_attn.q_proj.weight"] = hf_permute(sd[p + "attention.wq.weight"], n_heads, n_heads * hd, dim)
        hf[q + "self_attn.k_proj.weight"] = hf_permute(sd[p + "attention.wk.weight"], n_kv, n_kv * hd, dim)
        hf[q + "self_attn.v_proj.weight"] = sd[p + "attention.wv.weight"]
        hf[q + "self_attn.o_proj.weight"] = sd[p + "attention.wo.weight"]
        hf[q + "mlp.gate_proj.weight"] = sd[p + "feed_forward.w1.weight"]
        hf[q + "mlp.up_proj.weight"] = sd[p + "feed_forward.w3.weight"]
        hf[q + "mlp.down_proj.weight"] = sd[p + "feed_forward.w2.weight"]
        hf[q + "input_layernorm.weight"] = sd[p + "attention_norm.weight"]
        hf[q + "post_attention_layernorm.weight"] = sd[p + "ffn_norm.weight"]
    config._attn_implementation = "eager"
    model = LlamaForCausalLM(config).float().eval()
    missing, unexpected = model.load_state_dict({k: v.float() for k, v in hf.items()}, strict=False)
    assert not unexpected and all("rotary_emb" in m for m in missing), (missing, unexpected)
    return model


@torch.no_grad()
def hf_logits(model, tokens: torch.Tensor) -> torch.Tensor:
    return model(input_ids=tokens).logits.float()


# the tiny model that adapter tests share: non-power-of-2 vocab and FFN, GQA by default
TINY = {"dim": 64, "n_layers": 2, "n_heads": 4, "vocab_size": 97, "hidden_dim": 96}


def tiny_meta_model(n_kv_heads: int = 2, seed: int = 0):
    """(Llama with random Meta weights in eval mode, those weights) for the TINY shape."""
    from model import Llama, ModelArgs

    t = TINY
    sd = random_meta_state_dict(
        t["dim"], t["n_layers"], t["n_heads"], n_kv_heads, t["vocab_size"], t["hidden_dim"], seed
    )
    with torch.device("meta"):
        model = Llama(ModelArgs(**t, n_kv_heads=n_kv_heads, max_seq_len=64))
    model.load_weights({k: v.clone() for k, v in sd.items()})
    model.setup_rope("cpu")
    return model.eval(), sd


def tiny_hf_oracle(sd: dict[str, torch.Tensor], n_kv_heads: int = 2):
    """transformers' LlamaForCausalLM holding the TINY model's weights."""
    import transformers

    t = TINY
    config = transformers.LlamaConfig(
        num_hidden_layers=t["n_layers"],
        hidden_act="silu",
        attention_bias=False,
        mlp_bias=False,
        vocab_size=t["vocab_size"],
        hidden_size=t["dim"],
        intermediate_size=t["hidden_dim"],
        num_attention_heads=t["n_heads"],
        num_key_value_heads=n_kv_heads,
        rms_norm_eps=1e-5,
        max_position_embeddings=64,
        rope_parameters={"rope_type": "default", "rope_theta": 10000.0},
        tie_word_embeddings=False,
    )
    return hf_oracle(sd, config)
