"""The tolerance policy itself: the error measure, and one negative control per kind.

A negative control makes the smallest mistake that matters for its kind and shows that `assert_close` at
that kind's bound fails on it, while the correct computation passes. A bound loose enough to hide one of
these mistakes is a bound that hides a bug.
"""

from __future__ import annotations

import os
import sys
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from kernels import reference as ref
from model.peft import IA3Config, PARAConfig, create_adapter
from tests import tolerance
from tests.helpers import hf_logits, random_meta_state_dict, tiny_hf_oracle, tiny_meta_model
from tests.tolerance import KINDS, LOW, MODEL_PATH, ORACLE, ORACLE_DEEP, PATH, assert_close, assert_far, error

ROOT = Path(__file__).resolve().parents[1]


def gen(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


# ---------------------------------------------------------------- the measure


def test_error_is_relative_to_the_references_magnitude():
    want = torch.tensor([100.0, -200.0, 0.0])
    assert error(want + torch.tensor([0.0, 0.0, 2.0]), want) == pytest.approx(0.01)  # 2 / 200, not 2 / 0
    assert error(want, want) == 0.0
    assert error(torch.tensor([1.0, float("nan")]), torch.tensor([1.0, 2.0])) == float("inf")
    assert error(torch.tensor([float("inf")]), torch.tensor([float("inf")])) == 0.0  # both non-finite alike
    assert error(torch.tensor([1e-8]), torch.zeros(1)) == pytest.approx(1e-8)  # an all-zero reference: absolute
    with pytest.raises(AssertionError, match="shape"):
        assert_close(torch.zeros(2), torch.zeros(3), PATH)


def test_every_bound_is_a_stated_margin_over_a_measured_spread():
    for kind in KINDS:
        assert kind.measured > 0 and kind.margin >= 2, kind
        assert kind.bound == kind.measured * kind.margin
    # the 16-bit kinds sit above their dtype's rounding, the fp32 ones far below 16-bit rounding
    for dtype, kind in LOW.items():
        assert kind.measured >= torch.finfo(dtype).eps / 2, kind
    assert max(k.bound for k in KINDS if k not in LOW.values()) < torch.finfo(torch.float16).eps


def test_no_test_sets_its_own_tolerance():
    """Every array comparison goes through tests/tolerance.py: no rtol= / atol= literals in test files."""
    offenders = []
    for path in sorted((ROOT / "tests").glob("*.py")):
        if path.name in ("tolerance.py", "test_tolerance.py"):
            continue
        for n, line in enumerate(path.read_text().splitlines(), 1):
            if ("rtol=" in line or "atol=" in line) and "tolerance" not in line:
                offenders.append(f"{path.name}:{n}: {line.strip()}")
    assert not offenders, "\n".join(offenders)


# ---------------------------------------------------------------- PATH


def test_path_control_one_channel_off_by_1e3():
    """Two GEMM paths agree within PATH; one output channel of the weight off by 1e-3 relative does not."""
    g = gen(0)
    x, w = torch.randn(5, 576, generator=g), torch.randn(192, 576, generator=g) / 24
    want = F.linear(x, w)
    assert_close(torch.cat([F.linear(r[None], w) for r in x]), want, PATH)  # per-row GEMVs
    bad = w.clone()
    bad[int(want.abs().amax(0).argmax())] *= 1 + 1e-3
    assert_far(F.linear(x, bad), want, PATH)


def test_path_control_scale_of_the_wrong_sequence():
    """A scale epilogue that reads the neighbouring sequence's scale row for one row."""
    g = gen(1)
    x, w = torch.randn(6, 100, generator=g), torch.randn(37, 100, generator=g) / 10
    scale = 1 + 0.01 * torch.randn(3, 37, generator=g)  # nearly-identity adapters: a hard case
    r2s = torch.tensor([0, 0, 1, 1, 2, 2])
    wrong = r2s.clone()
    wrong[3] = 2
    assert_far(ref.linear_scale(x, w, scale, wrong), ref.linear_scale(x, w, scale, r2s), PATH)


# ---------------------------------------------------------------- MODEL_PATH


def _nearly_identity(model, config, spread: float):
    torch.manual_seed(3)
    adapter = create_adapter(model, config)
    with torch.no_grad():
        for name, p in adapter.named_parameters():
            if name.endswith("up.weight") or config.__class__ is IA3Config:
                p.add_(spread * torch.randn_like(p))
    return adapter.eval()


def _misapplied(adapter, fix):
    """The adapter with its scale vectors passed through `fix` (the mistake) before the model uses them."""
    scales = adapter.scales
    adapter.scales = lambda i, pooled: fix(scales(i, pooled))
    return adapter


@torch.no_grad()
def test_model_path_control_para_scale_on_the_wrong_head():
    model, _ = tiny_meta_model()
    tokens = torch.randint(0, 97, (2, 11), generator=gen(2))
    lens = torch.tensor([6, 11])
    para = _nearly_identity(model, PARAConfig(), spread=0.05)
    want = model(tokens, adapter=para, prompt_lens=lens)
    assert_close(
        torch.cat([model(t[None], adapter=para, prompt_lens=n[None]) for t, n in zip(tokens, lens)]), want, MODEL_PATH
    )
    hd = model.args.dim // model.args.n_heads
    _misapplied(para, lambda s: {**s, "q": s["q"].roll(hd, -1)})
    assert_far(model(tokens, adapter=para, prompt_lens=lens), want, MODEL_PATH)


@torch.no_grad()
def test_model_path_control_k_scaled_where_v_should_be():
    model, _ = tiny_meta_model()
    tokens = torch.randint(0, 97, (2, 11), generator=gen(4))
    ia3 = _nearly_identity(model, IA3Config(target_modules=("v_proj",), feedforward_modules=()), spread=0.05)
    want = model(tokens, adapter=ia3)
    _misapplied(ia3, lambda s: {"k": s["v"]})
    assert_far(model(tokens, adapter=ia3), want, MODEL_PATH)


# ---------------------------------------------------------------- ORACLE / ORACLE_DEEP


def _perturbed(module: torch.nn.Module, name: str, rel: float):
    p = dict(module.named_parameters())[name]
    with torch.no_grad():
        p.mul_(1 + rel)
    return p


@torch.no_grad()
def test_oracle_control_one_weight_tensor_off_by_1e3():
    model, sd = tiny_meta_model()
    oracle = tiny_hf_oracle(sd)
    tokens = torch.randint(0, 97, (2, 9), generator=gen(5))
    assert_close(model(tokens), hf_logits(oracle, tokens), ORACLE)
    _perturbed(oracle, "model.layers.1.self_attn.v_proj.weight", 1e-3)
    assert_far(model(tokens), hf_logits(oracle, tokens), ORACLE)


@torch.no_grad()
def test_oracle_deep_control_one_weight_tensor_off_by_1e3(smollm2, hf_smollm2):
    """SmolLM2 against transformers; one mid-depth V projection off by 1e-3 relative (restored after)."""
    hf, tok = hf_smollm2
    ids = torch.tensor([tok.encode("The quick brown fox jumps over the lazy dog", add_special_tokens=False)])
    ours = smollm2(ids)
    assert_close(ours, hf(ids).logits.float(), ORACLE_DEEP)
    p = _perturbed(hf, "model.layers.15.self_attn.v_proj.weight", 0.0)
    saved = p.detach().clone()
    try:
        _perturbed(hf, "model.layers.15.self_attn.v_proj.weight", 1e-3)
        assert_far(ours, hf(ids).logits.float(), ORACLE_DEEP)
    finally:
        p.data.copy_(saved)


# ---------------------------------------------------------------- KERNEL / LOW (Triton's interpreter)


def test_kernel_controls_under_the_interpreter():
    """Run in a subprocess: the interpreter must be chosen before triton is first imported."""
    import subprocess

    env = {**os.environ, "TRITON_INTERPRET": "1", "CUDA_VISIBLE_DEVICES": ""}
    res = subprocess.run(
        [sys.executable, "-m", "tests.test_tolerance"], cwd=ROOT, env=env, capture_output=True, text=True, timeout=600
    )
    assert res.returncode == 0, res.stdout[-4000:] + res.stderr[-4000:]
    assert res.stdout.count("caught") == 4, res.stdout


def _kernel_controls() -> None:
    from kernels.linear_scale import fused_linear_scale

    g = gen(6)
    x, w = torch.randn(17, 200, generator=g), torch.randn(64, 200, generator=g) / 14
    r2s = torch.repeat_interleave(torch.arange(3), torch.tensor([5, 1, 11]))
    scale = 1 + 0.01 * torch.randn(3, 64, generator=g)
    want = ref.linear_scale(x, w, scale, r2s)
    assert_close(fused_linear_scale(x, w, scale, r2s), want, tolerance.KERNEL)
    wrong = r2s.clone()
    wrong[5] = 0  # the one-row sequence reads sequence 0's scale
    assert_far(fused_linear_scale(x, w, scale, wrong), want, tolerance.KERNEL)
    print("caught: kernel, scale of the wrong sequence")
    bad = w.clone()
    bad[int(want.abs().amax(0).argmax())] *= 1 + 1e-3
    assert_far(fused_linear_scale(x, bad, scale, r2s), want, tolerance.KERNEL)
    print("caught: kernel, one channel off by 1e-3")
    # 16-bit: a 1 +- 5% scale applied to the neighbouring channel (fp16 in the kernel, bf16 in torch's CPU ops)
    scale = 1 + 0.05 * torch.randn(3, 64, generator=g)
    for dtype in (torch.float16, torch.bfloat16):
        xd, wd, sd = x.to(dtype), w.to(dtype), scale.to(dtype)
        want = ref.linear_scale(xd.float(), wd.float(), sd.float(), r2s).to(dtype).float()
        run = fused_linear_scale if dtype == torch.float16 else ref.linear_scale
        assert_close(run(xd, wd, sd, r2s).float(), want, LOW[dtype])
        assert_far(run(xd, wd, sd.roll(1, -1), r2s).float(), want, LOW[dtype])
        print(f"caught: {dtype}, scale on the neighbouring channel")


if __name__ == "__main__":
    _kernel_controls()


def test_random_meta_weights_are_not_degenerate():
    """The controls above rely on tiny models whose logits move with their weights (not saturated)."""
    sd = random_meta_state_dict(64, 2, 4, 2, 97, 96, seed=0)
    assert all(torch.isfinite(t).all() for t in sd.values())
