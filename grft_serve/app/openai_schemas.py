"""The OpenAI-compatible generation contract: request models, response builders, the error shape.

What users of vLLM / LoRAX / Ray Serve LLM send, checked whole before anything runs:

- ``POST /v1/completions``: ``model``, ``prompt`` (a string, or a list of strings: one choice group
  each), ``max_tokens``, ``temperature``, ``top_p``, ``n``, ``stop`` (a string or up to 4), ``seed``,
  ``stream`` + ``stream_options.include_usage``;
- ``POST /v1/chat/completions``: the same with ``messages`` (``role`` system|user|assistant,
  ``content`` a string or a list of ``{"type": "text", "text"}`` parts) instead of ``prompt``, and
  ``max_completion_tokens`` as the newer name of ``max_tokens``;
- ``GET /v1/models``: the generation bases and every generation task (``parent`` = its base).

``model`` is a task id (the base model's own id means no task; ``base:task`` is accepted too).
Parameters the server does not implement are refused when set to anything but their neutral value
(``logprobs``, ``echo``, ``best_of`` ≠ n, penalties ≠ 0, ``logit_bias``, ``tools``, …) — never
silently ignored. Errors use OpenAI's shape ``{"error": {"message", "type", "param", "code"}}``
(:func:`openai_error_body`); a body that fails validation is 400 ``invalid_request_error``.
"""
from __future__ import annotations

import time
import uuid
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

from ..core.generation import CHAT_ROLES, MAX_STOP, MAX_STOP_CHARS

__all__ = ["ChatRequest", "CompletionRequest", "StreamOptions", "chat_chunk", "chat_response", "completion_chunk",
           "completion_response", "model_card", "new_id", "openai_error_body", "usage"]

_TYPES = {400: "invalid_request_error", 401: "authentication_error", 403: "permission_error",
          404: "not_found_error", 408: "timeout_error", 409: "conflict_error", 413: "invalid_request_error",
          415: "invalid_request_error", 422: "invalid_request_error", 429: "rate_limit_error",
          503: "server_error"}


def openai_error_body(status: int, code: str, message: str, param: str | None = None) -> dict:
    """OpenAI's error object for an HTTP ``status``."""
    return {"error": {"message": message, "type": _TYPES.get(status, "server_error" if status >= 500
                                                                else "invalid_request_error"),
                      "param": param, "code": code}}


class StreamOptions(BaseModel):
    model_config = ConfigDict(extra="forbid")

    include_usage: bool = False


class _Sampling(BaseModel):
    """Fields shared by both routes (OpenAI's names and ranges)."""

    model_config = ConfigDict(extra="forbid")

    model: str = Field(min_length=1, max_length=300)
    max_tokens: int | None = Field(None, ge=1)
    temperature: float | None = Field(None, ge=0.0, le=2.0, allow_inf_nan=False)
    top_p: float | None = Field(None, gt=0.0, le=1.0, allow_inf_nan=False)
    n: int = Field(1, ge=1)
    stop: str | list[str] | None = Field(None, validate_default=True)
    seed: int | None = Field(None, ge=-(2 ** 63), lt=2 ** 64)
    stream: bool = False
    stream_options: StreamOptions | None = None
    user: str | None = Field(None, max_length=256)
    # accepted only at their neutral values (the server implements none of them)
    presence_penalty: float | None = None
    frequency_penalty: float | None = None
    logprobs: Any = None
    top_logprobs: Any = None
    logit_bias: dict | None = None

    @field_validator("stop")
    @classmethod
    def _stop(cls, v: str | list[str] | None) -> list[str]:
        stops = [] if v is None else [v] if isinstance(v, str) else list(v)
        if len(stops) > MAX_STOP:
            raise ValueError(f"at most {MAX_STOP} stop sequences")
        for s in stops:
            if not s or len(s) > MAX_STOP_CHARS:
                raise ValueError(f"each stop sequence must have 1..{MAX_STOP_CHARS} characters")
        return stops

    @model_validator(mode="after")
    def _neutral(self):
        for name in ("presence_penalty", "frequency_penalty"):
            if getattr(self, name) not in (None, 0, 0.0):
                raise ValueError(f"{name} is not supported by this server (leave it unset or 0)")
        if self.logprobs not in (None, False, 0) or self.top_logprobs not in (None, 0):
            raise ValueError("logprobs are not supported by this server")
        if self.logit_bias:
            raise ValueError("logit_bias is not supported by this server")
        if self.stream_options is not None and not self.stream:
            raise ValueError("stream_options is only allowed with stream: true")
        return self

    @property
    def include_usage(self) -> bool:
        return bool(self.stream_options and self.stream_options.include_usage)


class CompletionRequest(_Sampling):
    prompt: str | list[str]
    echo: bool = False
    best_of: int | None = None
    suffix: str | None = None

    @field_validator("prompt")
    @classmethod
    def _prompt(cls, v: str | list[str]) -> str | list[str]:
        if isinstance(v, list) and not v:
            raise ValueError("prompt must be a string or a non-empty list of strings")
        return v

    @model_validator(mode="after")
    def _unsupported(self):
        if self.echo:
            raise ValueError("echo is not supported by this server")
        if self.best_of not in (None, self.n):
            raise ValueError("best_of must equal n (or be unset)")
        if self.suffix:
            raise ValueError("suffix is not supported by this server")
        return self

    @property
    def prompts(self) -> list[str]:
        return [self.prompt] if isinstance(self.prompt, str) else list(self.prompt)


class _TextPart(BaseModel):
    model_config = ConfigDict(extra="forbid")

    type: Literal["text"]
    text: str


class ChatMessage(BaseModel):
    model_config = ConfigDict(extra="forbid")

    role: Literal[CHAT_ROLES]  # type: ignore[valid-type]
    content: str | list[_TextPart]
    name: str | None = Field(None, max_length=64)

    def text(self) -> str:
        return self.content if isinstance(self.content, str) else "".join(p.text for p in self.content)


class ChatRequest(_Sampling):
    messages: list[ChatMessage] = Field(min_length=1)
    max_completion_tokens: int | None = Field(None, ge=1)
    tools: Any = None
    tool_choice: Any = None
    response_format: Any = None

    @model_validator(mode="after")
    def _unsupported(self):
        if self.tools or self.tool_choice not in (None, "none"):
            raise ValueError("tools are not supported by this server")
        if self.response_format not in (None, {"type": "text"}):
            raise ValueError("response_format other than text is not supported by this server")
        if self.max_tokens is not None and self.max_completion_tokens is not None \
                and self.max_tokens != self.max_completion_tokens:
            raise ValueError("max_tokens and max_completion_tokens disagree; send one of them")
        return self

    @property
    def token_budget(self) -> int | None:
        return self.max_completion_tokens if self.max_completion_tokens is not None else self.max_tokens

    def plain_messages(self) -> list[dict[str, str]]:
        return [{"role": m.role, "content": m.text()} for m in self.messages]


# ---------------------------------------------------------------------------------------------
# responses
# ---------------------------------------------------------------------------------------------
def new_id(prefix: str) -> str:
    return f"{prefix}-{uuid.uuid4().hex[:24]}"


def usage(prompt_tokens: int, completion_tokens: int) -> dict:
    return {"prompt_tokens": prompt_tokens, "completion_tokens": completion_tokens,
            "total_tokens": prompt_tokens + completion_tokens}


def model_card(model_id: str, created: float | None, root: str, parent: str | None, **extra: Any) -> dict:
    return {"id": model_id, "object": "model", "created": int(created or time.time()), "owned_by": "grft-serve",
            "root": root, "parent": parent, **extra}


def completion_response(rid: str, model: str, created: int, choices: list[dict], use: dict) -> dict:
    return {"id": rid, "object": "text_completion", "created": created, "model": model,
            "choices": [{"index": c["index"], "text": c["text"], "logprobs": None,
                         "finish_reason": c["finish_reason"]} for c in choices], "usage": use}


def completion_chunk(rid: str, model: str, created: int, index: int | None = None, text: str = "",
                     finish_reason: str | None = None, use: dict | None = None) -> dict:
    choices = [] if index is None else [{"index": index, "text": text, "logprobs": None,
                                         "finish_reason": finish_reason}]
    out = {"id": rid, "object": "text_completion", "created": created, "model": model, "choices": choices}
    if use is not None:
        out["usage"] = use
    return out


def chat_response(rid: str, model: str, created: int, choices: list[dict], use: dict) -> dict:
    return {"id": rid, "object": "chat.completion", "created": created, "model": model,
            "choices": [{"index": c["index"], "message": {"role": "assistant", "content": c["text"]},
                         "logprobs": None, "finish_reason": c["finish_reason"]} for c in choices], "usage": use}


def chat_chunk(rid: str, model: str, created: int, index: int | None = None, delta: dict | None = None,
               finish_reason: str | None = None, use: dict | None = None) -> dict:
    choices = [] if index is None else [{"index": index, "delta": delta or {}, "logprobs": None,
                                         "finish_reason": finish_reason}]
    out = {"id": rid, "object": "chat.completion.chunk", "created": created, "model": model, "choices": choices}
    if use is not None:
        out["usage"] = use
    return out
