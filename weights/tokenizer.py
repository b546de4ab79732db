"""Tokenizers: Llama 1/2 sentencepiece and Llama 3 tiktoken `tokenizer.model` files behind one small
`Tokenizer` interface (HF `tokenizer.json` directories and GGUF vocabularies: weights/hf_tokenizer.py)."""

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

if TYPE_CHECKING:
    pass

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


def stop_set(eos_id: int | None, extra: Iterable[int], lookup: Any) -> frozenset[int]:
    """eos + `extra` + the end-of-turn tokens `lookup(text) -> id | None` finds in the vocab."""
    ids = {i for i in (eos_id, *extra) if i is not None}
    ids.update(i for i in map(lookup, END_OF_TURN_TOKENS) if i is not None)
    return frozenset(ids)


def decode_segments(ids: Sequence[int], special: dict[int, str], decode_run: Any) -> str:
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
        self.stop_ids = stop_set(self.eos_id, (), lambda t: self._piece_id(t))

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
        return decode_segments(ids, self._special, lambda run: self.sp.decode(run))


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
