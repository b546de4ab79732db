"""train/pillow: the matching network's policy against hand-computed probabilities and gradients, learning with a
stubbed LLM, no-repeat selection, clear errors, embeddings against the model's own logits, matcher files, and the
CLIs end to end on a tiny model (the real SmolLM2 RL loop is the slow test at the end)."""

from __future__ import annotations

import json
import math
import os
import random
import re
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from infer.pillow import pool as pillow_pool
from model import Llama
from tests.helpers import WORDS, random_meta_state_dict, train_sentencepiece, write_meta_dir
from tests.tolerance import MODEL_PATH, PATH, approx, assert_close
from train import pillow
from train.evaluate import exact_match
from train.pillow import (
    Matcher,
    PillowError,
    Pool,
    Rewarder,
    RLConfig,
    banned_mask,
    cached_embeddings,
    embed_texts,
    few_shot_prompt,
    load_matcher,
    load_pool,
    nearest_choices,
    random_choices,
    reinforce_loss,
    save_matcher,
    train_matcher,
)
from weights.adapters import save_adapter

pytestmark = pytest.mark.usefixtures("one_torch_thread")


class FixedScores(Matcher):
    """A matcher whose scores are free parameters (one row per query, the same at every choice): its policy is
    softmax(s) over what is left, which the tests below compute by hand."""

    def __init__(self, scores: list[list[float]]) -> None:
        super().__init__(emb_dim=2, hidden=2, k=2)
        self.s = torch.nn.Parameter(torch.tensor(scores))

    def scores(self, query, chosen_mean, keys):
        return self.s


def write_jsonl(path: Path, rows: list) -> Path:
    path.write_text("".join((r if isinstance(r, str) else json.dumps(r)) + "\n" for r in rows))
    return path


def make_pool(n: int) -> Pool:
    recs = [{"prompt": f"p{i}", "response": f"r{i}"} for i in range(n)]
    return Pool("mem", recs, pillow.texts_sha256([pillow.exemplar_text(r) for r in recs]))


# ---- the policy, by hand ------------------------------------------------------------------------------
def test_sequential_probabilities_by_hand():
    s = [1.0, 2.0, 3.0, 0.5]
    m = FixedScores([s])
    e = [math.exp(x) for x in s]
    # choose 2 first: e^3 / (e^1 + e^2 + e^3 + e^0.5); then 0 among {0, 1, 3}: e^1 / (e^1 + e^2 + e^0.5)
    p_first = e[2] / sum(e)
    p_second = e[0] / (e[0] + e[1] + e[3])
    h1 = -sum(x / sum(e) * math.log(x / sum(e)) for x in e)
    rest = [e[0], e[1], e[3]]
    h2 = -sum(x / sum(rest) * math.log(x / sum(rest)) for x in rest)
    r = m.rollout(torch.zeros(1, 2), torch.zeros(4, 2), 2, actions=torch.tensor([[2, 0]]))
    assert r.log_prob.item() == approx(math.log(p_first) + math.log(p_second), PATH)
    assert r.entropy.item() == approx(h1 + h2, PATH)
    # a banned exemplar is out of the softmax from the start: choose 1 with 2 banned → e^2 / (e^1 + e^2 + e^0.5)
    banned = torch.tensor([[False, False, True, False]])
    r = m.rollout(torch.zeros(1, 2), torch.zeros(4, 2), 1, banned=banned, actions=torch.tensor([[1]]))
    assert r.log_prob.item() == approx(math.log(e[1] / (e[0] + e[1] + e[3])), PATH)
    # greedy: argmax, then argmax of the rest
    assert m.rollout(torch.zeros(1, 2), torch.zeros(4, 2), 3, greedy=True).choices.tolist() == [[2, 1, 0]]
    # sampled first choices follow softmax(s): 4000 draws within 4 standard errors of each probability
    m4 = FixedScores([s] * 4000)
    g = torch.Generator().manual_seed(0)
    first = m4.rollout(torch.zeros(4000, 2), torch.zeros(4, 2), 1, generator=g).choices[:, 0]
    for j in range(4):
        p = e[j] / sum(e)
        assert abs(float((first == j).float().mean()) - p) < 4 * math.sqrt(p * (1 - p) / 4000)


def test_policy_gradient_sign_by_hand():
    """Reward 1 for exemplar 0, 0 otherwise, baseline 0.5: advantages ±0.5 sum to zero, so the gradient of the loss
    w.r.t. the scores is -(1/B) Σ A_i e_{a_i} = -(1/4)[1, -0.5, -0.5], whatever the probabilities."""
    m = FixedScores([[0.0, 0.5, -0.5]])
    actions = torch.tensor([[0], [1], [2], [0]])
    roll = m.rollout(torch.zeros(4, 2), torch.zeros(3, 2), 1, actions=actions)
    rewards = (actions[:, 0] == 0).float()
    loss = reinforce_loss(roll, rewards, baseline=0.5, entropy_coef=0.0)
    loss.backward()
    assert m.s.grad.tolist()[0] == approx([-0.25, 0.125, 0.125], PATH)
    p0_before = torch.softmax(m.s.detach()[0], -1)[0].item()
    with torch.no_grad():
        m.s -= 0.5 * m.s.grad  # one SGD step
    p0_after = torch.softmax(m.s.detach()[0], -1)[0].item()
    # by hand: scores [0.125, 0.4375, -0.5625]
    e = [math.exp(0.125), math.exp(0.4375), math.exp(-0.5625)]
    assert p0_after == approx(e[0] / sum(e), PATH)
    assert p0_after > p0_before


def test_reinforce_raises_the_favoured_exemplar():
    """The real matcher, a fixed reward favouring exemplar k: its probability as first choice rises step by step."""
    torch.manual_seed(0)
    P, d, k = 6, 8, 3
    pool_emb, queries = torch.randn(P, d), torch.randn(40, d)
    m = Matcher(d, hidden=16, k=8)
    m.fit_normalization(pool_emb)

    def p_k() -> float:
        with torch.no_grad():
            acts = torch.full((len(queries), 1), k)
            return m.rollout(queries, pool_emb, 1, actions=acts).log_prob.exp().mean().item()

    def reward(idx, choices):
        return (choices == k).any(1).float()

    seen = [p_k()]
    for seed in range(5):
        train_matcher(m, pool_emb, queries, reward, RLConfig(shots=1, steps=4, batch_size=40, lr=1e-2, seed=seed))
        seen.append(p_k())
    assert seen[0] == pytest.approx(1 / P, abs=0.1)
    assert all(b > a for a, b in zip(seen, seen[1:])), seen
    assert seen[-1] > 0.5


# ---- learning with a stubbed LLM ----------------------------------------------------------------------
FORMATS = ("#{}#", "[{}]", "<{}>", "({})", "Answer: {}", "{}!")  # query types need 0..3; 4, 5 mislead


def format_world(seed: int, n_train: int = 96, n_test: int = 96):
    """4 query types, each needing one answer format; the pool has one exemplar per needed format (embeddings
    unrelated to its queries) and 4 decoys in formats no query needs, each embedded right next to one type's
    queries (a nearest-neighbour pick is a decoy). The stub LLM copies the last exemplar's format."""
    g = torch.Generator().manual_seed(seed)
    d = 16
    centers = torch.randn(4, d, generator=g) * 2
    good = [{"prompt": f"good {t}", "response": FORMATS[t].format("x"), "fmt": t} for t in range(4)]
    decoys = [{"prompt": f"decoy {t}", "response": FORMATS[4 + t % 2].format("x"), "fmt": 4 + t % 2} for t in range(4)]
    records = good + decoys
    pool = Pool("mem", records, "sha")
    pool_emb = torch.cat([torch.randn(4, d, generator=g) * 2, centers + 0.1 * torch.randn(4, d, generator=g)])

    def queries(n):
        types = torch.arange(n) % 4
        emb = centers[types] + 0.5 * torch.randn(n, d, generator=g)
        recs = []
        for i, t in enumerate(types.tolist()):
            ans = WORDS[i % len(WORDS)]
            recs.append({"prompt": f"q{i}", "response": FORMATS[t].format(ans), "answer": ans, "type": t})
        return recs, emb

    return pool, pool_emb, queries(n_train), queries(n_test)


def stub_llm(queries, exemplars):
    """Answers every query in the format of the last exemplar it was shown (0-shot: bare)."""
    return [FORMATS[ex[-1]["fmt"]].format(q["answer"]) if ex else q["answer"] for q, ex in zip(queries, exemplars)]


def test_matcher_learns_to_pick_the_format_exemplar():
    pool, pool_emb, (train, train_emb), (test, test_emb) = format_world(seed=1)
    torch.manual_seed(0)
    m = Matcher(16, hidden=32, k=16)
    m.fit_normalization(pool_emb)
    reward = Rewarder(train, pool, stub_llm, exact_match)
    config = RLConfig(shots=1, steps=200, batch_size=32, seed=0)  # the default lr and entropy bonus
    history = train_matcher(m, pool_emb, train_emb, reward, config)
    with torch.no_grad():
        picks = m.rollout(test_emb, pool_emb, 1, greedy=True).choices[:, 0]
    right = torch.tensor([q["type"] for q in test])  # good exemplar t sits at pool index t
    assert (picks == right).float().mean().item() > 0.9
    # the task is built so the baselines fail: the nearest exemplar is the type's decoy, random is right 1/8
    nearest = nearest_choices(test_emb, pool_emb, 1)[:, 0]
    assert (nearest == right).float().mean().item() < 0.3
    assert (nearest == right + 4).float().mean().item() > 0.7
    assert sum(history["rewards"][:5]) / 5 < 0.4 < 0.9 < sum(history["rewards"][-5:]) / 5


def test_dev_selection_keeps_the_best_and_is_deterministic():
    pool, pool_emb, (train, train_emb), (dev, dev_emb) = format_world(seed=2, n_train=32, n_test=16)

    def run():
        torch.manual_seed(0)
        m = Matcher(16, hidden=32, k=16)
        m.fit_normalization(pool_emb)
        evals = []
        h = train_matcher(
            m,
            pool_emb,
            train_emb,
            Rewarder(train, pool, stub_llm, exact_match),
            RLConfig(shots=2, steps=12, batch_size=8, lr=1e-2, eval_every=5, seed=3),
            dev_emb=dev_emb,
            dev_reward=Rewarder(dev, pool, stub_llm, exact_match),
            on_eval=lambda s, r: evals.append((s, r)),
        )
        return m, h, evals

    m1, h1, evals = run()
    m2, h2, _ = run()
    assert [s for s, _ in evals] == [0, 5, 10, 12]
    best = max(evals, key=lambda e: e[1])  # the first of equal maxima
    assert (h1["best_step"], h1["best_dev"]) == best
    assert h1["rewards"] == h2["rewards"] and h1["dev"] == h2["dev"]
    for a, b in zip(m1.state_dict().values(), m2.state_dict().values()):
        assert torch.equal(a, b)


# ---- selection properties and errors ------------------------------------------------------------------
def test_selection_never_repeats():
    torch.manual_seed(0)
    P, B = 7, 300
    pool_emb, q = torch.randn(P, 5), torch.randn(B, 5)
    m = Matcher(5, hidden=8, k=4)
    m.fit_normalization(pool_emb)
    g = torch.Generator().manual_seed(1)
    banned = torch.rand(B, P, generator=g) < 0.2
    banned[:, 0] = False
    banned[banned.sum(1) > 2] = False  # at most 2 banned per row: 5 choices always fit
    for kw in ({"generator": g}, {"greedy": True}):
        full = m.rollout(q, pool_emb, P, **kw).choices
        assert sorted(full[0].tolist()) == list(range(P))
        assert all(sorted(row) == list(range(P)) for row in full.tolist())  # each row a permutation
        part = m.rollout(q, pool_emb, 5, banned=banned, **kw).choices
        for row, ban in zip(part.tolist(), banned.tolist()):
            assert len(set(row)) == 5 and not any(ban[j] for j in row)
    for choices in (random_choices(B, P, 5, banned, seed=2), nearest_choices(q, pool_emb, 5, banned)):
        for row, ban in zip(choices.tolist(), banned.tolist()):
            assert len(set(row)) == 5 and not any(ban[j] for j in row)
    with pytest.raises(PillowError, match="repeat an exemplar"):
        m.rollout(q[:1], pool_emb, 2, actions=torch.tensor([[3, 3]]))


def test_nearest_by_hand():
    pool_emb = torch.tensor([[1.0, 0.0], [0.0, 1.0], [1.0, 1.0], [-1.0, 0.0]])
    q = torch.tensor([[2.0, 0.2]])  # cosines: 0.995, 0.0995, 0.778, -0.995
    assert nearest_choices(q, pool_emb, 2).tolist() == [[2, 0]]  # the most similar last, next to the query
    assert nearest_choices(q, pool_emb, 2, torch.tensor([[True, False, False, False]])).tolist() == [[1, 2]]


def test_pool_and_shot_errors(tmp_path):
    with pytest.raises(PillowError, match="shots=4 exceeds the prompt pool's 3 exemplar"):
        Matcher(2, 4, 2).rollout(torch.zeros(1, 2), torch.zeros(3, 2), 4)
    with pytest.raises(PillowError, match="shots must be a positive integer"):
        random_choices(1, 3, 0)
    with pytest.raises(PillowError, match="empty"):
        nearest_choices(torch.zeros(1, 2), torch.zeros(0, 2), 1)
    empty = write_jsonl(tmp_path / "empty.jsonl", ["", "  "])
    with pytest.raises(PillowError, match=f"^{re.escape(str(empty))}: the prompt pool is empty"):
        load_pool(empty)
    bad = write_jsonl(tmp_path / "bad.jsonl", [{"prompt": "a", "response": "b"}, '{"prompt": "c"}'])
    with pytest.raises(PillowError, match=f'^{re.escape(str(bad))}:2: field "response" is missing$'):
        load_pool(bad)
    with pytest.raises(PillowError, match="no such file"):
        load_pool(tmp_path / "missing.jsonl")
    # a query whose own prompt is in the pool never sees it; too few exemplars left is an error naming the query
    pool = make_pool(2)
    assert banned_mask([{"prompt": "p1", "id": "x"}], pool, 1).tolist() == [[False, True]]
    assert banned_mask([{"prompt": "zz"}], pool, 2) is None
    with pytest.raises(PillowError, match=r"query 0 \(x\) has only 1 pool exemplar"):
        banned_mask([{"prompt": "p1", "id": "x"}], pool, 2)


@pytest.mark.parametrize(
    "extra, message",
    [
        (["--shots", "5"], "--shots: shots=5 exceeds the prompt pool's 3 exemplar(s)"),
        (["--shots", "0"], "--shots must be >= 1, got 0"),
        (["--steps", "0"], "--steps must be >= 1"),
        (["--pool", "EMPTY"], "EMPTY: the prompt pool is empty"),
        (["--pool", "BAD"], "BAD:2: not valid JSON"),
        (["--train", "MISSING"], "--train MISSING: no such file"),
        (["--task", "nope"], "--task: unknown task 'nope'"),
        (["--evaluate"], "--evaluate needs --matcher DIR"),
    ],
)
def test_cli_errors_are_one_line(tmp_path, capsys, extra, message):
    files = {
        "POOL": write_jsonl(tmp_path / "pool.jsonl", [{"prompt": f"p{i}", "response": "r"} for i in range(3)]),
        "EMPTY": write_jsonl(tmp_path / "empty.jsonl", []),
        "BAD": write_jsonl(tmp_path / "bad.jsonl", [{"prompt": "a", "response": "b"}, "{oops"]),
        "Q": write_jsonl(tmp_path / "q.jsonl", [{"prompt": "q", "response": "r"}]),
        "MISSING": tmp_path / "missing.jsonl",
    }
    argv = ["--pool", "POOL", "--train", "Q", "--dev", "Q", "--out", str(tmp_path / "out"), "--shots", "2"] + extra
    argv = [str(files[x]) if x in files else x for x in argv]
    message = "".join(str(files[w]) if w in files else w for w in re.split(r"(EMPTY|BAD|MISSING)", message))
    assert pillow.main(argv) == 2  # all of these answer before a model is loaded
    err = capsys.readouterr().err.strip()
    assert message in err and "\n" not in err and "Traceback" not in err


# ---- the tiny model: embeddings, files, CLIs ----------------------------------------------------------
PARAMS = {"dim": 64, "n_layers": 2, "n_heads": 4, "n_kv_heads": 2, "multiple_of": 32, "max_seq_len": 128}


def tiny_dir_at(d: Path, seed: int = 0) -> Path:
    d.mkdir(parents=True, exist_ok=True)
    train_sentencepiece(d / "tokenizer.model", 400)
    sd = random_meta_state_dict(64, 2, 4, 2, 400, 192, seed=seed)
    return write_meta_dir(d, {**PARAMS, "vocab_size": 400, "norm_eps": 1e-5}, [sd])


@pytest.fixture(scope="module")
def tiny_dir(tmp_path_factory) -> Path:
    return tiny_dir_at(tmp_path_factory.mktemp("tiny_pillow"))


@pytest.fixture(scope="module")
def tiny(tiny_dir) -> Llama:
    return Llama.from_pretrained(tiny_dir)


def test_embeddings_are_mean_final_hidden_states(tiny, tmp_path, monkeypatch):
    texts = ["the quick brown fox", "a", "model weight tensor shard layer head token rope norm"]
    emb = embed_texts(tiny, texts, batch_size=2)  # padded batches
    for t, e in zip(texts, emb):
        # the output projection is linear: mean over positions of the logits = (mean hidden) @ W_outᵀ
        with torch.no_grad():
            logits = tiny(torch.tensor([tiny.tokenizer.encode(t)]))[0]
        assert_close(e @ tiny.output.weight.T.detach(), logits.mean(0), MODEL_PATH)
        assert_close(embed_texts(tiny, [t])[0], e, MODEL_PATH)  # no padding: same
    first = cached_embeddings(tiny, texts, tmp_path, kind="pool")
    assert_close(first, emb, MODEL_PATH)
    files = list(tmp_path.glob("pool-*.safetensors"))
    assert len(files) == 1 and not list(tmp_path.glob(".*tmp*"))
    fp_sha = pillow.fingerprint_sha(tiny)[:16]
    assert files[0].name == f"pool-{pillow.texts_sha256(texts)[:16]}-{fp_sha}.safetensors"

    def boom(*a, **k):
        raise AssertionError("recomputed")

    monkeypatch.setattr(pillow_pool, "embed_texts", boom)  # where cached_embeddings looks it up
    assert torch.equal(cached_embeddings(tiny, texts, tmp_path, kind="pool"), first)  # read from the file
    with pytest.raises(AssertionError, match="recomputed"):  # other texts: another key
        cached_embeddings(tiny, texts[:2], tmp_path, kind="pool")
    monkeypatch.undo()
    files[0].write_bytes(b"torn")  # a torn file is recomputed and replaced
    assert_close(cached_embeddings(tiny, texts, tmp_path, kind="pool"), emb, MODEL_PATH)
    assert load_file(files[0])["embeddings"].shape == (3, 64)


def test_matcher_files(tiny, tmp_path):
    torch.manual_seed(0)
    m = Matcher(64, hidden=16, k=8)
    pool_emb = torch.randn(5, 64) * 3 + 1
    m.fit_normalization(pool_emb)
    from model.peft.adapters import model_fingerprint

    config = {"shots": 2, "pool_sha256": "abc", "pool_size": 5, "base_model": model_fingerprint(tiny)}
    target = tmp_path / "best"
    save_matcher(Matcher(64, hidden=16, k=8), target, config)  # an older matcher, replaced atomically below
    save_matcher(m, target, config | {"step": 7})
    assert sorted(os.listdir(tmp_path)) == ["best"]  # no temp or .old directory left behind
    assert sorted(os.listdir(target)) == ["matcher.json", "matcher.safetensors"]
    loaded, cfg = load_matcher(tmp_path, tiny)  # a training OUT resolves to OUT/best
    assert cfg["step"] == 7 and (cfg["emb_dim"], cfg["hidden"], cfg["k"], cfg["shots"]) == (64, 16, 8, 2)
    q = torch.randn(9, 64)
    assert torch.equal(
        loaded.rollout(q, pool_emb, 2, greedy=True).choices, m.rollout(q, pool_emb, 2, greedy=True).choices
    )
    assert_close(loaded.center, pool_emb.mean(0), PATH)
    other = Llama.from_pretrained(tiny_dir_at(tmp_path / "other", seed=1))
    with pytest.raises(PillowError, match="trained on another base model .*weights_sha256"):
        load_matcher(target, other)
    with pytest.raises(PillowError, match="not a matcher directory"):
        load_matcher(tmp_path / "nowhere")
    (target / "matcher.json").write_text(json.dumps(json.loads((target / "matcher.json").read_text()) | {"k": 9}))
    with pytest.raises(PillowError, match=r"matcher.safetensors: tensor .* has shape"):
        load_matcher(target)


def toy(n: int, seed: int, start: int = 0) -> list[dict]:
    """Copy or reverse three words: the exemplar shows which."""
    rng, rows = random.Random(seed), []
    for i in range(n):
        ws = [rng.choice(WORDS[:40]) for _ in range(3)]
        task = rng.choice(["copy", "reverse"])
        rows.append(
            {
                "prompt": f"{task}: {' '.join(ws)}",
                "response": " ".join(ws if task == "copy" else ws[::-1]),
                "id": f"toy-{start + i}",
            }
        )
    return rows


def test_cli_train_generate_evaluate_on_tiny_model(tiny_dir, tiny, tmp_path, capsys, monkeypatch):
    from infer.generate import main as generate_main
    from model.peft import PARAConfig, create_adapter

    pool_rows = toy(6, seed=1)
    pool_path = write_jsonl(tmp_path / "pool.jsonl", pool_rows)
    train = write_jsonl(tmp_path / "train.jsonl", toy(8, seed=2) + pool_rows[:1])  # the pool's own prompt too
    dev = write_jsonl(tmp_path / "dev.jsonl", toy(4, seed=3))
    cache = tmp_path / "cache"
    common = [
        "--model",
        str(tiny_dir),
        "--pool",
        str(pool_path),
        "--train",
        str(train),
        "--dev",
        str(dev),
        "--shots",
        "2",
        "--steps",
        "3",
        "--batch-size",
        "4",
        "--eval-every",
        "2",
        "--hidden",
        "16",
        "--k",
        "8",
        "--max-new-tokens",
        "4",
        "--no-progress",
        "--cache-dir",
        str(cache),
        "--seed",
        "5",
    ]
    assert pillow.main(common + ["--out", str(tmp_path / "run")]) == 0
    result = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert result["steps"] == 3 and result["best"] == str(tmp_path / "run" / "best")
    assert 0 < result["generations"] <= 3 * 4 + 3 * 4  # 3 steps of 4 + dev passes of 4 at steps 0, 2, 3 (cached)
    log = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    assert [e["step"] for e in log if e["event"] == "eval"] == [0, 2, 3]
    assert [e["step"] for e in log if e["event"] == "train"] == [1, 2, 3]
    cfg = json.loads((tmp_path / "run" / "best" / "matcher.json").read_text())
    assert cfg["pool_sha256"] == load_pool(pool_path).sha256 and cfg["pool_size"] == 6 and cfg["shots"] == 2
    assert cfg["base_model"]["dim"] == 64 and cfg["chat"] is False and (cfg["hidden"], cfg["k"]) == (16, 8)
    assert len(list(cache.glob("pool-*.safetensors"))) == 1
    # the same seed: the same rewards, evals and weights
    assert pillow.main(common + ["--out", str(tmp_path / "run2")]) == 0
    capsys.readouterr()
    log2 = [json.loads(line) for line in (tmp_path / "run2" / "metrics.jsonl").read_text().splitlines()]
    assert [e.get("reward", e.get("dev_reward")) for e in log2] == [e.get("reward", e.get("dev_reward")) for e in log]
    w1, w2 = (load_file(tmp_path / r / "best" / "matcher.safetensors") for r in ("run", "run2"))
    assert all(torch.equal(w1[k], w2[k]) for k in w1)
    assert pillow.main(common + ["--out", str(tmp_path / "run")]) == 2  # refuses to overwrite a trained matcher
    assert "already holds a trained matcher" in capsys.readouterr().err

    # inference: the prompt is the chosen exemplars, written out here by hand, then the query
    monkeypatch.setenv("PARALLAMA_CACHE", str(tmp_path / "home-cache"))  # infer.generate's embedding cache
    queries = ["copy: fox dog river", pool_rows[3]["prompt"]]
    argv = [
        "--model",
        str(tiny_dir),
        "--prompt-pool",
        str(pool_path),
        "--matcher",
        str(tmp_path / "run"),
        "--shots",
        "2",
        "--json",
        "--max-new-tokens",
        "3",
    ]
    argv += [a for q in queries for a in ("--prompt", q)]
    assert generate_main(argv) == 0
    rows = [json.loads(line) for line in capsys.readouterr().out.strip().splitlines()]
    for q, row in zip(queries, rows):
        chosen = row["exemplars"]
        assert len(chosen) == len(set(chosen)) == 2 and all(0 <= j < 6 for j in chosen)
        text = "".join(f"{pool_rows[j]['prompt']}\n{pool_rows[j]['response']}\n\n" for j in chosen) + q
        assert row["prompt_ids"] == tiny.tokenizer.encode(text)
    assert 3 not in rows[1]["exemplars"]  # a query never gets its own exemplar
    assert len(list((tmp_path / "home-cache" / "pillow").glob("pool-*.safetensors"))) == 1
    assert generate_main(argv[:-4] + ["--prompt", "x", "--shots", "7"]) == 2
    assert "shots=7 exceeds the prompt pool's 6" in capsys.readouterr().err
    assert generate_main(["--prompt", "x", "--prompt-pool", str(pool_path)]) == 2
    assert "--prompt-pool and --matcher go together" in capsys.readouterr().err

    # evaluation: base and a PARA adapter; a fresh PARA adapter is the identity, so its rows equal the base rows
    save_adapter(create_adapter(tiny, PARAConfig(r=4)), tmp_path / "para")
    test = write_jsonl(tmp_path / "test.jsonl", toy(5, seed=4))
    ev = [
        "--evaluate",
        "--model",
        str(tiny_dir),
        "--pool",
        str(pool_path),
        "--matcher",
        str(tmp_path / "run"),
        "--adapter",
        str(tmp_path / "para"),
        "--dev",
        str(dev),
        "--test",
        str(test),
        "--shots",
        "2",
        "--max-new-tokens",
        "4",
        "--no-progress",
        "--cache-dir",
        str(cache),
        "--out",
        str(tmp_path / "results"),
    ]
    assert pillow.main(ev) == 0
    capsys.readouterr()
    out = json.loads((tmp_path / "results" / "pillow_exact_match.json").read_text())
    assert set(out["scores"]) == {"base", "PARA"} and out["n"] == {"dev": 4, "test": 5}
    for split in ("dev", "test"):
        assert set(out["scores"]["base"][split]) == {"0-shot", "random", "nearest", "pillow"}
        assert out["scores"]["PARA"][split] == out["scores"]["base"][split]
        assert all(0 <= v <= 1 for v in out["scores"]["base"][split].values())
    table = (tmp_path / "results" / "pillow_exact_match.md").read_text()
    assert table.splitlines()[0] == "| selection | base dev | base test | PARA dev | PARA test |"
    assert [line.split("|")[1].strip() for line in table.splitlines()[2:6]] == [
        "0-shot",
        "random 2-shot",
        "nearest 2-shot",
        "pillow 2-shot",
    ]


def test_few_shot_prompt_formats(tiny):
    ex = [{"prompt": "copy: a b", "response": "a b"}, {"prompt": "reverse: c d", "response": "d c"}]
    tok = tiny.tokenizer
    assert few_shot_prompt(tok, ex, "copy: e f", chat=False) == tok.encode(
        "copy: a b\na b\n\nreverse: c d\nd c\n\ncopy: e f"
    )
    assert few_shot_prompt(tok, [], "copy: e f", chat=False) == tok.encode("copy: e f")  # = train.data's prompt


# ---- the real LLM loop ----------------------------------------------------------------------------------
FORMAT_RE = {"hash": r"#[^#]+#", "bracket": r"\[[^\]]+\]", "curly": r"\{[^}]+\}"}


def format_metric(prediction: str, record: dict) -> float:
    return float(re.fullmatch(FORMAT_RE[record["format"]], prediction.strip()) is not None)


@pytest.mark.slow
def test_real_llm_loop_on_smollm2(smollm2, tmp_path):
    """SmolLM2 answers with the format of the exemplar it is shown; each query type needs one format and the pool
    mixes one exemplar per format with misleading ones (right topic, plain answer). The oracle is exhaustive: every
    (query, exemplar) pair's reward. After RL the matcher's pick earns the best reward for > 90% of the queries."""
    pool_rows = [
        {"prompt": "What is 2 plus 3?", "response": "#5#"},
        {"prompt": "What is 4 plus 4?", "response": "The answer is 8."},
        {"prompt": "What is the color of the sky?", "response": "[blue]"},
        {"prompt": "What color is snow?", "response": "Snow is white."},
        {"prompt": "Name a fruit.", "response": "{apple}"},
        {"prompt": "Name a vegetable.", "response": "A carrot."},
    ]
    pool = Pool("mem", pool_rows, "sha")
    kinds = [
        ("hash", ["What is 1 plus 6?", "What is 3 plus 3?", "What is 5 plus 2?", "What is 7 plus 1?"]),
        (
            "bracket",
            [
                "What is the color of grass?",
                "What color is coal?",
                "What color is a banana?",
                "What is the color of blood?",
            ],
        ),
        ("curly", ["Name an animal.", "Name a city.", "Name a flower.", "Name a tree."]),
    ]
    queries = [{"prompt": q, "response": "", "format": f} for f, qs in kinds for q in qs]
    pool_emb = cached_embeddings(smollm2, pool.texts, tmp_path, kind="pool")
    q_emb = cached_embeddings(smollm2, [q["prompt"] for q in queries], tmp_path, kind="queries")
    answerer = pillow.LLMAnswerer(smollm2, chat=True, max_new_tokens=10, max_batch=12)
    reward = Rewarder(queries, pool, answerer, format_metric)
    everything = torch.tensor([[j] for _ in queries for j in range(len(pool))])
    table = reward([i for i in range(len(queries)) for _ in pool_rows], everything).view(len(queries), len(pool))
    useful = table.max(1).values > 0
    assert useful.float().mean() >= 0.75  # the model does copy formats
    torch.manual_seed(0)
    m = Matcher(smollm2.args.dim, hidden=64, k=16)
    m.fit_normalization(pool_emb)
    calls = answerer.calls
    train_matcher(m, pool_emb, q_emb, reward, RLConfig(shots=1, steps=150, batch_size=12, seed=0))
    assert answerer.calls == calls  # every pair was already answered: the cache served the whole loop
    with torch.no_grad():
        picks = m.rollout(q_emb, pool_emb, 1, greedy=True).choices[:, 0]
    got = table[torch.arange(len(queries)), picks]
    assert (got[useful] == table.max(1).values[useful]).float().mean() > 0.9


def test_oracle_picks_exemplars_of_the_querys_kind():
    """The evaluation's upper bound on a task with kinds (train/tasks/formats.py): m allowed exemplars of the
    query's own kind; none when a record has no kind or a kind has too few exemplars."""
    from infer.pillow import Pool
    from train.pillow.evaluate import oracle_choices

    pool = Pool("p", [{"prompt": f"p{i}", "response": "r", "kind": k} for i, k in enumerate("abab")], "")
    queries = [{"prompt": "q0", "response": "r", "kind": "b"}, {"prompt": "q1", "response": "r", "kind": "a"}]
    assert oracle_choices(queries, pool, 2, None).tolist() == [[1, 3], [0, 2]]
    banned = torch.zeros(2, 4, dtype=torch.bool)
    banned[0, 1] = True  # e.g. the query is that exemplar
    assert oracle_choices(queries, pool, 1, banned).tolist() == [[3], [0]]
    assert oracle_choices(queries, pool, 2, banned) is None  # kind b has one allowed exemplar left
    assert oracle_choices([{"prompt": "q", "response": "r"}], pool, 1, None) is None
