"""Tokenizers: Llama 1/2 sentencepiece and Llama 3 tiktoken `tokenizer.model` files, HF `tokenizer.json`
directories and tokenizers rebuilt from GGUF metadata, all behind one small `Tokenizer` interface."""

from __future__ import annotations

import abc
import base64
import binascii
import functools
import itertools
import json
import os
import re
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

from weights.io import atomic_write

if TYPE_CHECKING:
    import tokenizers

# End-of-turn tokens of common chat formats; any of these in a vocab also stops generation.
END_OF_TURN_TOKENS = tuple(
    "<|eot_id|> <|eom_id|> <|im_end|> <|end_of_text|> <|endoftext|> <end_of_turn> <|end|>".split()
)

LLAMA3_PATTERN = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}"
    r"| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"
)
# Meta's Llama 3 special tokens, appended after the mergeable ranks in this order (256 in all).
LLAMA3_SPECIAL_TOKENS = (
    ["<|begin_of_text|>", "<|end_of_text|>"]
    + [f"<|reserved_special_token_{i}|>" for i in range(4)]
    + ["<|start_header_id|>", "<|end_header_id|>", "<|reserved_special_token_4|>", "<|eot_id|>"]
    + [f"<|reserved_special_token_{i}|>" for i in range(5, 251)]
)
LLAMA3_CHAT_TEMPLATE = (
    "{{ bos_token }}{% for message in messages %}"
    "{{ '<|start_header_id|>' + message['role'] + '<|end_header_id|>\\n\\n' + message['content'] | trim"
    " + '<|eot_id|>' }}{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|start_header_id|>assistant<|end_header_id|>\\n\\n' }}{% endif %}"
)
# Meta's limits: tiktoken is quadratic on very long pieces, so long runs are cut before encoding.
TIKTOKEN_MAX_ENCODE_CHARS = 400_000
MAX_NO_WHITESPACES_CHARS = 25_000

_TIKTOKEN_LINE = re.compile(rb"[A-Za-z0-9+/]+={0,2} \d+\r?\n?")
# Pre-tokenizer style for each byte-level `tokenizer.ggml.pre` we support (None: the key is absent).
_GGUF_PRE = {"smollm": "smollm", **dict.fromkeys(("llama-bpe", "llama3", "llama-v3"), "llama3")}
_GGUF_PRE.update(dict.fromkeys(("gpt2", "default", None), "gpt2"))


class Tokenizer(abc.ABC):
    """Common interface: ids <-> text, bos/eos/stop ids and the chat template."""

    bos_id: int | None = None
    eos_id: int | None = None
    stop_ids: frozenset[int] = frozenset()
    vocab_size: int = 0
    add_bos: bool = False
    chat_template: str | None = None

    def encode(self, text: str, bos: bool | None = None, eos: bool = False) -> list[int]:
        """Token ids of `text`; special tokens written in it become their ids. `bos=None` uses `add_bos`."""
        ids = self._encode_text(text)
        if self.add_bos if bos is None else bos:
            if self.bos_id is None:
                raise ValueError(f"{type(self).__name__}: bos requested but the vocab has no BOS token")
            ids.insert(0, self.bos_id)
        if eos:
            if self.eos_id is None:
                raise ValueError(f"{type(self).__name__}: eos requested but the vocab has no EOS token")
            ids.append(self.eos_id)
        return ids

    @abc.abstractmethod
    def _encode_text(self, text: str) -> list[int]: ...

    @abc.abstractmethod
    def decode(self, ids: Sequence[int]) -> str:
        """Text of `ids`, special tokens included as their text."""

    def apply_chat_template(self, messages: list[dict[str, str]], add_generation_prompt: bool = True) -> str:
        """Render `messages` with the chat template the way transformers does."""
        if self.chat_template is None:
            raise ValueError(
                f"{type(self).__name__}: no chat template (its source defines none); format the prompt yourself"
            )
        special = {"bos_token": self._piece(self.bos_id), "eos_token": self._piece(self.eos_id)}
        return _compile_template(self.chat_template).render(
            messages=messages, add_generation_prompt=add_generation_prompt, **special
        )

    def encode_chat(self, messages: list[dict[str, str]], add_generation_prompt: bool = True) -> list[int]:
        """Ids of the rendered chat; no second BOS when the template already wrote one (Llama 3)."""
        text = self.apply_chat_template(messages, add_generation_prompt)
        bos_text = self._piece(self.bos_id)
        return self.encode(text, bos=False if bos_text and text.startswith(bos_text) else None)

    def _piece(self, token_id: int | None) -> str:
        return "" if token_id is None else self.decode([token_id])


@functools.lru_cache(maxsize=8)
def _compile_template(source: str) -> Any:
    # Same environment as transformers' chat templates so Hub templates render identically.
    import jinja2
    import jinja2.ext
    from jinja2.sandbox import ImmutableSandboxedEnvironment

    def raise_exception(message: str) -> None:
        raise jinja2.exceptions.TemplateError(message)

    def tojson(
        x: Any, ensure_ascii: bool = False, indent: int | None = None, separators: Any = None, sort_keys: bool = False
    ) -> str:
        return json.dumps(x, ensure_ascii=ensure_ascii, indent=indent, separators=separators, sort_keys=sort_keys)

    def strftime_now(fmt: str) -> str:
        from datetime import datetime

        return datetime.now().strftime(fmt)

    env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True, extensions=[jinja2.ext.loopcontrols])
    env.filters["tojson"] = tojson
    env.globals.update(raise_exception=raise_exception, strftime_now=strftime_now)
    return env.from_string(source)


def _stop_set(eos_id: int | None, extra: Iterable[int], lookup: Any) -> frozenset[int]:
    """eos + `extra` + the end-of-turn tokens `lookup(text) -> id | None` finds in the vocab."""
    ids = {i for i in (eos_id, *extra) if i is not None}
    ids.update(i for i in map(lookup, END_OF_TURN_TOKENS) if i is not None)
    return frozenset(ids)


def _decode_segments(ids: Sequence[int], special: dict[int, str], decode_run: Any) -> str:
    """Decode runs of ordinary ids separately, special ids as their text. Sentencepiece-style vocabs give each
    run between specials its own dummy-prefix space when encoding; decoding per run strips exactly that."""
    groups = itertools.groupby(ids, key=lambda i: i in special)
    return "".join("".join(special[i] for i in g) if is_special else decode_run(list(g)) for is_special, g in groups)


class SentencePieceTokenizer(Tokenizer):
    """Llama 1/2 sentencepiece `tokenizer.model`. Encoding is Meta's `sp.encode`, except that control tokens
    (and `<unk>`) written in the text become their ids, each text piece between them encoded on its own
    (as HF's legacy Llama tokenizer and llama.cpp do)."""

    def __init__(self, path: str | os.PathLike[str]) -> None:
        import sentencepiece

        self.path = str(path)
        try:
            self.sp = sentencepiece.SentencePieceProcessor(model_file=self.path)
        except (OSError, RuntimeError) as e:
            raise ValueError(f"{self.path}: not a sentencepiece model ({str(e).splitlines()[0]})") from None
        n = self.sp.vocab_size()
        self.vocab_size = n
        self.bos_id = self.sp.bos_id() if self.sp.bos_id() >= 0 else None
        self.eos_id = self.sp.eos_id() if self.sp.eos_id() >= 0 else None
        self.add_bos = True
        self.chat_template = None
        # Control pieces and <unk> are HF's added tokens for Llama, matched in text; longest first.
        self._special = {i: self.sp.id_to_piece(i) for i in range(n) if self.sp.is_control(i) or self.sp.is_unknown(i)}
        self._special_by_text = {p: i for i, p in self._special.items() if p}
        alternatives = "|".join(map(re.escape, sorted(self._special_by_text, key=len, reverse=True)))
        self._special_re = re.compile(f"({alternatives})") if alternatives else None
        self.stop_ids = _stop_set(self.eos_id, (), lambda t: self._piece_id(t))

    def _piece_id(self, piece: str) -> int | None:
        i = self.sp.piece_to_id(piece)
        return i if self.sp.id_to_piece(i) == piece else None

    def _encode_text(self, text: str) -> list[int]:
        if self._special_re is None or not self._special_re.search(text):
            return self.sp.encode(text)
        ids: list[int] = []
        for k, part in enumerate(self._special_re.split(text)):  # text, special, text, ...
            if k % 2:
                ids.append(self._special_by_text[part])
            elif part:
                ids += self.sp.encode(part)
        return ids

    def decode(self, ids: Sequence[int]) -> str:
        return _decode_segments(ids, self._special, lambda run: self.sp.decode(run))


def _read_tiktoken_ranks(path: str) -> dict[bytes, int]:
    """Mergeable ranks of a tiktoken file (`base64token rank` lines); ranks must be 0..n-1."""
    ranks: dict[bytes, int] = {}
    with open(path, "rb") as f:
        for lineno, line in enumerate(f, 1):
            if not line.strip():
                continue
            parts = line.split()
            try:
                if len(parts) != 2:
                    raise ValueError
                ranks[base64.b64decode(parts[0], validate=True)] = int(parts[1])
            except (ValueError, binascii.Error):
                raise ValueError(f"{path}:{lineno}: not a tiktoken line (expected 'base64token rank')") from None
    if sorted(ranks.values()) != list(range(len(ranks))):
        raise ValueError(f"{path}: tiktoken ranks are not 0..{len(ranks) - 1} without gaps or duplicates")
    return ranks


def _split_long_runs(s: str, max_run: int) -> list[str]:
    """Meta's `_split_whitespaces_or_nonwhitespaces`: cut every run of whitespace or of non-whitespace after
    each `max_run` chars. The regex finds only runs longer than `max_run`, so ordinary text costs one scan."""
    if len(s) <= max_run:
        return [s]
    cuts: list[int] = []
    n = max_run + 1
    for m in re.finditer(rf"(?<!\s)\s{{{n},}}|(?<!\S)\S{{{n},}}", s):
        cuts.extend(range(m.start() + max_run, m.end(), max_run))
    bounds = [0, *cuts, len(s)]
    return [s[a:b] for a, b in zip(bounds, bounds[1:], strict=False)]


class TiktokenTokenizer(Tokenizer):
    """Llama 3 tiktoken `tokenizer.model`, with Meta's special tokens, split pattern and chat format."""

    def __init__(self, path: str | os.PathLike[str]) -> None:
        import tiktoken

        self.path = str(path)
        try:
            ranks = _read_tiktoken_ranks(self.path)
        except OSError as e:
            raise ValueError(f"{self.path}: cannot read tokenizer model ({e.strerror})") from None
        n = len(ranks)
        special = {t: n + i for i, t in enumerate(LLAMA3_SPECIAL_TOKENS)}
        self.model = tiktoken.Encoding(
            name=Path(self.path).name, pat_str=LLAMA3_PATTERN, mergeable_ranks=ranks, special_tokens=special
        )
        self.vocab_size = n + len(special)
        self.bos_id = special["<|begin_of_text|>"]
        self.eos_id = special["<|end_of_text|>"]
        self.add_bos = True
        self.chat_template = LLAMA3_CHAT_TEMPLATE
        # n+8 is <|eom_id|> in Llama 3.1 (same ranks, renamed reserved tokens); Llama 3 never emits it.
        self.stop_ids = frozenset({self.eos_id, special["<|eot_id|>"], n + 8})

    def _encode_text(self, text: str) -> list[int]:
        ids: list[int] = []
        for i in range(0, len(text), TIKTOKEN_MAX_ENCODE_CHARS):
            for piece in _split_long_runs(text[i : i + TIKTOKEN_MAX_ENCODE_CHARS], MAX_NO_WHITESPACES_CHARS):
                ids += self.model.encode(piece, allowed_special="all")
        return ids

    def decode(self, ids: Sequence[int]) -> str:
        return self.model.decode(list(ids))  # invalid UTF-8 -> U+FFFD


def load_tokenizer_model(path: str | os.PathLike[str]) -> Tokenizer:
    """Load a `tokenizer.model`, telling tiktoken (text lines) from sentencepiece (protobuf) by content."""
    try:
        with open(path, "rb") as f:
            first = f.readline(4096)
    except OSError as e:
        raise ValueError(f"{path}: cannot read tokenizer model ({e.strerror})") from None
    if _TIKTOKEN_LINE.fullmatch(first):
        return TiktokenTokenizer(path)
    try:
        return SentencePieceTokenizer(path)
    except ValueError:
        raise ValueError(f"{path}: not a sentencepiece or tiktoken tokenizer model") from None


def _read_json(path: Path) -> dict[str, Any]:
    if not path.is_file():
        return {}
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as e:
        raise ValueError(f"{path}: unreadable JSON ({str(e).splitlines()[0]})") from None
    if not isinstance(data, dict):
        raise ValueError(f"{path}: expected a JSON object")
    return data


def _id_list(value: Any) -> list[int]:
    """Config token ids are an int, a list of ints or absent."""
    if isinstance(value, int):
        return [value]
    return [v for v in value if isinstance(v, int)] if isinstance(value, list) else []


def _spm_merges(tokens: list[str], scores: list[float], types: list[int] | None) -> list[tuple[str, str]]:
    """BPE merges implied by a sentencepiece BPE vocab: every split of each normal piece into two vocab pieces,
    ranked by the piece's score (sentencepiece merges the highest-scoring pair first)."""
    vocab = {t: i for i, t in enumerate(tokens)}
    ranked = []
    for i, piece in enumerate(tokens):
        if types is not None and types[i] != 1:
            continue
        for k in range(1, len(piece)):
            left, right = piece[:k], piece[k:]
            if left in vocab and right in vocab:
                ranked.append((-scores[i], vocab[left], vocab[right], left, right))
    ranked.sort()
    return [(r[3], r[4]) for r in ranked]


class HFTokenizer(Tokenizer):
    """A `tokenizers.Tokenizer` plus the bos/eos/stop ids, add_bos and chat template it lacks."""

    def __init__(
        self,
        tokenizer: tokenizers.Tokenizer,
        *,
        bos_id: int | None,
        eos_id: int | None,
        add_bos: bool = False,
        chat_template: str | None = None,
        stop_ids: Iterable[int] = (),
        segment_prefix: bool = False,
    ) -> None:
        """`segment_prefix`: the vocab is sentencepiece-style and each text piece between special tokens got its
        own prefix space, so decode strips it per piece."""
        self.tokenizer = tokenizer
        self.bos_id, self.eos_id, self.add_bos, self.chat_template = bos_id, eos_id, add_bos, chat_template
        self.vocab_size = tokenizer.get_vocab_size(with_added_tokens=True)
        self.stop_ids = _stop_set(eos_id, stop_ids, tokenizer.token_to_id)
        self.segment_prefix = segment_prefix
        self._special = (
            {i: t.content for i, t in tokenizer.get_added_tokens_decoder().items()} if segment_prefix else {}
        )

    def _encode_text(self, text: str) -> list[int]:
        return self.tokenizer.encode(text, add_special_tokens=False).ids

    def decode(self, ids: Sequence[int]) -> str:
        if self.segment_prefix:
            return _decode_segments(ids, self._special, lambda run: self.tokenizer.decode(run, False))
        return self.tokenizer.decode(list(ids), skip_special_tokens=False)

    @classmethod
    def from_dir(cls, directory: str | os.PathLike[str]) -> Tokenizer:
        """Tokenizer of an HF model directory (`tokenizer.json` + configs, else `tokenizer.model`)."""
        import tokenizers

        d = Path(directory)
        cfg = _read_json(d / "tokenizer_config.json")
        template = cfg.get("chat_template")
        if isinstance(template, list):  # [{"name": ..., "template": ...}]: transformers uses "default"
            template = next((t.get("template") for t in template if t.get("name") == "default"), None)
        if template is None and (d / "chat_template.jinja").is_file():
            template = (d / "chat_template.jinja").read_text(encoding="utf-8")
        if template is None:
            template = _read_json(d / "chat_template.json").get("chat_template")
        if not (d / "tokenizer.json").is_file():
            if (d / "tokenizer.model").is_file():
                tok = load_tokenizer_model(d / "tokenizer.model")
                tok.chat_template = template or tok.chat_template
                return tok
            raise ValueError(f"{d}: no tokenizer.json or tokenizer.model")
        try:
            tok = tokenizers.Tokenizer.from_file(str(d / "tokenizer.json"))
        except Exception as e:  # tokenizers raises a bare Exception on bad JSON
            raise ValueError(f"{d / 'tokenizer.json'}: cannot load ({str(e).splitlines()[0]})") from None
        model_cfg = _read_json(d / "config.json")

        def token_id(key: str) -> int | None:
            value = cfg.get(key)
            if isinstance(value, dict):  # serialized AddedToken
                value = value.get("content")
            found = tok.token_to_id(value) if isinstance(value, str) else None
            return found if found is not None else (_id_list(model_cfg.get(f"{key}_id")) or [None])[0]

        bos_id, eos_id = token_id("bos_token"), token_id("eos_token")
        add_bos = cfg.get("add_bos_token")
        if add_bos is None:  # no flag: trust tokenizer.json's post-processor
            with_special = tok.encode("a", add_special_tokens=True).ids
            plain = tok.encode("a", add_special_tokens=False).ids
            add_bos = bos_id is not None and with_special[:1] == [bos_id] != plain[:1]
        stops = _id_list(model_cfg.get("eos_token_id")) + _id_list(
            _read_json(d / "generation_config.json").get("eos_token_id")
        )
        return cls(tok, bos_id=bos_id, eos_id=eos_id, add_bos=bool(add_bos), chat_template=template, stop_ids=stops)

    @classmethod
    def from_gguf_metadata(cls, meta: dict[str, Any]) -> HFTokenizer:
        """Rebuild the tokenizer a GGUF file describes (byte-level BPE "gpt2", or sentencepiece "llama")."""
        from tokenizers import AddedToken, Regex, decoders, models, normalizers, pre_tokenizers
        from tokenizers import Tokenizer as RawTokenizer

        kind = meta.get("tokenizer.ggml.model")
        if kind not in ("gpt2", "llama"):
            raise ValueError(f"tokenizer.ggml.model: unsupported tokenizer model {kind!r} (supported: gpt2, llama)")
        tokens = meta.get("tokenizer.ggml.tokens")
        if not tokens or not all(isinstance(t, str) for t in tokens):
            raise ValueError("tokenizer.ggml.tokens: missing, empty or not a list of strings")
        types = meta.get("tokenizer.ggml.token_type")
        if types is not None and len(types) != len(tokens):
            raise ValueError(f"tokenizer.ggml.token_type: {len(types)} entries for {len(tokens)} tokens")
        merges = []
        for i, m in enumerate(meta.get("tokenizer.ggml.merges") or ()):
            pair = m.split(" ")
            if len(pair) != 2:
                raise ValueError(f"tokenizer.ggml.merges[{i}]: malformed merge {m!r}")
            merges.append((pair[0], pair[1]))
        vocab = {t: i for i, t in enumerate(tokens)}
        special_types = (2, 3, 4) if kind == "llama" else (3, 4)  # unknown/control/user-defined
        added = [
            AddedToken(t, special=True, normalized=False)
            for t, ty in zip(tokens, types or (), strict=False)
            if ty in special_types
        ]

        if kind == "gpt2":
            pre = meta.get("tokenizer.ggml.pre")
            if pre not in _GGUF_PRE:
                raise ValueError(
                    f"tokenizer.ggml.pre: unsupported pre-tokenizer {pre!r} "
                    f"(supported: {', '.join(sorted(p for p in _GGUF_PRE if p))})"
                )
            style = _GGUF_PRE[pre]
            # tiktoken-derived vocabs (Llama 3) take a whole piece that is in the vocab as one token.
            tok = RawTokenizer(models.BPE(vocab, merges, ignore_merges=style == "llama3"))
            byte_level = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=style != "llama3")
            first = {  # smollm as llama.cpp: each digit split off, then the GPT-2 regex (= HF SmolLM2's tokenizer)
                "smollm": [pre_tokenizers.Digits(individual_digits=True)],
                "llama3": [pre_tokenizers.Split(Regex(LLAMA3_PATTERN), behavior="isolated")],
            }.get(style, [])
            tok.pre_tokenizer = pre_tokenizers.Sequence([*first, byte_level])
            tok.decoder = decoders.ByteLevel()
            prefix, default_add_bos = False, False
        else:
            scores = meta.get("tokenizer.ggml.scores")
            if not merges and (scores is None or len(scores) != len(tokens)):
                raise ValueError("tokenizer.ggml.scores: needed (one per token) when the GGUF has no merges")
            unk = meta.get("tokenizer.ggml.unknown_token_id")
            unk_token = tokens[unk] if unk is not None else None
            merges = merges or _spm_merges(tokens, scores, types)
            tok = RawTokenizer(models.BPE(vocab, merges, unk_token=unk_token, fuse_unk=True, byte_fallback=True))
            # Like llama.cpp, prefix a space at the start and after every special token. A normalizer, not
            # Metaspace, which would not prefix text that already starts with a space (" x" -> "▁▁x").
            prefix = bool(meta.get("tokenizer.ggml.add_space_prefix", True))
            tok.normalizer = normalizers.Sequence(
                [normalizers.Prepend("\u2581")] * prefix + [normalizers.Replace(" ", "\u2581")]
            )
            tok.decoder = decoders.Sequence(
                [decoders.Replace("\u2581", " "), decoders.ByteFallback(), decoders.Fuse()]
                + ([decoders.Strip(" ", 1, 0)] if prefix else [])
            )
            default_add_bos = True  # llama.cpp's default for sentencepiece vocabs
        tok.add_special_tokens(added)
        stops = [meta[k] for k in ("tokenizer.ggml.eot_token_id", "tokenizer.ggml.eom_token_id") if k in meta]
        return cls(
            tok,
            bos_id=meta.get("tokenizer.ggml.bos_token_id"),
            eos_id=meta.get("tokenizer.ggml.eos_token_id"),
            add_bos=bool(meta.get("tokenizer.ggml.add_bos_token", default_add_bos)),
            chat_template=meta.get("tokenizer.chat_template"),
            stop_ids=stops,
            segment_prefix=prefix,
        )

    def save(self, directory: str | os.PathLike[str]) -> None:
        """Write `tokenizer.json` + `parallama_tokenizer.json` (each atomically) for `load_saved`."""
        d = Path(directory)
        d.mkdir(parents=True, exist_ok=True)
        atomic_write(d / "tokenizer.json", self.tokenizer.to_str())
        extra = {
            "bos_id": self.bos_id,
            "eos_id": self.eos_id,
            "add_bos": self.add_bos,
            "stop_ids": sorted(self.stop_ids),
            "chat_template": self.chat_template,
            "segment_prefix": self.segment_prefix,
        }
        atomic_write(d / "parallama_tokenizer.json", json.dumps(extra, ensure_ascii=False, indent=1))

    @classmethod
    def load_saved(cls, directory: str | os.PathLike[str]) -> HFTokenizer:
        """Load what `save` wrote (fast: no merge rebuilding)."""
        import tokenizers

        d = Path(directory)
        extra_path = d / "parallama_tokenizer.json"
        if not extra_path.is_file():
            raise ValueError(f"{extra_path}: missing (not a saved parallama tokenizer)")
        extra = _read_json(extra_path)
        try:
            fields = {k: extra[k] for k in ("bos_id", "eos_id", "add_bos", "chat_template", "stop_ids")}
            tok = tokenizers.Tokenizer.from_file(str(d / "tokenizer.json"))
            return cls(tok, segment_prefix=extra.get("segment_prefix", False), **fields)
        except KeyError as e:
            raise ValueError(f"{extra_path}: missing field {e.args[0]!r}") from None
        except Exception as e:  # tokenizers raises a bare Exception on a missing or bad file
            raise ValueError(f"{d / 'tokenizer.json'}: cannot load ({str(e).splitlines()[0]})") from None
