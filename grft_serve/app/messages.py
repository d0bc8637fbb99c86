"""Typed messages between the ingress and the backbone replicas (they cross a Ray call as dataclasses).

The ingress talks to the replicas only through :class:`~grft_serve.app.dispatch.Dispatcher`, and
every call carries one of these; replies never carry a string-keyed error dict.

Every call:

- :class:`CallError` — why a call (or one input of it) was refused: HTTP ``status``, ``code``,
  ``message``, the request field at fault (``param``, OpenAI's) and the ``index`` of the failing
  input within the call. The replica turns its :class:`~.schemas.ApiError` into one
  (:meth:`ApiError.call_error <.schemas.ApiError.call_error>`), the ingress turns it back
  (:meth:`ApiError.from_call <.schemas.ApiError.from_call>`).

Classification (one call per HTTP request and backbone, :meth:`BackboneServer.predict
<grft_serve.app.replica.BackboneServer.predict>`):

- :class:`PredictCall` — ingress → replica: the request's inputs for this backbone, each a
  :class:`PredictInput` (task, the version the ingress resolved, the checked input: image bytes or
  a text), and ``top_k``;
- :class:`PredictResult` — back: one answer per input in input order (the ``Prediction`` JSON of
  the HTTP API, built by :mod:`.answers`), or the :class:`CallError` of the first input that could
  not be served. Inside a replica the same type carries each chunk's result out of a batch.

Registration (:meth:`ReplicaCore.validate <grft_serve.app.replica_core.ReplicaCore.validate>`):

- :class:`ValidateResult` — a package validated against the replica's base: its metadata and
  parameter count, or the :class:`CallError` that refuses it.

Generation (one call per HTTP request, streamed back):

- :class:`GenerateCall` — ingress → generation replica: the task (``None``: the base) and the version
  the ingress resolved, the prompts (completions) or the conversation (chat), ``n`` and the request's
  sampling fields (``None``: the task's default);
- :class:`GenerateStarted` — the first item back: prompt token counts and the number of choices, or
  the :class:`CallError` that stopped the call before any token;
- :class:`GenerateEvents` — then batches of :class:`ChoiceEvent` (choice index, text delta, and on a
  choice's last event its finish reason and token count).

``info`` and ``stats`` answer plain dicts: they are shown as they are (``GET /v1/backbones``).
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

__all__ = ["CallError", "ChoiceEvent", "GenerateCall", "GenerateEvents", "GenerateStarted", "PredictCall",
           "PredictInput", "PredictResult", "ValidateResult"]


@dataclass
class CallError:
    status: int
    code: str
    message: str
    param: str | None = None
    index: int | None = None  # the failing input within the call (None: the call as a whole)


# -- classification -------------------------------------------------------------------------------------
@dataclass
class PredictInput:
    task: str
    version: str | None  # None: the store's current version
    input: Any  # image bytes (image bases) or a text (text bases), already checked by the ingress


@dataclass
class PredictCall:
    items: list[PredictInput]
    top_k: int = 5


@dataclass
class PredictResult:
    predictions: list[dict] = field(default_factory=list)  # one answer per input, in input order
    error: CallError | None = None


# -- registration ---------------------------------------------------------------------------------------
@dataclass
class ValidateResult:
    meta: dict = field(default_factory=dict)  # the package's metadata (JSON)
    num_params: int = 0
    error: CallError | None = None


# -- generation -----------------------------------------------------------------------------------------
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
    error: CallError | None = None


@dataclass
class ChoiceEvent:
    index: int
    text: str
    finish_reason: str | None = None
    completion_tokens: int = 0


@dataclass
class GenerateEvents:
    items: list[ChoiceEvent]
