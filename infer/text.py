"""Text out of token ids as they are generated: what a stream shows after each engine step.

Decoding a growing id list token by token is not decoding each token alone (a leading-space rule needs its
left neighbour; one UTF-8 character can span tokens), and a stop string is known only once it is complete.
"""

from __future__ import annotations

from typing import Any


class IncrementalDetokenizer:
    """Text deltas from a growing id list, O(1) ids decoded per token: decode a short window with a
    little left context and emit only what is new and complete (no trailing U+FFFD)."""

    def __init__(self, tokenizer: Any, skip: frozenset[int] = frozenset()) -> None:
        self.tok = tokenizer
        self.skip = skip
        self.ids: list[int] = []
        self.prefix = 0  # window start: context so a leading-space rule sees its left neighbour
        self.read = 0  # ids before this are already shown
        self.text = ""

    def add(self, tok: int) -> str:
        if tok in self.skip:
            return ""
        self.ids.append(tok)
        before = self.tok.decode(self.ids[self.prefix : self.read])
        now = self.tok.decode(self.ids[self.prefix :])
        if len(now) <= len(before) or now.endswith("\ufffd"):
            return ""
        piece = now[len(before) :]
        self.prefix, self.read = self.read, len(self.ids)
        self.text += piece
        return piece


class TextStream:
    """A request's new text since the last `poll`, for whoever streams it (Engine.stream_request, the
    server's engine thread): pieces never end inside a UTF-8 character, and text that could be the start
    of a stop string is held back until it is decided. Once the request finished, the rest of its final
    (authoritative) text; beams show text only then."""

    def __init__(self, req: Any, tokenizer: Any, stop_ids: frozenset[int]) -> None:
        """req: an engine `Request` (read only: finished, text, params, output_ids)."""
        self.req = req
        self.detok = IncrementalDetokenizer(tokenizer, stop_ids)
        self.hold = max((len(s) for s in req.params.stop), default=1) - 1
        self.consumed = self.emitted = 0

    def poll(self) -> str:
        req = self.req
        if req.finished:
            piece = req.text[self.emitted :]
            self.emitted = max(self.emitted, len(req.text))
            return piece
        if req.params.beams > 1 or self.detok.tok is None:  # no tokenizer: token ids only, no text
            return ""
        for tok in req.output_ids[self.consumed :]:
            self.detok.add(tok)
        self.consumed = len(req.output_ids)
        safe = len(self.detok.text) - self.hold
        if safe <= self.emitted:
            return ""
        piece = self.detok.text[self.emitted : safe]
        self.emitted = safe
        return piece
