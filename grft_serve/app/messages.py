"""Typed messages between the ingress and the backbone replicas (they cross a Ray call as dataclasses).

Generation (one call per HTTP request, streamed back):

- :class:`GenerateCall` — ingress → generation replica: the task (``None``: the base) and the version
  the ingress resolved, the prompts (completions) or the conversation (chat), ``n`` and the request's
  sampling fields (``None``: the task's default);
- :class:`GenerateStarted` — the first item back: prompt token counts and the number of choices, or
  the error (``{"status", "code", "message", "param"}``) that stopped the call before any token;
- :class:`GenerateEvents` — then batches of :class:`ChoiceEvent` (choice index, text delta, and on a
  choice's last event its finish reason and token count).
"""
from __future__ import annotations

from dataclasses import dataclass, field

__all__ = ["ChoiceEvent", "GenerateCall", "GenerateEvents", "GenerateStarted"]


@dataclass
class GenerateCall:
    task: str | None
    version: str | None
    prompts: list[str] | None
    messages: list[dict] | None
    n: int = 1
    max_tokens: int | None = None
    temperature: float | None = None
    top_p: float | None = None
    stop: list[str] = field(default_factory=list)
    seed: int | None = None


@dataclass
class GenerateStarted:
    prompt_tokens: list[int] = field(default_factory=list)  # per prompt
    choices: int = 0
    version: str | None = None
    replica: str = ""
    error: dict | None = None


@dataclass
class ChoiceEvent:
    index: int
    text: str
    finish_reason: str | None = None
    completion_tokens: int = 0


@dataclass
class GenerateEvents:
    items: list[ChoiceEvent]
