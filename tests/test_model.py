"""ModelArgs and the reference ops against known figures and independent formulations."""

from __future__ import annotations

import math

import pytest
import torch

from kernels import reference as ops
from model import Llama, ModelArgs
from tests.tolerance import MODEL_PATH, PATH, assert_close


@pytest.mark.parametrize(
    "kw, ffn",
    [
        (dict(dim=4096, multiple_of=256), 11008),  # LLaMA-2 7B
        (dict(dim=5120, multiple_of=256), 13824),  # LLaMA-2 13B
        (dict(dim=8192, n_heads=64, multiple_of=4096, ffn_dim_multiplier=1.3), 28672),  # LLaMA-2 70B
        (dict(dim=4096, multiple_of=1024, ffn_dim_multiplier=1.3), 14336),  # Llama 3 8B
        (dict(dim=2048, multiple_of=256, ffn_dim_multiplier=1.5), 8192),  # Llama 3.2 1B
    ],
)
def test_ffn_dim_matches_meta_models(kw, ffn):
    assert ModelArgs(**kw).ffn_dim == ffn


def test_param_count_llama2_7b():
    # the published figure for LLaMA-2 7B
    assert ModelArgs(dim=4096, n_layers=32, n_heads=32, vocab_size=32000).num_params() == 6_738_415_616


def test_model_args_validation():
    with pytest.raises(ValueError, match="n_kv_heads"):
        ModelArgs(dim=64, n_heads=4, n_kv_heads=3)
    with pytest.raises(ValueError, match="unknown field"):
        ModelArgs.from_dict({"dim": 64, "bogus": 1})


def _meta_apply_scaling(freqs, scale_factor, low=1.0, high=4.0, old_len=8192):
    """Meta's llama-models apply_scaling, element by element as they wrote it."""
    out = []
    for freq in freqs.tolist():
        wavelen = 2 * math.pi / freq
        if wavelen < old_len / high:
            out.append(freq)
        elif wavelen > old_len / low:
            out.append(freq / scale_factor)
        else:
            smooth = (old_len / wavelen - low) / (high - low)
            out.append((1 - smooth) * freq / scale_factor + smooth * freq)
    return torch.tensor(out)


@pytest.mark.parametrize("factor", [8.0, 32.0])
def test_llama3_rope_scaling_matches_meta(factor):
    base = ops.rope_frequencies(128, 500000.0)
    ours = ops.rope_frequencies(128, 500000.0, scaled=True, scale_factor=factor)
    ref = _meta_apply_scaling(base, factor)
    assert_close(ours, ref, PATH)
    assert (ours != base).sum() > 10 and (ours == base).sum() > 10  # all three regimes present


def test_rope_matches_meta_complex_form():
    torch.manual_seed(0)
    B, T, H, hd = 2, 7, 3, 16
    x = torch.randn(B, T, H, hd)
    inv = ops.rope_frequencies(hd, 10000.0)
    table = ops.rope_table(inv, 32)
    # Meta: freqs_cis = polar(1, outer(t, freqs)); x as complex pairs times freqs_cis
    freqs_cis = torch.polar(torch.ones(32, hd // 2), torch.outer(torch.arange(32).float(), inv))
    xc = torch.view_as_complex(x.reshape(B, T, H, hd // 2, 2))
    ref = torch.view_as_real(xc * freqs_cis[:T].view(1, T, 1, hd // 2)).flatten(3)
    assert_close(ops.rope(x, table[:T]), ref, PATH)


def test_rms_norm_hand_computed():
    x = torch.tensor([[3.0, 4.0]])
    w = torch.tensor([1.0, 2.0])
    # mean(x²) = 12.5 → x / sqrt(12.5 + eps)
    expect = torch.tensor([[3.0, 8.0]]) / math.sqrt(12.5 + 1e-6)
    assert_close(ops.rms_norm(x, w, 1e-6), expect, PATH)


@pytest.mark.parametrize("h, h_kv", [(4, 4), (6, 2), (8, 1)])
def test_attention_gqa_matches_explicit_softmax(h, h_kv):
    torch.manual_seed(1)
    B, T, hd = 2, 9, 8
    q, k, v = torch.randn(B, T, h, hd), torch.randn(B, T, h_kv, hd), torch.randn(B, T, h_kv, hd)
    kr, vr = k.repeat_interleave(h // h_kv, dim=2), v.repeat_interleave(h // h_kv, dim=2)
    scores = torch.einsum("bthd,bshd->bhts", q, kr) / math.sqrt(hd)
    scores = scores.masked_fill(torch.triu(torch.ones(T, T, dtype=torch.bool), 1), float("-inf"))
    ref = torch.einsum("bhts,bshd->bthd", scores.softmax(-1), vr)
    assert_close(ops.attention(q, k, v), ref, PATH)


def _tiny(seed=0, **kw):
    torch.manual_seed(seed)
    args = ModelArgs(
        **{"dim": 64, "n_layers": 2, "n_heads": 4, "n_kv_heads": 2, "vocab_size": 97, "max_seq_len": 64, **kw}
    )
    model = Llama(args).eval()
    with torch.no_grad():  # N(0, 1) embeddings would saturate a 2-layer toy; keep activations tame
        model.tok_embeddings.weight.normal_(0, 0.1)
    return model


def test_forward_causal_and_batch_independent():
    model = _tiny()
    tokens = torch.randint(0, 97, (3, 12))
    with torch.no_grad():
        full = model(tokens)
        alone = model(tokens[1:2])
        changed = tokens.clone()
        changed[:, 8:] = (changed[:, 8:] + 1) % 97
        later = model(changed)
    assert full.dtype == torch.float32 and full.shape == (3, 12, 97)
    assert_close(full[1:2], alone, MODEL_PATH)
    assert_close(full[:, :8], later[:, :8], MODEL_PATH)
    assert not torch.allclose(full[:, 8:], later[:, 8:])


def test_tied_embeddings_share_storage():
    model = _tiny(tie_embeddings=True)
    assert model.output.weight is model.tok_embeddings.weight
    sd = {k: v.clone() for k, v in model.state_dict().items() if k != "output.weight"}
    with torch.device("meta"):
        fresh = Llama(model.args)
    fresh.load_weights(sd)
    fresh.setup_rope("cpu")
    assert fresh.output.weight is fresh.tok_embeddings.weight
    tokens = torch.randint(0, 97, (1, 10))
    assert torch.equal(fresh.eval()(tokens), model(tokens))  # the same weights, the same path


def test_forward_rejects_bad_tokens():
    model = _tiny()
    with pytest.raises(ValueError, match="max_seq_len"):
        model(torch.zeros(1, 65, dtype=torch.long))
    with pytest.raises(ValueError, match=r"\(B, T\)"):
        model(torch.zeros(5, dtype=torch.long))
