"""PARA adapter: identity at init, math vs an independent transformers implementation, training, sizes."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from model import Llama, ModelArgs
from model.peft import PARAAdapter, PARAConfig, create_adapter
from tests.helpers import TINY, hf_permute, tiny_hf_oracle, tiny_meta_model
from tests.tolerance import MODEL_PATH, ORACLE, assert_close

DIM, N_LAYERS, N_HEADS, VOCAB, FFN = (TINY[k] for k in ("dim", "n_layers", "n_heads", "vocab_size", "hidden_dim"))


def _model(n_kv_heads: int = 2, seed: int = 0) -> tuple[Llama, dict[str, torch.Tensor]]:
    return tiny_meta_model(n_kv_heads, seed)


def _randomize(adapter: PARAAdapter, seed: int = 1) -> None:
    """Vectors far from 1: up.weight ~ N(0, 0.5), up.bias ~ 1 + N(0, 0.1)."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for layer in adapter.layers:
            vg = layer["para"]
            vg.up.weight.copy_(torch.randn(vg.up.weight.shape, generator=g) * 0.5)
            vg.up.bias.copy_(1 + 0.1 * torch.randn(vg.up.bias.shape, generator=g))


def test_state_dict_names_and_identity_init():
    model, _ = _model()
    adapter = create_adapter(model, PARAConfig())
    n_out = N_HEADS * 16 + 2 * 16 + FFN  # q: H·hd, v: H_kv·hd (GQA), u: ffn
    expected = {}
    for i in range(N_LAYERS):
        expected |= {
            f"layers.{i}.para.down.weight": (12, DIM),
            f"layers.{i}.para.up.weight": (n_out, 12),
            f"layers.{i}.para.up.bias": (n_out,),
        }
    assert {k: tuple(v.shape) for k, v in adapter.state_dict().items()} == expected
    vg = adapter.layers[0]["para"]
    assert torch.equal(vg.up.weight, torch.zeros_like(vg.up.weight)) and torch.equal(vg.up.bias, torch.ones(n_out))
    assert 0.01 < vg.down.weight.std().item() < 0.03

    tokens = torch.randint(0, VOCAB, (3, 12), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        base = model(tokens)
        adapted = model(tokens, adapter=adapter, prompt_lens=torch.tensor([5, 9, 12]))
        default_lens = model(tokens, adapter=adapter)
    assert torch.equal(base, adapted) and torch.equal(base, default_lens)


def _hf_para_logits(hf, adapter: PARAAdapter, tokens: torch.Tensor, prompt_lens: torch.Tensor, n_kv: int):
    """PARA written independently on transformers' LlamaForCausalLM with hooks and plain torch math."""
    cfg = adapter.config
    act = {"gelu": lambda t: F.gelu(t), "relu": torch.relu, "silu": F.silu, "tanh": torch.tanh}[cfg.activation]
    hd = DIM // N_HEADS
    sizes = {"q": N_HEADS * hd, "v": n_kv * hd, "u": FFN}
    sizes = {t: sizes[t] for t in ("q", "v", "u") if t in cfg.adjust}
    B = tokens.shape[0]
    current: dict[str, torch.Tensor] = {}
    handles = []

    def pre_hook(i):
        def hook(module, args, kwargs):
            h = args[0] if args else kwargs["hidden_states"]  # (B, T, d): the decoder layer's input
            sd = adapter.state_dict()
            down, up, b = (sd[f"layers.{i}.para.{n}"] for n in ("down.weight", "up.weight", "up.bias"))
            pooled = h[torch.arange(B), prompt_lens - 1]  # (B, d)
            if cfg.pool_norm:  # pool / rms(pool), the model's eps
                pooled = pooled / (pooled.pow(2).mean(-1, keepdim=True) + hf.config.rms_norm_eps).sqrt()
            lvec = act(pooled @ down.T) @ up.T + b  # (B, n_out)
            parts = dict(zip(sizes, lvec.split(list(sizes.values()), dim=-1)))
            if "q" in parts:  # HF's q_proj rows are Meta's wq rows permuted to rotate-half: permute l_q alike
                parts["q"] = hf_permute(parts["q"].T, N_HEADS, N_HEADS * hd, B).T
            current.clear()
            current.update(parts)

        return hook

    def scale(name):
        def hook(module, args, out):
            return out * current[name][:, None, :] if name in current else out  # (B, 1, N)

        return hook

    for i, layer in enumerate(hf.model.layers):
        handles.append(layer.register_forward_pre_hook(pre_hook(i), with_kwargs=True))
        handles.append(layer.self_attn.q_proj.register_forward_hook(scale("q")))
        handles.append(layer.self_attn.v_proj.register_forward_hook(scale("v")))
        handles.append(layer.mlp.up_proj.register_forward_hook(scale("u")))
    try:
        with torch.no_grad():
            return hf(input_ids=tokens).logits.float()
    finally:
        for h in handles:
            h.remove()


@pytest.mark.parametrize(
    "n_kv, adjust, activation, pool_norm",
    [
        (2, ("q", "v", "u"), "gelu", True),
        (2, ("q", "v", "u"), "gelu", False),
        (4, ("q", "v", "u"), "gelu", True),
        (2, ("q",), "gelu", True),
        (2, ("v", "u"), "silu", False),
        (1, ("u", "q"), "relu", True),
    ],
    ids=["gqa-qvu", "gqa-qvu-paper", "mha-qvu", "gqa-q", "gqa-vu-silu-paper", "mqa-qu-relu"],
)
def test_para_matches_independent_transformers_implementation(n_kv, adjust, activation, pool_norm):
    model, sd = _model(n_kv)
    adapter = create_adapter(model, PARAConfig(adjust=adjust, activation=activation, pool_norm=pool_norm))
    _randomize(adapter)
    hf = tiny_hf_oracle(sd, n_kv)
    tokens = torch.randint(0, VOCAB, (3, 12), generator=torch.Generator().manual_seed(2))
    prompt_lens = torch.tensor([5, 9, 12])  # tokens after each prompt are its "response"
    with torch.no_grad():
        base = model(tokens)
        ours = model(tokens, adapter=adapter, prompt_lens=prompt_lens)
    ref = _hf_para_logits(hf, adapter, tokens, prompt_lens, n_kv)
    base_ref = _hf_para_logits(hf, create_adapter(model, PARAConfig(adjust=adjust)), tokens, prompt_lens, n_kv)
    diff = (ours - ref).abs().max().item()
    moved = (ours - base).abs().max().item()
    print(
        f"max|Δ PARA logits vs HF| = {diff:.3g}; base vs HF {(base - base_ref).abs().max().item():.3g}; "
        f"|adapted - base| max {moved:.3g}"
    )
    assert_close(ours, ref, ORACLE)
    assert moved > 1e-2  # the vectors really changed the model: the comparison is not vacuous
    # per-row pooling: row 0 only depends on its own prompt (positions < 5) through its vectors
    changed = tokens.clone()
    changed[0, 5:] = (changed[0, 5:] + 1) % VOCAB
    with torch.no_grad():
        later = model(changed, adapter=adapter, prompt_lens=prompt_lens)
    assert_close(later[0, :5], ours[0, :5], MODEL_PATH)


def test_pooling_uses_last_prompt_token():
    """Changing the token at prompt_lens - 1 changes every position's logits of that row (the vectors moved)."""
    model, _ = _model()
    adapter = create_adapter(model)
    _randomize(adapter)
    tokens = torch.randint(0, VOCAB, (1, 12), generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        a = model(tokens, adapter=adapter, prompt_lens=torch.tensor([6]))
        b = model(tokens, adapter=adapter, prompt_lens=torch.tensor([7]))
    # positions < 5 attend only to themselves and earlier: any change there comes from the vectors
    assert (a[0, :5] - b[0, :5]).abs().max() > 1e-3


def test_gradients_flow_only_into_adapter():
    model, _ = _model()
    model.requires_grad_(False)
    adapter = create_adapter(model)
    tokens = torch.randint(0, VOCAB, (2, 10), generator=torch.Generator().manual_seed(4))
    prompt_lens = torch.tensor([4, 7])

    def backward():
        adapter.zero_grad(set_to_none=True)
        logits = model(tokens, adapter=adapter, prompt_lens=prompt_lens)
        F.cross_entropy(logits[:, :-1].reshape(-1, VOCAB), tokens[:, 1:].reshape(-1)).backward()

    # exact identity init (W_up = 0): grad W_up = Σ_rows outer(∂L/∂l, act(pool · W_downᵀ)) ≠ 0 and
    # grad b = Σ_rows ∂L/∂l ≠ 0, but grad W_down = (W_upᵀ ∂L/∂l ⊙ act') ⊗ pool = 0 since W_up = 0
    backward()
    assert all(p.grad is None for p in model.parameters())
    for i, layer in enumerate(adapter.layers):
        vg = layer["para"]
        assert vg.up.weight.grad.abs().max() > 0, i
        assert vg.up.bias.grad.abs().max() > 0, i
        assert torch.equal(vg.down.weight.grad, torch.zeros_like(vg.down.weight)), i

    _randomize(adapter)  # W_up ≠ 0: now every layer's W_down learns too
    backward()
    assert all(p.grad is None for p in model.parameters())
    for i, layer in enumerate(adapter.layers):
        assert layer["para"].down.weight.grad.abs().max() > 0, i
    assert len(adapter.trainable_parameters()) == 3 * N_LAYERS


def test_num_trainable_closed_form():
    r = 12
    with torch.device("meta"):
        llama2 = Llama(ModelArgs(dim=4096, n_layers=32, n_heads=32, vocab_size=32000))
        smol = Llama(
            ModelArgs(
                dim=576, n_layers=30, n_heads=9, n_kv_heads=3, hidden_dim=1536, vocab_size=49152, tie_embeddings=True
            )
        )
    a = create_adapter(llama2, PARAConfig())
    # per layer: W_down d·r + W_up r·(q + v + u) + b (q + v + u); 7B: q = v = 4096, u = 11008
    assert a.num_trainable() == 32 * (4096 * 12 + 12 * (4096 + 4096 + 11008) + (4096 + 4096 + 11008)) == 9_560_064
    # SmolLM2-135M: hd = 64, q = 9·64 = 576, v = 3·64 = 192 (GQA), u = 1536 → 2304
    s = create_adapter(smol, PARAConfig(r=r))
    assert s.num_trainable() == 30 * (576 * 12 + 12 * (576 + 192 + 1536) + (576 + 192 + 1536)) == 1_105_920
    q_only = create_adapter(smol, PARAConfig(adjust=("q",)))
    assert q_only.num_trainable() == 30 * (576 * 12 + 12 * 576 + 576)
    assert a.layers[0]["para"].down.weight.device.type == "meta"


def test_bad_inputs_raise_one_line_errors():
    model, _ = _model()
    adapter = create_adapter(model)
    tokens = torch.zeros(2, 8, dtype=torch.long)
    bad_lens = [
        torch.tensor([0, 3]),
        torch.tensor([3, 9]),
        torch.tensor([3]),
        torch.tensor([[3, 4]]),
        torch.tensor([3.0, 4.0]),
        [3, 4],
    ]
    for lens in bad_lens:
        with pytest.raises(ValueError, match="prompt_lens") as e:
            model(tokens, adapter=adapter, prompt_lens=lens)
        assert "\n" not in str(e.value)
    for kw, field in [
        ({"activation": "swish"}, "activation"),
        ({"adjust": ("q", "k")}, "adjust"),
        ({"adjust": ()}, "adjust"),
        ({"adjust": "qv"}, "adjust"),
        ({"r": 0}, "r="),
    ]:
        with pytest.raises(ValueError, match=field) as e:
            PARAConfig(**kw)
        assert "\n" not in str(e.value)
    other, _ = _model(n_kv_heads=4)
    with pytest.raises(ValueError, match="adapter"):
        model(tokens, adapter=create_adapter(other))
