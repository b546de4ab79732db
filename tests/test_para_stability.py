"""PARA trains stably at the top of the learning-rate range (issue 18): the pool normalisation, the paper's form
behind `pool_norm=False`, the flag through files and the engine, and the per-method default learning rates.

The tiny model is pretrained here (all weights, PRETRAIN_STEPS AdamW steps on "copy: a b c =" -> "a b c"), so
that, like SmolLM2, it is confident and a bad adapter step costs loss; PARA then learns "reverse: ..." from
64 examples. Its residual stream is then scaled by RESIDUAL_SCALE: the embedding, every `wo` and every `w2`
times S. Every RMSNorm removes the scale again, so the model computes the same function (up to norm_eps) while
each layer's input, what PARA pools, has the RMS of SmolLM2's last layer (28.5 at layer 29, against 0.12 at
layer 0: bench/results/lr_sweep_cpu/para_norms.json). That raw scale is what makes the paper's form unstable.

Bounds follow tests/tolerance.py's policy: a stated margin over the largest value measured.
`python -m tests.test_para_stability [SEEDS]` re-measures best/step-0 dev loss over SEEDS training seeds for
both forms at LR_TOP and prints the numbers quoted at LEARNS_MEASURED.
"""

from __future__ import annotations

import copy
import json
import random
import statistics
import sys
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from model import Llama  # noqa: E402
from model.peft import PARAConfig, create_adapter  # noqa: E402
from tests.helpers import WORDS, random_meta_state_dict, train_sentencepiece, write_meta_dir  # noqa: E402
from tests.tolerance import MODEL_PATH, assert_close, assert_far  # noqa: E402
from train.config import DEFAULT_LR, FinetuneConfig, TrainError, optimizer_groups  # noqa: E402
from train.data import IGNORE, collate, load_dataset  # noqa: E402
from train.finetune import finetune  # noqa: E402
from train.finetune_args import build_parser  # noqa: E402

RESIDUAL_SCALE = 28.0  # SmolLM2's pooled-input RMS at its last layer
PRETRAIN_STEPS = 800
LR_TOP = 1e-2  # the top of the swept range, where LoRA and normalised PARA are both stable on SmolLM2
STEPS = 30
# best dev loss / step-0 dev loss after STEPS steps at LR_TOP, seeds 0-9 (2026-12-02, the 2-core CPU, 1 thread):
#   pool_norm (the default): max 0.684, median 0.660, min 0.617 (spread max/median 1.04);
#   paper form: 5 of 10 diverged (ratio 1.0: no step beat step 0), the others 0.770-0.908 (median 0.954).
# On the 2-core Intel Xeon CPU (2026-12-03; other BLAS kernels, so another pretrained model):
#   pool_norm: max 0.744, median 0.681, min 0.607; paper form: 2 of 10 diverged, the others 0.822-0.935.
LEARNS_MEASURED = 0.684  # the pool_norm form's largest ratio
MARGIN = 1.1  # 2.5x the seed spread above; every paper-form seed measured on both CPUs stays above the bound
LEARNS_BOUND = LEARNS_MEASURED * MARGIN  # 0.752: the pool_norm form must get at least this far down


def rows(n: int, seed: int, task: str) -> list[dict]:
    """ "copy: a b c =" -> "a b c" or "reverse: a b c =" -> "c b a"."""
    rng, out = random.Random(seed), []
    for _ in range(n):
        ws = [rng.choice(WORDS[:40]) for _ in range(3)]
        out.append({"prompt": f"{task}: {' '.join(ws)} =", "response": " ".join(ws if task == "copy" else ws[::-1])})
    return out


def write_jsonl(path: Path, records: list[dict]) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in records))
    return path


def full_logits_loss(model: Llama, batch) -> torch.Tensor:
    """Summed response-token cross-entropy from every position's logits: the pretraining's own loss, fixed here
    so that the fixture model does not move with `batch_loss`'s rounding (this test's margins were measured on
    this exact model; a model pretrained with other rounding is another draw)."""
    scored = batch.targets != IGNORE
    return F.cross_entropy(model(batch.tokens)[scored], batch.targets[scored], reduction="sum")


def pretrained_tiny(d: Path) -> Llama:
    """tests/test_train.py's tiny Meta checkpoint, every weight trained PRETRAIN_STEPS steps on "copy"."""
    from tests.test_train import TINY_PARAMS

    d.mkdir(parents=True, exist_ok=True)
    train_sentencepiece(d / "tokenizer.model", 400)
    sd = random_meta_state_dict(64, 2, 4, 2, 400, 192, seed=0)
    model = Llama.from_pretrained(write_meta_dir(d, {**TINY_PARAMS, "vocab_size": 400, "norm_eps": 1e-5}, [sd]))
    examples = load_dataset(
        write_jsonl(d / "copy.jsonl", rows(512, 11, "copy")), model.tokenizer, chat=False, max_len=64
    )
    rng = random.Random(0)
    torch.manual_seed(0)
    opt = torch.optim.AdamW(model.parameters(), lr=3e-3)
    for _ in range(PRETRAIN_STEPS):
        batch = collate(rng.sample(examples.examples, 16))
        (full_logits_loss(model, batch) / batch.n_targets).backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
    return model.requires_grad_(False).eval()


def scale_residual(model: Llama, scale: float = RESIDUAL_SCALE) -> Llama:
    """A copy whose residual stream is `scale` times larger: embedding, every wo and every w2 times `scale`."""
    scaled = copy.deepcopy(model)
    with torch.no_grad():
        scaled.tok_embeddings.weight.mul_(scale)
        for layer in scaled.layers:
            layer.attention.wo.weight.mul_(scale)
            layer.feed_forward.w2.weight.mul_(scale)
    return scaled


def reverse_data(d: Path) -> dict[str, Path]:
    d.mkdir(parents=True, exist_ok=True)
    return {
        s: write_jsonl(d / f"{s}.jsonl", rows(n, seed, "reverse")) for s, n, seed in (("train", 64, 1), ("dev", 16, 2))
    }


def run(model: Llama, data: dict[str, Path], out: Path, seed: int = 0, **kw) -> tuple[float, bool]:
    """(best / step-0 dev loss, diverged) of a STEPS-step PARA run at LR_TOP (batch 8, eval every 10)."""
    cfg = FinetuneConfig(
        train=str(data["train"]),
        dev=str(data["dev"]),
        out=str(out),
        method="para",
        lr=LR_TOP,
        batch_size=8,
        max_steps=STEPS,
        eval_every=10,
        seed=seed,
        progress=False,
        **kw,
    )
    result = finetune(cfg, model=model)
    return result.best_dev_loss / result.initial_dev_loss, result.diverged


pytestmark = pytest.mark.usefixtures("one_torch_thread")


@pytest.fixture(scope="module")
def pretrained(tmp_path_factory) -> Llama:
    return pretrained_tiny(tmp_path_factory.mktemp("tiny"))


@pytest.fixture(scope="module")
def scaled(pretrained) -> Llama:
    return scale_residual(pretrained)


@pytest.fixture(scope="module")
def data(tmp_path_factory) -> dict[str, Path]:
    return reverse_data(tmp_path_factory.mktemp("reverse"))


def test_scaled_model_is_the_same_function_with_a_larger_residual_stream(pretrained, scaled):
    """The construction behind the stability test: the same logits as the unscaled model, pooled RMS ~ S."""
    tokens = torch.randint(0, 400, (2, 12), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        assert_close(scaled(tokens), pretrained(tokens), MODEL_PATH)
    seen = []
    adapter = create_adapter(scaled, PARAConfig(pool_norm=False))
    scales = adapter.scales
    adapter.scales = lambda i, pooled: seen.append(float(pooled.pow(2).mean(-1).sqrt().mean())) or scales(i, pooled)
    with torch.no_grad():
        scaled(tokens, adapter=adapter)
    assert all(0.3 * RESIDUAL_SCALE < s < 3 * RESIDUAL_SCALE for s in seen), seen


def test_pool_norm_para_learns_at_the_top_lr_where_the_paper_form_does_not(scaled, data, tmp_path):
    """Normalised PARA (the default) at LR_TOP lowers the dev loss to LEARNS_BOUND x its step-0 value or below;
    the negative control, the paper's form on the same model, data, seed and lr, does not get there."""
    ratio, diverged = run(scaled, data, tmp_path / "norm")
    print(f"pool_norm: best/step-0 dev loss {ratio:.3f} (bound {LEARNS_BOUND:.3f})")
    assert not diverged and ratio <= LEARNS_BOUND
    paper, paper_diverged = run(scaled, data, tmp_path / "paper", pool_norm=False)
    print(f"paper form: best/step-0 dev loss {paper:.3f}, diverged {paper_diverged}")
    assert paper > LEARNS_BOUND  # seed 0: diverged on the EPYC (ratio 1.0), 0.822 on the Xeon


@torch.no_grad()
def test_pool_norm_is_in_scales_files_and_the_engine(scaled, tmp_path):
    """Both forms: engine greedy tokens == the no-cache forward's; the flag is saved, and a file without it
    (written before the flag existed) loads as the paper's form."""
    from infer.engine import Engine
    from infer.sampling import SamplingParams
    from weights.adapters import load_adapter, save_adapter

    torch.manual_seed(0)
    norm = create_adapter(scaled, PARAConfig())
    with torch.no_grad():
        for layer in norm.layers:
            layer["para"].up.weight.normal_(0, 0.5)
    paper = create_adapter(scaled, PARAConfig(pool_norm=False))
    paper.load_state_dict(norm.state_dict())
    engine = Engine(scaled, num_blocks=32, block_size=4)
    prompt = torch.randint(3, 400, (9,), generator=torch.Generator().manual_seed(1)).tolist()
    params = SamplingParams(max_new_tokens=8, ignore_eos=True)
    outs = {}
    for name, adapter in (("norm", norm), ("paper", paper)):
        engine.add_adapter(name, adapter)
        out = engine.generate(prompt, params, adapters=[name])[0].token_ids
        for k, tok in enumerate(out):
            x = torch.tensor([prompt + out[:k]])
            assert int(scaled(x, adapter=adapter, prompt_lens=torch.tensor([len(prompt)]))[0, -1].argmax()) == tok
        outs[name] = out
    x = torch.tensor([prompt])
    assert_far(scaled(x, adapter=norm), scaled(x, adapter=paper), MODEL_PATH, "pool_norm vs paper")

    save_adapter(norm, tmp_path / "a")
    config = json.loads((tmp_path / "a" / "adapter_config.json").read_text())
    assert config["pool_norm"] is True
    assert_close(scaled(x, adapter=load_adapter(tmp_path / "a", scaled)), scaled(x, adapter=norm), MODEL_PATH)
    del config["pool_norm"]  # as written before the field existed
    (tmp_path / "a" / "adapter_config.json").write_text(json.dumps(config))
    old = load_adapter(tmp_path / "a", scaled)
    assert old.config.pool_norm is False
    assert_close(scaled(x, adapter=old), scaled(x, adapter=paper), MODEL_PATH)


def test_default_lr_per_method_and_the_flags():
    """--lr defaults to DEFAULT_LR[method] (named in --help); --no-pool-norm is the paper's form, PARA only."""
    p = build_parser()
    assert all(f"{m} {lr:g}" in p.format_help() for m, lr in DEFAULT_LR.items())
    base = ["--train", "t", "--dev", "d", "--out", "o"]
    for method in DEFAULT_LR:
        cfg = FinetuneConfig(**vars(p.parse_args(base + ["--method", method])))
        cfg.check()
        assert cfg.lr == DEFAULT_LR[method] and cfg.pool_norm is True
    cfg = FinetuneConfig(**vars(p.parse_args(base + ["--no-pool-norm", "--lr", "3e-4"])))
    cfg.check()
    assert cfg.pool_norm is False and cfg.lr == 3e-4
    with pytest.raises(TrainError, match="--no-pool-norm applies to --method para only"):
        FinetuneConfig(**vars(p.parse_args(base + ["--no-pool-norm", "--method", "lora"]))).check()


def test_down_lr_rsqrt_puts_w_down_in_its_own_group(scaled):
    adapter = create_adapter(scaled, PARAConfig())
    cfg = FinetuneConfig("t", "d", "o", lr=1e-2, down_lr_rsqrt=True)
    cfg.check()
    groups = optimizer_groups(cfg, adapter)
    downs = {id(layer["para"].down.weight) for layer in adapter.layers}
    assert [len(g["params"]) for g in groups] == [2 * len(downs), len(downs)]
    assert {id(q) for q in groups[1]["params"]} == downs and groups[1]["lr"] == 1e-2 / 8  # dim 64
    assert len(optimizer_groups(FinetuneConfig("t", "d", "o"), adapter)) == 1


def measure(seeds: int = 10) -> None:
    """The numbers behind LEARNS_MEASURED: best/step-0 dev loss of both forms at LR_TOP over `seeds` seeds."""
    import tempfile

    torch.set_num_threads(1)
    root = Path(tempfile.mkdtemp(prefix="para-stability-"))
    model = scale_residual(pretrained_tiny(root / "tiny"))
    data = reverse_data(root / "reverse")
    ratios: dict[str, list[float]] = {"pool_norm": [], "paper": []}
    for seed in range(seeds):
        for name, kw in (("pool_norm", {}), ("paper", {"pool_norm": False})):
            ratio, diverged = run(model, data, root / f"{name}{seed}", seed=seed, **kw)
            ratios[name].append(ratio)
            print(f"seed {seed} {name}: {ratio:.4f}{' (diverged)' if diverged else ''}", flush=True)
    for name, r in ratios.items():
        print(f"{name}: max {max(r):.4f} median {statistics.median(r):.4f} min {min(r):.4f}")


if __name__ == "__main__":
    measure(int(sys.argv[1]) if len(sys.argv) > 1 else 10)
