"""OpenAI's wire format: the request bodies (pydantic), the response and stream-chunk objects, the error shape.

Requests follow OpenAI's parameter names and defaults (temperature 1, completions max_tokens 16); parallama
adds `top_k`, `beams`, `ignore_eos` and `return_token_ids` (each choice and chunk then carries `token_ids`,
as vLLM's extension does). Fields OpenAI has and this server cannot honour (n > 1, logprobs, penalties, ...)
are refused with a 400 rather than ignored; unknown fields are ignored, as OpenAI's own clients send a few.
"""

from __future__ import annotations

import time
import uuid
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field

from infer.sampling import SamplingParams

# OpenAI's error "type" per status: clients switch on status and read message / code
ERROR_TYPES = {400: "invalid_request_error", 401: "invalid_request_error", 404: "invalid_request_error"}
ERROR_TYPES.update({409: "invalid_request_error", 422: "invalid_request_error", 503: "server_error"})


class ServeError(Exception):
    """An error answered in OpenAI's JSON shape with this status (and headers, e.g. Retry-After)."""

    def __init__(
        self,
        status: int,
        message: str,
        *,
        param: str | None = None,
        code: str | None = None,
        headers: dict[str, str] | None = None,
    ) -> None:
        super().__init__(message)
        self.status, self.message, self.param, self.code = status, message, param, code
        self.headers = headers or {}

    def body(self) -> dict[str, Any]:
        return error_body(self.status, self.message, self.param, self.code)


def error_body(status: int, message: str, param: str | None = None, code: str | None = None) -> dict[str, Any]:
    kind = ERROR_TYPES.get(status, "server_error" if status >= 500 else "invalid_request_error")
    return {"error": {"message": message, "type": kind, "param": param, "code": code}}


class StreamOptions(BaseModel):
    include_usage: bool = False


class _Sampling(BaseModel):
    """What completions and chat share."""

    model_config = ConfigDict(extra="ignore")

    model: str
    temperature: float | None = Field(None, ge=0, le=2)
    top_p: float | None = Field(None, gt=0, le=1)
    n: int | None = 1
    seed: int | None = None
    stop: str | list[str] | None = None
    stream: bool = False
    stream_options: StreamOptions | None = None
    presence_penalty: float | None = 0
    frequency_penalty: float | None = 0
    logit_bias: dict[str, float] | None = None
    # parallama extras
    top_k: int = Field(0, ge=0)
    beams: int = Field(1, ge=1)
    ignore_eos: bool = False
    return_token_ids: bool = False

    def unsupported(self) -> list[tuple[str, bool]]:
        return [
            ("n", (self.n or 1) != 1),
            ("presence_penalty", bool(self.presence_penalty)),
            ("frequency_penalty", bool(self.frequency_penalty)),
            ("logit_bias", bool(self.logit_bias)),
        ]

    def sampling_params(self, max_tokens: int) -> SamplingParams:
        """The engine's parameters; ServeError(400) naming the first parameter this server refuses."""
        for name, refused in self.unsupported():
            if refused:
                what = "n > 1 is" if name == "n" else f"{name} is"
                raise ServeError(400, f"{what} not supported by this server", param=name, code="unsupported_parameter")
        if self.stream_options is not None and not self.stream:
            raise ServeError(400, "stream_options is only allowed with stream: true", param="stream_options")
        stop = [self.stop] if isinstance(self.stop, str) else list(self.stop or [])
        try:
            return SamplingParams(
                max_new_tokens=max_tokens,
                temperature=1.0 if self.temperature is None else self.temperature,
                top_p=1.0 if self.top_p is None else self.top_p,
                top_k=self.top_k,
                seed=self.seed,
                stop=tuple(stop),
                beams=self.beams,
                ignore_eos=self.ignore_eos,
            )
        except ValueError as e:
            raise ServeError(400, str(e).removeprefix("SamplingParams: ")) from None

    @property
    def include_usage(self) -> bool:
        return bool(self.stream_options and self.stream_options.include_usage)


class CompletionRequest(_Sampling):
    prompt: str | list[str] | list[int] | list[list[int]]
    max_tokens: int | None = Field(16, ge=1)
    logprobs: int | None = None
    echo: bool = False
    best_of: int | None = None
    suffix: str | None = None

    def unsupported(self) -> list[tuple[str, bool]]:
        return super().unsupported() + [
            ("logprobs", self.logprobs is not None),
            ("echo", self.echo),
            ("best_of", (self.best_of or 1) != 1),
            ("suffix", bool(self.suffix)),
        ]

    def one_prompt(self) -> str | list[int]:
        """The prompt as text or token ids; several prompts in one request are refused (as n > 1)."""
        p = self.prompt
        if isinstance(p, list) and p and isinstance(p[0], (str, list)):
            if len(p) != 1:
                raise ServeError(400, "one prompt per request is supported (got a list of prompts)", param="prompt")
            p = p[0]
        return p


class ContentPart(BaseModel):
    model_config = ConfigDict(extra="ignore")
    type: Literal["text"]
    text: str


class ChatMessage(BaseModel):
    model_config = ConfigDict(extra="ignore")
    role: Literal["system", "developer", "user", "assistant"]
    content: str | list[ContentPart] | None = None

    def text(self) -> str:
        if isinstance(self.content, list):
            return "".join(p.text for p in self.content)
        return self.content or ""


class ChatRequest(_Sampling):
    messages: list[ChatMessage] = Field(min_length=1)
    max_tokens: int | None = Field(None, ge=1)
    max_completion_tokens: int | None = Field(None, ge=1)
    logprobs: bool | None = False
    tools: list[dict[str, Any]] | None = None
    response_format: dict[str, Any] | None = None

    def unsupported(self) -> list[tuple[str, bool]]:
        fmt = (self.response_format or {}).get("type", "text")
        return super().unsupported() + [
            ("logprobs", bool(self.logprobs)),
            ("tools", bool(self.tools)),
            ("response_format", fmt != "text"),
        ]

    def chat(self) -> list[dict[str, str]]:
        """Messages for the chat template ("developer" is OpenAI's new name for "system")."""
        return [{"role": "system" if m.role == "developer" else m.role, "content": m.text()} for m in self.messages]


class AdapterLoad(BaseModel):
    model_config = ConfigDict(extra="forbid")
    name: str = Field(min_length=1, max_length=200, pattern=r"^[A-Za-z0-9][A-Za-z0-9._:/-]*$")
    path: str = Field(min_length=1)


# ---- responses ------------------------------------------------------------------------------------------


def new_id(prefix: str) -> str:
    return f"{prefix}-{uuid.uuid4().hex}"


def usage(prompt_tokens: int, completion_tokens: int) -> dict[str, int]:
    return {
        "prompt_tokens": prompt_tokens,
        "completion_tokens": completion_tokens,
        "total_tokens": prompt_tokens + completion_tokens,
    }


def model_card(name: str, created: int, owner: str, parent: str | None = None) -> dict[str, Any]:
    card: dict[str, Any] = {"id": name, "object": "model", "created": created, "owned_by": owner}
    if parent is not None:
        card["parent"] = parent
    return card


class Reply:
    """The objects of one completion or chat reply, whole or as stream chunks (same id and created)."""

    def __init__(self, chat: bool, model: str, token_ids: bool) -> None:
        self.chat, self.model, self.token_ids = chat, model, token_ids
        self.id = new_id("chatcmpl" if chat else "cmpl")
        self.created = int(time.time())

    def _head(self, obj: str) -> dict[str, Any]:
        return {"id": self.id, "object": obj, "created": self.created, "model": self.model}

    def whole(self, text: str, ids: list[int], finish: str, use: dict[str, int]) -> dict[str, Any]:
        if self.chat:
            choice = {"index": 0, "message": {"role": "assistant", "content": text}, "logprobs": None}
        else:
            choice = {"index": 0, "text": text, "logprobs": None}
        choice["finish_reason"] = finish
        if self.token_ids:
            choice["token_ids"] = ids
        return {**self._head("chat.completion" if self.chat else "text_completion"), "choices": [choice], "usage": use}

    def chunk(
        self,
        text: str,
        ids: list[int],
        finish: str | None,
        *,
        first: bool = False,
        with_usage: bool = False,
    ) -> dict[str, Any]:
        """One stream chunk; `with_usage` adds "usage": null, as OpenAI does when the final chunk will carry it."""
        if self.chat:
            delta: dict[str, Any] = {"role": "assistant", "content": text} if first else {}
            if text and not first:
                delta["content"] = text
            choice = {"index": 0, "delta": delta, "logprobs": None, "finish_reason": finish}
        else:
            choice = {"index": 0, "text": text, "logprobs": None, "finish_reason": finish}
        if self.token_ids:
            choice["token_ids"] = ids
        out = {**self._head("chat.completion.chunk" if self.chat else "text_completion"), "choices": [choice]}
        if with_usage:
            out["usage"] = None
        return out

    def usage_chunk(self, use: dict[str, int]) -> dict[str, Any]:
        """The last chunk under stream_options.include_usage: no choices, the request's usage."""
        return {**self._head("chat.completion.chunk" if self.chat else "text_completion"), "choices": [], "usage": use}
