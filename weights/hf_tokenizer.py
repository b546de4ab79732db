"""HF tokenizers: a `tokenizer.json` directory, or a tokenizer rebuilt from GGUF metadata (BPE merges included),
behind `weights.tokenizer.Tokenizer`."""

from __future__ import annotations

import json
import os
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

from weights.io import atomic_write, read_json
from weights.tokenizer import (
    LLAMA3_PATTERN,
    Tokenizer,
    decode_segments,
    load_tokenizer_model,
    stop_set,
)

if TYPE_CHECKING:
    import tokenizers

GGUF_PRE = {"smollm": "smollm", **dict.fromkeys(("llama-bpe", "llama3", "llama-v3"), "llama3")}
GGUF_PRE.update(dict.fromkeys(("gpt2", "default", None), "gpt2"))


def _read_json(path: Path) -> dict[str, Any]:
    """A config file's object, {} when the file is absent."""
    return read_json(path) if path.is_file() else {}


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
        self.stop_ids = stop_set(eos_id, stop_ids, tokenizer.token_to_id)
        self.segment_prefix = segment_prefix
        self._special = (
            {i: t.content for i, t in tokenizer.get_added_tokens_decoder().items()} if segment_prefix else {}
        )

    def _encode_text(self, text: str) -> list[int]:
        return self.tokenizer.encode(text, add_special_tokens=False).ids

    def decode(self, ids: Sequence[int]) -> str:
        if self.segment_prefix:
            return decode_segments(ids, self._special, lambda run: self.tokenizer.decode(run, False))
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
            if pre not in GGUF_PRE:
                raise ValueError(
                    f"tokenizer.ggml.pre: unsupported pre-tokenizer {pre!r} "
                    f"(supported: {', '.join(sorted(p for p in GGUF_PRE if p))})"
                )
            style = GGUF_PRE[pre]
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
