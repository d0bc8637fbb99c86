"""The generation contract of a task package (``kind: generation``): prompt rendering and defaults.

A generation task changes rows (or columns) of a causal LM's attention and MLP linears — never the
embeddings or the (tied) ``lm_head`` — and has no classifier head. Training and serving render text
with the SAME functions below, so a package answers identically through ``grft-train generate`` and
the HTTP API (a template mismatch between training and serving makes an adapter look ignored).

Two prompt formats, recorded in :class:`GenerationMeta`:

- ``completion``: the prompt text is ``prompt_template`` with its one ``{prompt}`` replaced by the
  caller's prompt (plain substitution, never ``str.format``), tokenized with ``add_special_tokens``
  as recorded. In training the completion's tokens follow, then the first EOS token id.
- ``chat``: ``messages`` rendered by ``chat_template`` (the package's; ``None``: the tokenizer's own)
  with ``add_generation_prompt=True``. In training the last message is the assistant's answer and
  its tokens are the rendered conversation minus the rendered prompt (which must be a prefix).

Either way the loss is taken on the response tokens only (prompt positions are labelled ``-100``).
A served request may use either route whatever the task was trained with: ``/v1/completions``
renders a prompt with :func:`prompt_ids`, ``/v1/chat/completions`` renders messages with
:func:`chat_ids`. Sampling defaults (``max_new_tokens``, ``temperature``, ``top_p``, ``stop``) are
the package's; a request overrides them.
"""
from __future__ import annotations

from typing import Any, Literal, Sequence

from pydantic import BaseModel, ConfigDict, Field, field_validator

__all__ = ["CHAT_ROLES", "GenerationMeta", "MAX_STOP", "MAX_STOP_CHARS", "MAX_TEMPLATE_CHARS", "PromptError",
           "chat_ids", "check_messages", "example_ids", "prompt_ids"]

MAX_TEMPLATE_CHARS = 32_768
MAX_STOP = 4
MAX_STOP_CHARS = 64
CHAT_ROLES = ("system", "user", "assistant")


class PromptError(ValueError):
    """A prompt, a conversation or a training example cannot be rendered (the message says why)."""


class GenerationMeta(BaseModel):
    """``generation`` metadata of a ``kind: generation`` package (and the base model's defaults)."""

    model_config = ConfigDict(extra="forbid")

    format: Literal["completion", "chat"] = "completion"
    prompt_template: str = Field("{prompt}", max_length=MAX_TEMPLATE_CHARS,
                                 description="completion format: text around the prompt; one '{prompt}'")
    add_special_tokens: bool = Field(False, description="completion format: the tokenizer's special tokens "
                                                        "(e.g. BOS) around the prompt")
    chat_template: str | None = Field(None, max_length=MAX_TEMPLATE_CHARS,
                                      description="chat format: the Jinja template used in training "
                                                  "(None: the tokenizer's own)")
    eos_token_ids: list[int] = Field([], max_length=8, description="token ids that end a completion")
    max_new_tokens: int = Field(128, ge=1, le=8192)
    temperature: float = Field(0.0, ge=0.0, le=2.0, allow_inf_nan=False)
    top_p: float = Field(1.0, gt=0.0, le=1.0, allow_inf_nan=False)
    stop: list[str] = Field([], max_length=MAX_STOP)

    @field_validator("prompt_template")
    @classmethod
    def _one_slot(cls, v: str) -> str:
        if v.count("{prompt}") != 1:
            raise ValueError("prompt_template must contain '{prompt}' exactly once")
        return v

    @field_validator("stop")
    @classmethod
    def _stops(cls, v: list[str]) -> list[str]:
        for s in v:
            if not s or len(s) > MAX_STOP_CHARS:
                raise ValueError(f"each stop string must have 1..{MAX_STOP_CHARS} characters")
        return v

    @field_validator("eos_token_ids")
    @classmethod
    def _eos(cls, v: list[int]) -> list[int]:
        if any(i < 0 for i in v):
            raise ValueError("eos_token_ids must be non-negative")
        return v

    def eos_ids(self, tokenizer: Any) -> list[int]:
        """The ids that end a completion: the package's, else the tokenizer's EOS."""
        if self.eos_token_ids:
            return list(self.eos_token_ids)
        eos = getattr(tokenizer, "eos_token_id", None)
        return [int(eos)] if eos is not None else []


def _ids(out: Any) -> list[int]:
    """Token ids from whatever a tokenizer call returned (a list, a BatchEncoding, a dict)."""
    if hasattr(out, "keys") and "input_ids" in out:
        out = out["input_ids"]
    return [int(t) for t in out]


def prompt_ids(meta: GenerationMeta, tokenizer: Any, prompt: str) -> list[int]:
    """Token ids of a completion-style ``prompt`` rendered with ``meta``'s template."""
    if not isinstance(prompt, str):
        raise PromptError(f"a prompt must be a string, got {type(prompt).__name__}")
    text = meta.prompt_template.replace("{prompt}", prompt)
    return _ids(tokenizer(text, add_special_tokens=meta.add_special_tokens)["input_ids"])


def check_messages(messages: Any, *, need_answer: bool = False) -> list[dict[str, str]]:
    """``messages`` as a list of ``{"role", "content"}`` with string contents and known roles."""
    if not isinstance(messages, list) or not messages:
        raise PromptError("messages must be a non-empty list")
    out = []
    for i, m in enumerate(messages):
        if not isinstance(m, dict):
            raise PromptError(f"messages[{i}] must be an object with 'role' and 'content'")
        role, content = m.get("role"), m.get("content")
        if role not in CHAT_ROLES:
            raise PromptError(f"messages[{i}].role must be one of {', '.join(CHAT_ROLES)}")
        if not isinstance(content, str):
            raise PromptError(f"messages[{i}].content must be a string")
        out.append({"role": role, "content": content})
    if need_answer and out[-1]["role"] != "assistant":
        raise PromptError("the last message must be the assistant's answer (the response to learn)")
    return out


def _render_chat(meta: GenerationMeta, tokenizer: Any, messages: Sequence[dict], generation_prompt: bool) -> list[int]:
    template = meta.chat_template or getattr(tokenizer, "chat_template", None)
    if not template:
        raise PromptError("this model has no chat template: use completions")
    try:
        out = tokenizer.apply_chat_template(list(messages), chat_template=template, tokenize=True,
                                            add_generation_prompt=generation_prompt, return_dict=False)
    except Exception as e:  # noqa: BLE001 - a template error names the problem
        raise PromptError(f"the chat template cannot render these messages: {type(e).__name__}: {e}") from None
    return _ids(out)


def chat_ids(meta: GenerationMeta, tokenizer: Any, messages: Any) -> list[int]:
    """Token ids of a conversation rendered for the assistant's next turn."""
    return _render_chat(meta, tokenizer, check_messages(messages), True)


def example_ids(meta: GenerationMeta, tokenizer: Any, *, prompt: str | None = None, completion: str | None = None,
                messages: Any = None) -> tuple[list[int], int]:
    """A training example as ``(token ids, prompt length)``: the loss covers ``ids[prompt length:]``.

    Completion format: ``prompt`` + ``completion`` (+ the first EOS id). Chat format: ``messages``
    whose last entry is the assistant's answer."""
    if messages is not None:
        msgs = check_messages(messages, need_answer=True)
        head = _render_chat(meta, tokenizer, msgs[:-1], True)
        full = _render_chat(meta, tokenizer, msgs, False)
        if full[:len(head)] != head or len(full) == len(head):
            raise PromptError("the chat template does not render the conversation as the prompt followed by "
                              "the answer")
        return full, len(head)
    if not isinstance(completion, str) or not completion:
        raise PromptError("an example needs a non-empty completion")
    head = prompt_ids(meta, tokenizer, prompt if prompt is not None else "")
    body = _ids(tokenizer(completion, add_special_tokens=False)["input_ids"])
    eos = meta.eos_ids(tokenizer)
    return head + body + eos[:1], len(head)
