"""(IA)³ and LoRA against peft 0.21 on transformers, adapter files both ways, and bad adapter files."""

from __future__ import annotations

import json
import os
import warnings

import peft
import pytest
import torch
import torch.nn.functional as F

from model import Llama, ModelArgs
from model.peft import (
    AdapterError,
    IA3Config,
    LoRAConfig,
    PARAConfig,
    create_adapter,
)
from tests.helpers import TINY, tiny_hf_oracle, tiny_meta_model
from tests.tolerance import ORACLE, assert_close
from weights.adapters import load_adapter, save_adapter

VOCAB = TINY["vocab_size"]
LORA_ALL = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


def _tokens(seed: int = 0) -> torch.Tensor:
    return torch.randint(0, VOCAB, (3, 11), generator=torch.Generator().manual_seed(seed))


def _randomize_(module: torch.nn.Module, seed: int) -> None:
    """Adapter weights far from init: LoRA B ≠ 0, (IA)³ vectors ≠ 1."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in module.named_parameters():
            if "lora_" in name or "ia3_l" in name or name.startswith("layers."):
                base = 1.0 if ("ia3" in name or not any(s in name for s in ("lora_A", "lora_B"))) else 0.0
                p.copy_(base + 0.3 * torch.randn(p.shape, generator=g))


def _peft_config(method: str, targets, **kw):
    if method == "lora":
        return peft.LoraConfig(target_modules=targets, **kw)
    ff = [m for m in targets if m == "down_proj"]
    return peft.IA3Config(target_modules=targets, feedforward_modules=ff)


def _ours_config(method: str, targets, **kw):
    if method == "lora":
        return LoRAConfig(target_modules=tuple(targets), **kw)
    return IA3Config(target_modules=tuple(targets), feedforward_modules=tuple(m for m in targets if m == "down_proj"))


CASES = [
    ("lora", 2, ["q_proj", "v_proj"], {"r": 4, "lora_alpha": 8}),
    ("lora", 4, LORA_ALL, {"r": 3, "lora_alpha": 5, "use_rslora": True}),
    ("lora", 1, ["k_proj", "up_proj"], {"r": 2, "lora_alpha": 2}),
    ("ia3", 2, ["k_proj", "v_proj", "down_proj"], {}),
    ("ia3", 4, ["q_proj", "up_proj", "down_proj"], {}),
]
IDS = ["lora-qv-gqa", "lora-all-rslora-mha", "lora-k-up-mqa", "ia3-default-gqa", "ia3-q-up-down-mha"]


@pytest.mark.parametrize("method, n_kv, targets, kw", CASES, ids=IDS)
def test_peft_file_loads_into_parallama_with_equal_logits(tmp_path, method, n_kv, targets, kw):
    model, sd = tiny_meta_model(n_kv)
    pm = peft.get_peft_model(tiny_hf_oracle(sd, n_kv), _peft_config(method, targets, **kw))
    _randomize_(pm, seed=1)
    pm.eval()
    pm.save_pretrained(tmp_path)
    tokens = _tokens()
    with torch.no_grad():
        ref = pm(input_ids=tokens).logits.float()
        base = model(tokens)
        adapter = load_adapter(tmp_path, model)
        ours = model(tokens, adapter=adapter)
    diff, moved = (ours - ref).abs().max().item(), (ours - base).abs().max().item()
    print(
        f"{method} {targets}: max|Δ logits vs peft| = {diff:.3g} (max |logit| {ref.abs().max():.3g}), "
        f"|adapted - base| = {moved:.3g}"
    )
    assert_close(ours, ref, ORACLE)
    assert moved > 1e-2


@pytest.mark.parametrize("method, n_kv, targets, kw", CASES, ids=IDS)
def test_parallama_file_loads_into_peft_with_equal_logits(tmp_path, method, n_kv, targets, kw):
    model, sd = tiny_meta_model(n_kv)
    adapter = create_adapter(model, _ours_config(method, targets, **kw))
    _randomize_(adapter, seed=2)
    save_adapter(adapter, tmp_path / "a")
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        pm = peft.PeftModel.from_pretrained(tiny_hf_oracle(sd, n_kv), tmp_path / "a").eval()
    assert not [w for w in caught if "Unexpected keyword" in str(w.message)]  # a clean peft config
    tokens = _tokens(1)
    with torch.no_grad():
        ref = pm(input_ids=tokens).logits.float()
        ours = model(tokens, adapter=adapter.eval())
        again = model(tokens, adapter=load_adapter(tmp_path / "a", model))
    assert_close(ours, ref, ORACLE)
    assert torch.equal(ours, again)  # our own round trip is exact
    assert (ours - model(tokens)).abs().max().item() > 1e-2


def test_fresh_adapters_are_the_identity_and_param_counts():
    model, _ = tiny_meta_model()
    tokens = _tokens()
    with torch.no_grad():
        base = model(tokens)
        for cfg in (LoRAConfig(), LoRAConfig(target_modules=tuple(LORA_ALL)), IA3Config(), PARAConfig()):
            assert torch.equal(model(tokens, adapter=create_adapter(model, cfg)), base), cfg
    with torch.device("meta"):
        llama2 = Llama(ModelArgs(dim=4096, n_layers=32, n_heads=32, vocab_size=32000))
        smol = Llama(
            ModelArgs(
                dim=576, n_layers=30, n_heads=9, n_kv_heads=3, hidden_dim=1536, vocab_size=49152, tie_embeddings=True
            )
        )
    # LoRA r on q, v: r·(d + q) + r·(d + v) per layer; (IA)³: k + v + ffn per layer
    assert create_adapter(llama2, LoRAConfig(r=8)).num_trainable() == 32 * 8 * (4096 * 2 + 4096 * 2) == 4_194_304
    assert create_adapter(smol, LoRAConfig(r=8)).num_trainable() == 30 * 8 * (576 + 576 + 576 + 192) == 460_800
    assert create_adapter(llama2, IA3Config()).num_trainable() == 32 * (4096 + 4096 + 11008) == 614_400
    assert create_adapter(smol, IA3Config()).num_trainable() == 30 * (192 + 192 + 1536) == 57_600


def test_training_grads_only_in_adapter_and_lora_dropout():
    model, _ = tiny_meta_model()
    tokens = _tokens()
    for cfg in (LoRAConfig(lora_dropout=0.5), IA3Config()):
        adapter = create_adapter(model, cfg)
        _randomize_(adapter, 3)
        adapter.train()
        logits = model(tokens, adapter=adapter)
        F.cross_entropy(logits[:, :-1].reshape(-1, VOCAB), tokens[:, 1:].reshape(-1)).backward()
        assert all(p.grad is None and not p.requires_grad for p in model.parameters())
        assert all(p.grad is not None and p.grad.abs().max() > 0 for p in adapter.trainable_parameters())
    # dropout is live in train mode only (on the LoRA input, as peft)
    with torch.no_grad():
        a, b = model(tokens, adapter=adapter.train()), model(tokens, adapter=adapter.train())
        lora = create_adapter(model, LoRAConfig(lora_dropout=0.5))
        _randomize_(lora, 3)
        t1, t2 = model(tokens, adapter=lora.train()), model(tokens, adapter=lora.train())
        e1, e2 = model(tokens, adapter=lora.eval()), model(tokens, adapter=lora.eval())
    assert torch.equal(a, b)  # (IA)³ has no dropout
    assert not torch.equal(t1, t2) and torch.equal(e1, e2)


def test_save_is_atomic_and_overwrites(tmp_path):
    model, _ = tiny_meta_model()
    first = create_adapter(model, PARAConfig(r=4))
    _randomize_(first, 4)
    target = save_adapter(first, tmp_path / "x")
    second = create_adapter(model, PARAConfig(r=4))
    save_adapter(second, target)  # overwrite in place: the new pair replaces the old
    assert sorted(os.listdir(tmp_path)) == ["x"]  # no temp dirs left behind
    assert sorted(os.listdir(target)) == ["adapter_config.json", "adapter_model.safetensors"]
    loaded = load_adapter(target, model)
    assert all(torch.equal(a, b) for a, b in zip(loaded.state_dict().values(), second.state_dict().values()))
    cfg = json.loads((target / "adapter_config.json").read_text())
    assert cfg["method"] == "para" and cfg["r"] == 4 and cfg["base_model"]["n_layers"] == TINY["n_layers"]
    assert len(cfg["base_model"]["weights_sha256"]) == 16


def test_save_swaps_the_directory_whole_and_never_takes_other_files(tmp_path, monkeypatch):
    from weights import io

    model, _ = tiny_meta_model()
    old, new = create_adapter(model, PARAConfig(r=4)), create_adapter(model, PARAConfig(r=4))
    _randomize_(old, 5)
    target = save_adapter(old, tmp_path / "x")
    # a crash between the swap's two renames leaves only `.x.old`: loading `x` finds the previous pair whole
    real_replace = os.replace
    calls = []

    def crash_on_second(src, dst):
        calls.append(dst)
        if len(calls) == 2:
            raise OSError("power cut")
        real_replace(src, dst)

    monkeypatch.setattr(io.os, "replace", crash_on_second)
    with pytest.raises(OSError, match="power cut"):
        save_adapter(new, target)
    monkeypatch.undo()
    assert not target.exists() and (tmp_path / ".x.old").is_dir()
    loaded = load_adapter(target, model)
    assert all(torch.equal(a, b) for a, b in zip(loaded.state_dict().values(), old.state_dict().values()))
    save_adapter(new, target)  # the next save completes, and only then drops the leftover
    assert sorted(os.listdir(tmp_path)) == ["x"]
    # a directory with other files in it is refused, and the files stay
    (tmp_path / "run").mkdir()
    (tmp_path / "run" / "notes.txt").write_text("mine")
    with pytest.raises(AdapterError, match="holds other files .*notes.txt"):
        save_adapter(new, tmp_path / "run")
    assert (tmp_path / "run" / "notes.txt").read_text() == "mine"


def test_fingerprint_survives_dtype_but_not_other_weights(tmp_path):
    model, _ = tiny_meta_model()
    save_adapter(create_adapter(model, IA3Config()), tmp_path / "a")
    bf16 = tiny_meta_model()[0].to(torch.bfloat16)
    assert load_adapter(tmp_path / "a", bf16).layers[0]["k_proj"].dtype == torch.bfloat16
    other, _ = tiny_meta_model(seed=5)  # same shape, other weights
    with pytest.raises(AdapterError, match="other weights.*check_base=False") as e:
        load_adapter(tmp_path / "a", other)
    assert "\n" not in str(e.value)
    load_adapter(tmp_path / "a", other, check_base=False)
    wider, _ = tiny_meta_model(n_kv_heads=4)
    with pytest.raises(AdapterError, match="another base model.*n_kv_heads 2 vs 4"):
        load_adapter(tmp_path / "a", wider)


def _corrupt(path, how):
    if how == "truncate":
        data = path.read_bytes()
        path.write_bytes(data[: len(data) // 2])
    else:
        path.write_bytes(b"\x00" * 64)


@pytest.mark.parametrize(
    "edit, match",
    [
        (lambda d: _corrupt(d / "adapter_model.safetensors", "truncate"), "adapter_model.safetensors: cannot read"),
        (lambda d: _corrupt(d / "adapter_model.safetensors", "zeros"), "adapter_model.safetensors: cannot read"),
        (lambda d: (d / "adapter_model.safetensors").unlink(), "adapter_model.safetensors: not found"),
        (lambda d: (d / "adapter_config.json").write_text("{nope"), "adapter_config.json: not valid JSON"),
        (lambda d: (d / "adapter_config.json").unlink(), "adapter_config.json: not found"),
        (lambda d: _edit_config(d, peft_type="VERA"), "unknown adapter method 'VERA'"),
        (lambda d: _edit_config(d, use_dora=True), "not supported: use_dora"),
        (lambda d: _edit_config(d, r=5), "lora_A.weight has shape \\(4, 64\\), this model needs \\(5, 64\\)"),
        (lambda d: _edit_config(d, target_modules=["q_proj", "v_proj", "o_proj"]), "o_proj.lora_A.weight is missing"),
        (lambda d: _edit_config(d, target_modules=["q_proj"]), "unexpected tensor .*v_proj"),
        (lambda d: _edit_config(d, target_modules=["lm_head"]), "'lm_head' not supported"),
        (lambda d: _edit_config(d, r=None), "r=None must be a positive int"),
    ],
    ids=[
        "truncated",
        "garbage",
        "no-weights",
        "bad-json",
        "no-config",
        "unknown-method",
        "dora",
        "wrong-r",
        "missing-tensor",
        "unexpected-tensor",
        "bad-target",
        "bad-r",
    ],
)
def test_bad_adapter_files_give_one_line_errors(tmp_path, edit, match):
    model, _ = tiny_meta_model()
    d = save_adapter(create_adapter(model, LoRAConfig(r=4)), tmp_path / "lora")
    edit(d)
    with pytest.raises(AdapterError, match=match) as e:
        load_adapter(d, model)
    assert "\n" not in str(e.value)


def _edit_config(d, **changes):
    cfg = json.loads((d / "adapter_config.json").read_text())
    cfg.update(changes)
    (d / "adapter_config.json").write_text(json.dumps(cfg))


def test_bad_configs_and_objects():
    model, _ = tiny_meta_model()
    for make, match in [
        (lambda: LoRAConfig(r=0), "r=0"),
        (lambda: LoRAConfig(lora_dropout=1.0), "lora_dropout"),
        (lambda: LoRAConfig(target_modules=("wq",)), "'wq' not supported"),
        (lambda: IA3Config(target_modules=("k_proj", "down_proj"), feedforward_modules=()), "down_proj"),
        (lambda: IA3Config(target_modules=("o_proj",)), "'o_proj' not supported"),
        (lambda: create_adapter(model, {"r": 8}), "PARAConfig, IA3Config or LoRAConfig"),
        (lambda: model(_tokens(), adapter=object()), "model.peft adapter"),
        (lambda: load_adapter("/nonexistent/adapter", model), "not an adapter directory"),
    ]:
        with pytest.raises(ValueError, match=match) as e:
            make()
        assert "\n" not in str(e.value)
