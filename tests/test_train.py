"""train/: data, losses, the fine-tuning loop, resume, test evaluation and the CLI's one-line errors.

Everything runs on a tiny random Llama (Meta directory + a small sentencepiece tokenizer) with toy
copy / reverse data; numbers are checked against plain per-example cross-entropy computed here.
"""

from __future__ import annotations

import json
import math
import random
from pathlib import Path

import pytest
import torch

from model import Llama
from model.peft import LoRAConfig, PARAConfig, create_adapter
from tests.helpers import WORDS, random_meta_state_dict, train_sentencepiece, write_meta_dir
from tests.tolerance import MODEL_PATH, approx
from train import checkpoint
from train.data import IGNORE, DataError, Example, collate, length_grouped_batches, load_dataset, read_jsonl
from train.evaluate import batch_loss, exact_match
from train.finetune import (
    EXIT_DIVERGED,
    EXIT_NO_IMPROVEMENT,
    FinetuneConfig,
    TrainError,
    finetune,
    linear_schedule,
    main,
)
from weights.adapters import load_adapter

TINY_PARAMS = {"dim": 64, "n_layers": 2, "n_heads": 4, "n_kv_heads": 2, "multiple_of": 32, "max_seq_len": 64}


def make_tiny_dir(d: Path) -> Path:
    """A Meta checkpoint directory: random weights (ffn 192) + a 400-piece sentencepiece tokenizer."""
    d.mkdir(parents=True, exist_ok=True)
    train_sentencepiece(d / "tokenizer.model", 400)
    sd = random_meta_state_dict(64, 2, 4, 2, 400, 192, seed=0)
    return write_meta_dir(d, {**TINY_PARAMS, "vocab_size": 400, "norm_eps": 1e-5}, [sd])


def toy_rows(n: int, seed: int) -> list[dict]:
    """Copy or reverse three words."""
    rng, rows = random.Random(seed), []
    for _ in range(n):
        ws = [rng.choice(WORDS[:40]) for _ in range(3)]
        task = rng.choice(["copy", "reverse"])
        out = ws if task == "copy" else ws[::-1]
        rows.append({"prompt": f"{task}: {' '.join(ws)} =", "response": " ".join(out), "id": len(rows)})
    return rows


def write_jsonl(path: Path, rows: list) -> Path:
    path.write_text("".join((r if isinstance(r, str) else json.dumps(r)) + "\n" for r in rows))
    return path


def write_toy(d: Path) -> dict[str, Path]:
    d.mkdir(parents=True, exist_ok=True)
    return {
        name: write_jsonl(d / f"{name}.jsonl", toy_rows(n, seed))
        for name, n, seed in (("train", 64, 1), ("dev", 16, 2), ("test", 6, 3))
    }


pytestmark = pytest.mark.usefixtures("one_torch_thread")


@pytest.fixture(scope="module")
def tiny_dir(tmp_path_factory) -> Path:
    return make_tiny_dir(tmp_path_factory.mktemp("tiny"))


@pytest.fixture(scope="module")
def tiny(tiny_dir) -> Llama:
    return Llama.from_pretrained(tiny_dir)


@pytest.fixture(scope="module")
def toy(tmp_path_factory) -> dict[str, Path]:
    return write_toy(tmp_path_factory.mktemp("toy"))


def config(toy: dict[str, Path], out: Path, **kw) -> FinetuneConfig:
    base = dict(train=str(toy["train"]), dev=str(toy["dev"]), out=str(out), batch_size=8, eval_every=10)
    return FinetuneConfig(**{**base, "progress": False, **kw})


def manual_loss(model: Llama, adapter, ex: Example) -> tuple[float, int]:
    """Σ -log p(token t | tokens < t) over the response tokens of one example, one unpadded row, in float64."""
    with torch.no_grad():
        logits = model(torch.tensor([ex.ids]), adapter=adapter, prompt_lens=torch.tensor([ex.prompt_len]))[0]
    logp = logits.double().log_softmax(-1)
    total = sum(-float(logp[t - 1, ex.ids[t]]) for t in range(ex.prompt_len, len(ex.ids)))
    return total, len(ex.ids) - ex.prompt_len


def manual_mean_loss(model: Llama, adapter, examples: list[Example]) -> float:
    sums = [manual_loss(model, adapter, e) for e in examples]
    return sum(s for s, _ in sums) / sum(n for _, n in sums)


def adapter_tensors(directory: Path) -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file

    return load_file(directory / "adapter_model.safetensors")


# ---- data ------------------------------------------------------------------------------------------------
def test_encoding_layout_and_targets(tiny, toy):
    """prompt ids + response ids + eos; targets are exactly the response tokens, shifted by one."""
    tok = tiny.tokenizer
    data = load_dataset(toy["train"], tok, chat=False, max_len=64)
    ex, rec = data.examples[0], json.loads(toy["train"].read_text().splitlines()[0])
    prompt = tok.encode(rec["prompt"])
    assert ex.ids == prompt + tok.encode(rec["response"], bos=False) + [tok.eos_id]
    assert ex.prompt_len == len(prompt) and prompt[0] == tok.bos_id and ex.where == f"{toy['train']}:1"
    assert ex.record == rec  # extra fields kept for metrics

    a = Example([5, 6, 7, 8, 9], 2, "x:1", {})
    b = Example([1, 2, 3], 1, "x:2", {})
    batch = collate([a, b], pad_id=0)
    assert batch.tokens.tolist() == [[5, 6, 7, 8, 9], [1, 2, 3, 0, 0]]
    assert batch.targets.tolist() == [[IGNORE, 7, 8, 9, IGNORE], [2, 3, IGNORE, IGNORE, IGNORE]]
    assert batch.prompt_lens.tolist() == [2, 1] and (batch.n_tokens, batch.n_targets) == (8, 5)


def test_chat_examples_use_the_model_template(smollm2, tmp_path):
    """SmolLM2: the prompt is the chat template with the assistant header; the response ends in <|im_end|>."""
    tok = smollm2.tokenizer
    path = write_jsonl(tmp_path / "c.jsonl", [{"prompt": "What is 2+2?", "response": "4"}])
    ex = load_dataset(path, tok, chat=True, max_len=512).examples[0]
    prompt = tok.encode_chat([{"role": "user", "content": "What is 2+2?"}])
    assert ex.ids[: ex.prompt_len] == prompt and tok.decode(prompt).endswith("<|im_start|>assistant\n")
    assert ex.ids[ex.prompt_len :] == tok.encode("4", bos=False) + [tok.eos_id]
    assert tok.decode([tok.eos_id]) == "<|im_end|>" and tok.eos_id in tok.stop_ids


def test_length_grouped_batches_cover_each_index_once_and_are_seeded():
    rng = random.Random(0)
    lengths = [rng.randint(3, 40) for _ in range(103)]
    a = length_grouped_batches(lengths, 8, seed=1, mega=4)
    assert sorted(i for b in a for i in b) == list(range(103))
    assert [len(b) for b in a] == [8] * 12 + [7]  # the one short batch is last
    assert a == length_grouped_batches(lengths, 8, seed=1, mega=4)
    assert a != length_grouped_batches(lengths, 8, seed=2, mega=4)
    padded = sum(len(b) * max(lengths[i] for i in b) for b in a)
    plain = [list(range(k, min(k + 8, 103))) for k in range(0, 103, 8)]
    assert padded < sum(len(b) * max(lengths[i] for i in b) for b in plain)  # grouping saves padding


def test_bad_lines_name_file_and_line(tmp_path):
    good = {"prompt": "p", "response": "r"}
    rows = [good, "{not json", json.dumps({"prompt": "p"}), json.dumps({"prompt": 3, "response": "r"}), "", "[1]"]
    path = write_jsonl(tmp_path / "d.jsonl", rows)
    with pytest.raises(DataError, match=rf"^{path}:2: not valid JSON .*--skip-bad"):
        read_jsonl(path)
    records, skipped = read_jsonl(path, skip_bad=True)
    assert [w for w, _ in records] == [f"{path}:1"]
    assert skipped == [
        skipped[0],
        f'{path}:3: field "response" is missing',
        f'{path}:4: field "prompt" must be a string, got int',
        f'{path}:6: expected a JSON object with "prompt" and "response", got list',
    ]
    assert skipped[0].startswith(f"{path}:2: not valid JSON")


def test_too_long_prompt_is_an_error_and_long_response_is_cut(tiny, tmp_path):
    tok = tiny.tokenizer
    long_prompt = {"prompt": "the quick brown fox " * 20, "response": "dog"}
    long_response = {"prompt": "copy: fox =", "response": "the quick brown fox " * 20}
    path = write_jsonl(tmp_path / "d.jsonl", [long_response, long_prompt])
    with pytest.raises(DataError, match=rf"{path}:2: prompt of \d+ tokens leaves no room for the response"):
        load_dataset(path, tok, chat=False, max_len=32)
    data = load_dataset(path, tok, chat=False, max_len=32, skip_bad=True)
    assert data.truncated == 1 and len(data.skipped) == 1 and len(data.examples[0].ids) == 32
    assert data.examples[0].ids[: data.examples[0].prompt_len] == tok.encode("copy: fox =")


# ---- losses and gradients --------------------------------------------------------------------------------
def test_loss_scores_only_response_tokens(tiny, toy):
    """batch_loss of a padded batch == Σ per-example response-token cross-entropy computed row by row."""
    torch.manual_seed(0)
    adapter = create_adapter(tiny, PARAConfig(r=4))
    with torch.no_grad():
        for layer in adapter.layers:
            layer["para"].up.weight.normal_(0, 0.1)  # prompt-dependent scales: pooling position matters
    examples = load_dataset(toy["dev"], tiny.tokenizer, chat=False, max_len=64).examples[:3]
    assert len({e.prompt_len for e in examples}) > 1 and len({len(e.ids) for e in examples}) > 1  # padding, pooling
    one_total, one_n = manual_loss(tiny, adapter, examples[0])
    total = sum(manual_loss(tiny, adapter, e)[0] for e in examples)
    ex = examples[0]
    with torch.no_grad():
        assert float(batch_loss(tiny, adapter, collate(examples[:1]))) == approx(one_total, MODEL_PATH)
        assert collate(examples[:1]).n_targets == one_n
        assert float(batch_loss(tiny, adapter, collate(examples))) == approx(total, MODEL_PATH)
        # scoring the prompt too would give another number: the mask is doing something
        logits = tiny(torch.tensor([ex.ids]), adapter=adapter, prompt_lens=torch.tensor([ex.prompt_len]))[0]
    everything = float(torch.nn.functional.cross_entropy(logits[:-1], torch.tensor(ex.ids[1:]), reduction="sum"))
    assert everything > one_total + 1.0


def test_para_gradient_reaches_every_layer(tiny, toy):
    torch.manual_seed(0)
    adapter = create_adapter(tiny, PARAConfig(r=4))
    batch = collate(load_dataset(toy["dev"], tiny.tokenizer, chat=False, max_len=64).examples[:4])
    batch_loss(tiny, adapter, batch).backward()
    for layer in adapter.layers:  # identity init: W_up = 0 blocks the gradient of W_down, not of W_up / b_up
        vg = layer["para"]
        assert vg.up.weight.grad.abs().sum() > 0 and vg.up.bias.grad.abs().sum() > 0
        assert vg.down.weight.grad.abs().sum() == 0
    with torch.no_grad():
        for layer in adapter.layers:
            layer["para"].up.weight.normal_(0, 0.05)
    adapter.zero_grad()
    batch_loss(tiny, adapter, batch).backward()
    for layer in adapter.layers:
        vg = layer["para"]
        assert all(p.grad.abs().sum() > 0 for p in (vg.down.weight, vg.up.weight, vg.up.bias))
    # the gradient is the loss's: central differences on a few coordinates of the last layer's b_up
    bias = adapter.layers[-1]["para"].up.bias
    for j in (0, 70, 200):
        with torch.no_grad():
            bias[j] += 1e-2
            up = float(batch_loss(tiny, adapter, batch))
            bias[j] -= 2e-2
            down = float(batch_loss(tiny, adapter, batch))
            bias[j] += 1e-2
        assert float(bias.grad[j]) == pytest.approx((up - down) / 2e-2, rel=2e-2, abs=1e-3)


def test_linear_schedule_warmup_and_decay():
    f = linear_schedule(total=100, warmup=6)
    assert [f(s) for s in (0, 2, 5, 6, 53, 99)] == pytest.approx([1 / 6, 0.5, 1.0, 1.0, 47 / 94, 1 / 94])
    assert linear_schedule(10, 0)(0) == 1.0


# ---- the loop --------------------------------------------------------------------------------------------
def test_one_step_changes_only_adapter_parameters(tiny, toy, tmp_path):
    before = {k: v.clone() for k, v in tiny.state_dict().items()}
    result = finetune(config(toy, tmp_path / "o", lr=1e-2, max_steps=1), model=tiny)
    assert result.steps == 1 and result.num_trainable == 2 * (64 * 12 + 12 * 288 + 288)
    after = tiny.state_dict()
    assert before.keys() == after.keys() and all(torch.equal(before[k], after[k]) for k in before)
    assert not any(p.requires_grad for p in tiny.parameters())
    torch.manual_seed(0)
    fresh = create_adapter(tiny, PARAConfig()).state_dict()
    trained = load_adapter(tmp_path / "o" / "last", tiny).state_dict()
    for i in range(2):  # Adam moved every W_up and b_up; W_down had an exactly-zero gradient (W_up = 0)
        p = f"layers.{i}.para."
        assert not torch.equal(trained[p + "up.weight"], fresh[p + "up.weight"])
        assert not torch.equal(trained[p + "up.bias"], fresh[p + "up.bias"])
        assert torch.equal(trained[p + "down.weight"], fresh[p + "down.weight"])


def test_first_step_loss_is_the_train_set_mean(tiny, toy, tmp_path):
    """One optimizer step over the whole set (4 micro-batches): its loss is the token mean over all of it."""
    losses = []
    cfg = config(toy, tmp_path / "o", method="lora", batch_size=16, grad_accum=4, epochs=1)
    result = finetune(cfg, model=tiny, on_step=lambda step, loss: losses.append(loss))
    assert result.total_steps == 1 and len(losses) == 1
    examples = load_dataset(toy["train"], tiny.tokenizer, chat=False, max_len=64).examples
    assert losses[0] == approx(manual_mean_loss(tiny, None, examples), MODEL_PATH)  # a fresh LoRA is the base


@pytest.mark.parametrize("method, lr", [("para", 3e-2), ("lora", 3e-2), ("ia3", 1e-1)])
def test_tiny_run_lowers_dev_loss(method, lr, tiny, toy, tmp_path):
    out = tmp_path / method
    result = finetune(config(toy, out, method=method, lr=lr, max_steps=30), model=tiny)
    dev = load_dataset(toy["dev"], tiny.tokenizer, chat=False, max_len=64).examples
    assert result.initial_dev_loss == approx(manual_mean_loss(tiny, None, dev), MODEL_PATH)
    best = load_adapter(out / "best", tiny)
    assert result.best_dev_loss == approx(manual_mean_loss(tiny, best, dev), MODEL_PATH)
    assert result.best_dev_loss < 0.95 * result.initial_dev_loss, result
    evals = [json.loads(s) for s in (out / "metrics.jsonl").read_text().splitlines()]
    evals = [e for e in evals if e["event"] == "eval"]
    assert [e["step"] for e in evals] == [0, 10, 20, 30]
    assert min(e["dev_loss"] for e in evals) == result.best_dev_loss
    saved = json.loads((out / "result.json").read_text())
    assert saved["best_dev_loss"] == result.best_dev_loss
    assert not result.diverged and result.diverge_reason is None and result.improved  # a sane lr: no alarm
    assert saved["diverged"] is False and saved["improved"] is True


def test_early_stopping_keeps_the_best(tiny, toy, tmp_path):
    """A learning rate far too high: dev loss wanders; the run stops at the first eval that makes `patience`
    evals in a row without a new best, and best/ holds the adapter of the lowest dev loss."""
    out = tmp_path / "o"
    result = finetune(config(toy, out, method="lora", lr=1.0, eval_every=2, patience=3), model=tiny)
    evals = [e for e in map(json.loads, (out / "metrics.jsonl").read_text().splitlines()) if e["event"] == "eval"]
    best, bad, stop = math.inf, 0, None
    for e in evals:
        best, bad = (e["dev_loss"], 0) if e["dev_loss"] < best else (best, bad + 1)
        if bad == 3:
            stop = e["step"]
            break
    assert result.stopped_early and stop == result.steps == evals[-1]["step"] < result.total_steps
    assert result.best_dev_loss == best and result.best_step == min(evals, key=lambda e: e["dev_loss"])["step"]
    dev = load_dataset(toy["dev"], tiny.tokenizer, chat=False, max_len=64).examples
    assert manual_mean_loss(tiny, load_adapter(out / "best", tiny), dev) == approx(best, MODEL_PATH)


def _strip_timing(path: Path) -> list[dict]:
    rows = [json.loads(s) for s in path.read_text().splitlines()]
    return [{k: v for k, v in r.items() if k != "tokens_per_s"} for r in rows]


def test_resume_reaches_the_uninterrupted_result(tiny, toy, tmp_path):
    """LoRA with dropout (random masks) and gradient accumulation: stopping mid-epoch between evals, or a crash
    after an eval, then --resume gives bit-identical adapters, logs and results."""
    kw = dict(method="lora", lora_dropout=0.1, lr=1e-2, batch_size=4, grad_accum=2, epochs=2, eval_every=5)
    full = finetune(config(toy, tmp_path / "full", **kw), model=tiny)
    assert full.total_steps == 16 and full.steps == 16

    part = finetune(config(toy, tmp_path / "stop", stop_after=7, **kw), model=tiny)
    assert part.interrupted and part.steps == 7 and part.test_score is None
    resumed = finetune(config(toy, tmp_path / "stop", resume=True, **kw), model=tiny)

    def crash(step, loss):
        if step == 12:
            raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        finetune(config(toy, tmp_path / "crash", **kw), model=tiny, on_step=crash)
    assert torch.load(tmp_path / "crash" / "last" / checkpoint.STATE)["state"]["step"] == 10
    crashed = finetune(config(toy, tmp_path / "crash", resume=True, **kw), model=tiny)

    timing = ("train_seconds", "tokens_per_second", "out")
    want = {k: v for k, v in vars(full).items() if k not in timing}
    for run, result in (("stop", resumed), ("crash", crashed)):
        assert {k: v for k, v in vars(result).items() if k not in timing} == want
        for sub in ("best", "last"):
            a, b = adapter_tensors(tmp_path / "full" / sub), adapter_tensors(tmp_path / run / sub)
            assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
        assert _strip_timing(tmp_path / run / "metrics.jsonl") == _strip_timing(tmp_path / "full" / "metrics.jsonl")
    # the adapter did move (the comparison above is not between two untouched adapters)
    torch.manual_seed(0)
    fresh = create_adapter(tiny, LoRAConfig(r=8, lora_alpha=8)).state_dict()
    last = load_adapter(tmp_path / "full" / "last", tiny).state_dict()
    assert any(not torch.equal(last[k], fresh[k]) for k in fresh)

    with pytest.raises(TrainError, match="was saved with lr=0.01, this run has 0.02"):
        finetune(config(toy, tmp_path / "stop", resume=True, **{**kw, "lr": 2e-2}), model=tiny)
    with pytest.raises(TrainError, match="already holds a run"):
        finetune(config(toy, tmp_path / "stop", **kw), model=tiny)


def test_checkpoint_falls_back_to_the_swapped_out_copy(tiny, tmp_path):
    adapter = create_adapter(tiny, PARAConfig(r=2))
    checkpoint.save(tmp_path / "last", adapter, {"state": {"step": 3}})
    checkpoint.save(tmp_path / "last", adapter, {"state": {"step": 4}})
    assert sorted(p.name for p in tmp_path.iterdir()) == ["last"]  # no temp or old directory left behind
    (tmp_path / "last").rename(tmp_path / ".last.old")  # a crash between the two renames of a swap
    found = checkpoint.find(tmp_path / "last")
    assert found == tmp_path / ".last.old"
    assert checkpoint.load(found, tiny, adapter)["state"]["step"] == 4


def test_test_evaluation_uses_the_engine_the_best_adapter_and_the_metric(tiny, toy, tmp_path):
    from infer.engine import Engine
    from infer.sampling import SamplingParams

    seen = []

    def first_word(prediction: str, record: dict) -> float:
        seen.append(record["id"])  # extra fields reach the metric
        return float(prediction.split()[:1] == record["response"].split()[:1])

    out = tmp_path / "o"
    cfg = config(toy, out, method="para", lr=3e-2, max_steps=20, test=str(toy["test"]), chat=False)
    result = finetune(cfg, model=tiny, metric=first_word)
    rows = [json.loads(s) for s in (out / "test_predictions.jsonl").read_text().splitlines()]
    records = [json.loads(s) for s in toy["test"].read_text().splitlines()]
    assert sorted(seen) == [r["id"] for r in records] and result.n_test == len(records) == len(rows)

    # independent: beam 3 with the saved best adapter, a budget of the longest test response + eos
    tok = tiny.tokenizer
    best = load_adapter(out / "best", tiny)
    budget = max(len(tok.encode(r["response"], bos=False)) + 1 for r in records)
    engine = Engine(tiny, num_blocks=64)
    engine.add_adapter("best", best)
    outs = engine.generate(
        [tok.encode(r["prompt"]) for r in records], SamplingParams(max_new_tokens=budget, beams=3), ["best"] * 6
    )
    assert [r["prediction"] for r in rows] == [o.text for o in outs]
    scores = [float(o.text.split()[:1] == r["response"].split()[:1]) for o, r in zip(outs, records)]
    assert result.test_metric == "first_word" and result.test_score == pytest.approx(sum(scores) / len(scores))
    assert exact_match("  a b ", {"response": "a b\n"}) == 1.0 and exact_match("a", {"response": "a b"}) == 0.0


# ---- command line ----------------------------------------------------------------------------------------
def run_cli(argv: list[str], capsys) -> tuple[int, str, str]:
    code = main(argv)
    cap = capsys.readouterr()
    return code, cap.out, cap.err


def test_cli_trains_and_writes_its_outputs(tiny_dir, toy, tmp_path, capsys):
    out = tmp_path / "o"
    argv = ["--model", str(tiny_dir), "--method", "ia3", "--train", str(toy["train"]), "--dev", str(toy["dev"])]
    argv += ["--test", str(toy["test"]), "--out", str(out), "--max-steps", "3", "--batch-size", "8", "--no-progress"]
    code, stdout, err = run_cli(argv + ["--lr", "0.03"], capsys)  # an lr that surely improves: else exit 4
    assert code == 0, err
    result = json.loads(stdout)
    assert result["method"] == "ia3" and result["steps"] == 3 and result["test_metric"] == "exact_match"
    assert result["improved"] is True and result["diverged"] is False
    assert sorted(p.name for p in out.iterdir()) == [
        "best",
        "last",
        "metrics.jsonl",
        "result.json",
        "test_predictions.jsonl",
    ]
    assert "ia3: 512 trainable parameters, 3 steps" in err


@pytest.mark.parametrize(
    "case, message",
    [
        ("missing", "--train {d}/missing.jsonl: no such file"),
        ("empty", "--dev {d}/empty.jsonl: no examples"),
        ("bad_json", "--train {d}/bad.jsonl:2: not valid JSON"),
        ("no_response", '--train {d}/noresp.jsonl:1: field "response" is missing'),
        ("method", "--method 'adapterx' is unknown (choose one of para, lora, ia3)"),
        ("rank", "--r does not apply to --method ia3"),
        ("too_long", "{d}/long.jsonl:1: prompt of"),
        ("model", "unknown model source"),
        ("flag", "unrecognized arguments: --bogus"),
    ],
)
def test_cli_bad_input_is_one_line_exit_2(case, message, tiny_dir, toy, tmp_path, capsys):
    write_jsonl(tmp_path / "empty.jsonl", [""])
    write_jsonl(tmp_path / "bad.jsonl", [{"prompt": "a", "response": "b"}, '{"prompt": "a", "response": '])
    write_jsonl(tmp_path / "noresp.jsonl", [{"prompt": "a"}])
    write_jsonl(tmp_path / "long.jsonl", [{"prompt": "the quick brown fox " * 30, "response": "x"}])
    files = {"train": str(toy["train"]), "dev": str(toy["dev"]), "model": str(tiny_dir), "method": "para"}
    extra: list[str] = []
    if case == "missing":
        files["train"] = str(tmp_path / "missing.jsonl")
    elif case == "empty":
        files["dev"] = str(tmp_path / "empty.jsonl")
    elif case == "bad_json":
        files["train"] = str(tmp_path / "bad.jsonl")
    elif case == "no_response":
        files["train"] = str(tmp_path / "noresp.jsonl")
    elif case == "method":
        files["method"] = "adapterx"
    elif case == "rank":
        files["method"], extra = "ia3", ["--r", "4"]
    elif case == "too_long":
        files["train"] = str(tmp_path / "long.jsonl")
    elif case == "model":
        files["model"] = str(tmp_path / "nothing-here")
    elif case == "flag":
        extra = ["--bogus"]
    argv = [a for k, v in files.items() for a in (f"--{k}", v)] + ["--out", str(tmp_path / "o"), *extra]
    code, _, err = run_cli(argv + ["--no-progress", "--max-steps", "1"], capsys)
    assert code == 2
    assert err.startswith("error: ") and err.count("\n") == 1 and "Traceback" not in err
    assert message.format(d=tmp_path) in err


def test_cli_skip_bad_reports_each_skipped_line(tiny_dir, toy, tmp_path, capsys):
    rows = [json.loads(s) for s in toy["train"].read_text().splitlines()]
    train = write_jsonl(tmp_path / "t.jsonl", rows[:3] + ["{oops", {"prompt": "x", "response": 5}] + rows[3:])
    argv = ["--model", str(tiny_dir), "--train", str(train), "--dev", str(toy["dev"]), "--out", str(tmp_path / "o")]
    code, _, err = run_cli(argv + ["--skip-bad", "--max-steps", "1", "--lr", "0.03", "--no-progress"], capsys)
    assert code == 0, err
    assert f"skipped {train}:4: not valid JSON" in err
    assert f'skipped {train}:5: field "response" must be a string, got int' in err
    assert math.isfinite(json.loads((tmp_path / "o" / "result.json").read_text())["best_dev_loss"])


# ---- runs that fail loudly -------------------------------------------------------------------------------
def divergence_lines(err: str) -> list[str]:
    return [line for line in err.splitlines() if line.startswith("train.finetune: ")]


def test_divergence_dev_loss_above_initial(tiny, tiny_dir, toy, tmp_path, capsys):
    """LoRA at lr 1 (10^4 x the default) with dev responses drawn from words the train responses never use:
    dev loss stays above its step-0 value, so after --diverge-patience (2) evals the run stops, keeps best/
    (the step-0 adapter), says why on one stderr line and exits 3; --resume (same lr) trains no further."""
    rng, rows = random.Random(5), toy_rows(16, 2)
    for r in rows:
        r["response"] = " ".join(rng.choice(WORDS[60:80]) for _ in range(3))
    dev = write_jsonl(tmp_path / "dev.jsonl", rows)
    out = tmp_path / "o"
    argv = ["--model", str(tiny_dir), "--method", "lora", "--train", str(toy["train"]), "--dev", str(dev)]
    argv += ["--out", str(out), "--lr", "1", "--max-steps", "30", "--eval-every", "5", "--batch-size", "8"]
    code, stdout, err = run_cli(argv + ["--no-progress"], capsys)
    assert code == EXIT_DIVERGED == 3, err
    result = json.loads((out / "result.json").read_text())
    assert json.loads(stdout) == result
    evals = [e for e in map(json.loads, (out / "metrics.jsonl").read_text().splitlines()) if e["event"] == "eval"]
    assert [e["step"] for e in evals] == [0, 5, 10] and all(e["dev_loss"] > evals[0]["dev_loss"] for e in evals[1:])
    reason = f"dev loss {evals[-1]['dev_loss']:.4g} > initial {evals[0]['dev_loss']:.4g} for 2 evaluations"
    assert result["diverged"] is True and result["diverge_reason"] == reason
    assert result["steps"] == 10 < result["total_steps"] and result["best_step"] == 0 and result["improved"] is False
    assert divergence_lines(err) == [f"train.finetune: diverged at step 10 ({reason}) with lr 1; try --lr 0.3"]
    examples = load_dataset(dev, tiny.tokenizer, chat=False, max_len=64).examples
    best = load_adapter(out / "best", tiny)
    assert manual_mean_loss(tiny, best, examples) == approx(result["initial_dev_loss"], MODEL_PATH)

    log = (out / "metrics.jsonl").read_text()
    code, stdout, err = run_cli(argv + ["--no-progress", "--resume"], capsys)  # same lr: it would diverge again
    assert code == EXIT_DIVERGED and divergence_lines(err) == [
        f"train.finetune: diverged at step 10 ({reason}) with lr 1; try --lr 0.3"
    ]
    assert (out / "metrics.jsonl").read_text() == log and json.loads(stdout)["steps"] == 10


def test_divergence_non_finite_train_loss(tiny, toy, tmp_path, capsys):
    """PARA in the paper's form (raw pool: VG's pre-activations are large) at lr 1e20: its scales overflow float32
    and the second step's loss is NaN. From Python the run returns (no exception) with diverged set; best/ (step 0)
    is still scored on the test set."""
    out = tmp_path / "o"
    cfg = config(toy, out, method="para", pool_norm=False, lr=1e20, max_steps=30, test=str(toy["test"]))
    result = finetune(cfg, model=tiny)
    assert result.diverged and result.diverge_reason == "train loss nan" and result.steps == 2
    assert not result.improved and result.best_step == 0 and math.isfinite(result.best_dev_loss)
    assert json.loads((out / "result.json").read_text()) == json.loads(json.dumps(vars(result)))
    lines = divergence_lines(capsys.readouterr().err)
    assert lines == ["train.finetune: diverged at step 2 (train loss nan) with lr 1e+20; try --lr 3e+19"]
    best = load_adapter(out / "best", tiny).state_dict()
    assert all(torch.isfinite(t).all() for t in best.values())
    assert result.n_test == 6 and result.test_score is not None
    log = [json.loads(s) for s in (out / "metrics.jsonl").read_text().splitlines()]
    assert [e["event"] for e in log[-2:]] == ["diverged", "test"]
    assert log[-2] == {"event": "diverged", "step": 2, "reason": "train loss nan"}


def test_run_without_improvement_says_so(tiny_dir, toy, tmp_path, capsys):
    """lr 1e-10 moves (IA)^3's scales (exactly 1) by less than float32 resolves: every dev loss equals the
    step-0 one, so best_step stays 0: one stderr line, "improved": false, exit 4 (not a divergence)."""
    out = tmp_path / "o"
    argv = ["--model", str(tiny_dir), "--method", "ia3", "--train", str(toy["train"]), "--dev", str(toy["dev"])]
    argv += ["--out", str(out), "--lr", "1e-10", "--max-steps", "4", "--eval-every", "2", "--no-progress"]
    code, stdout, err = run_cli(argv, capsys)
    assert code == EXIT_NO_IMPROVEMENT == 4, err
    result = json.loads((out / "result.json").read_text())
    assert result["improved"] is False and result["best_step"] == 0 and result["steps"] == 4
    assert result["diverged"] is False and result["diverge_reason"] is None
    evals = [e for e in map(json.loads, (out / "metrics.jsonl").read_text().splitlines()) if e["event"] == "eval"]
    assert [e["step"] for e in evals] == [0, 2, 4] and len({e["dev_loss"] for e in evals}) == 1
    assert divergence_lines(err) == [
        f"train.finetune: no improvement: no step beat the initial dev loss {evals[0]['dev_loss']:.4g} "
        "(best/ is the untrained adapter)"
    ]
