"""Generation requests as the decode loop sees them: sampling per request, text out, stop rules.

A :class:`GenerationRequest` carries the prompt's token ids, the slot key of its task (``None``: the
base model), its :class:`SamplingParams` and a sink for what it produces. The decode loop hands it one
token at a time through :meth:`GenerationRequest.push`; the request turns tokens into text deltas and
decides when it is done:

- **EOS**: a token in ``eos_ids`` ends the completion (``finish_reason = "stop"``, the token is not
  part of the text);
- **stop strings**: the text is cut before the first occurrence of any stop string
  (``"stop"``); until a completion ends, the last ``max(len(stop)) - 1`` characters are held back
  from the stream so a stop string is never half-sent;
- **length**: ``max_new_tokens`` tokens were produced (``"length"``).

Text deltas: the generated ids are decoded as a whole each step (the detokenisation of a token can
depend on its neighbours) and the new suffix is sent; a suffix ending in an incomplete UTF-8
character (``\\ufffd``) is held back until the character completes.

Sampling (:func:`sample_rows`): temperature 0 is greedy (argmax); otherwise the logits are divided by
the temperature, cut to the smallest top-p set (``top_p`` < 1), and one token is drawn with the
request's own ``torch.Generator`` (seeded from ``seed`` when given), so a seeded request gives the
same tokens whatever else shares its batch.
"""
from __future__ import annotations

import itertools
import threading
import time
from dataclasses import dataclass, field
from typing import Any, Callable, Sequence

import torch

__all__ = ["GenerationRequest", "SamplingParams", "StreamEvent", "sample_rows"]

_IDS = itertools.count(1)


@dataclass(frozen=True)
class SamplingParams:
    """What one request asks of the decoder (already validated by the caller)."""

    max_new_tokens: int
    temperature: float = 0.0
    top_p: float = 1.0
    seed: int | None = None
    stop: tuple[str, ...] = ()
    eos_ids: tuple[int, ...] = ()


@dataclass
class StreamEvent:
    """One delivery to a request's sink: new text, and on the last event the finish reason and counts."""

    text: str
    finish_reason: str | None = None  # "stop" | "length" | "cancelled" | "error"
    completion_tokens: int = 0
    error: str | None = None


@dataclass
class GenerationRequest:
    """One sequence to generate. ``sink(event)`` is called from the decode thread (keep it cheap and
    thread-safe, e.g. ``loop.call_soon_threadsafe``)."""

    prompt_ids: list[int]
    params: SamplingParams
    sink: Callable[[StreamEvent], None]
    decode: Callable[[list[int]], str]
    key: str | None = None  # slot key of the task (``task@version``); None: the base model
    resident: Any = None  # the task's device copy (kept alive while the request runs)
    rid: str = field(default_factory=lambda: f"gen-{next(_IDS)}")
    tokens: list[int] = field(default_factory=list)
    created: float = field(default_factory=time.perf_counter)
    first_token_at: float | None = None
    finished: str | None = None
    _sent: int = 0  # characters of the text already delivered
    _lock: threading.Lock = field(default_factory=threading.Lock, repr=False)
    _gen: torch.Generator | None = field(default=None, repr=False)

    def __post_init__(self) -> None:
        if self.params.temperature > 0:
            self._gen = torch.Generator()
            if self.params.seed is not None:
                self._gen.manual_seed(int(self.params.seed))
            else:
                self._gen.seed()

    @property
    def generator(self) -> torch.Generator | None:
        return self._gen

    # -- tokens in, text out ----------------------------------------------------------------------
    def push(self, token: int) -> bool:
        """Take the next generated token; returns True when this request is finished now."""
        with self._lock:
            if self.finished is not None:
                return True
            if self.first_token_at is None:
                self.first_token_at = time.perf_counter()
            if token in self.params.eos_ids:
                self._finish("stop", self._text(), len(self.tokens) + 1)
                return True
            self.tokens.append(token)
            text = self._text()
            cut = self._stop_at(text)
            if cut is not None:
                self._finish("stop", text[:cut], len(self.tokens))
                return True
            if len(self.tokens) >= self.params.max_new_tokens:
                self._finish("length", text, len(self.tokens))
                return True
            hold = self._holdback(text)
            if hold > self._sent:
                self.sink(StreamEvent(text[self._sent:hold]))
                self._sent = hold
            return False

    def end(self, reason: str, error: str | None = None) -> None:
        """Finish from outside the token stream (cancelled, context full, decoder failure)."""
        with self._lock:
            if self.finished is None:
                self._finish(reason, self._text() if reason == "length" else None, len(self.tokens), error)

    def _finish(self, reason: str, text: str | None, n_tokens: int, error: str | None = None) -> None:
        self.finished = reason
        rest = "" if text is None else text[self._sent:]
        self._sent += len(rest)
        self.sink(StreamEvent(rest, reason, n_tokens, error))

    def _text(self) -> str:
        return self.decode(self.tokens)

    def _stop_at(self, text: str) -> int | None:
        stops = self.params.stop
        if not stops:
            return None
        start = max(0, self._sent - max(len(s) for s in stops))
        hits = [i for i in (text.find(s, start) for s in stops) if i >= 0]
        return min(hits) if hits else None

    def _holdback(self, text: str) -> int:
        """How much of ``text`` may be sent now: no incomplete character, no possible stop prefix."""
        end = len(text)
        while end > self._sent and text[end - 1] == "\ufffd":
            end -= 1
        longest = max((len(s) for s in self.params.stop), default=0)
        if longest > 1:
            for keep in range(min(longest - 1, end - self._sent), 0, -1):
                tail = text[end - keep:end]
                if any(s.startswith(tail) for s in self.params.stop):
                    return end - keep
        return end


# ---------------------------------------------------------------------------------------------
# sampling
# ---------------------------------------------------------------------------------------------
def _top_p(logits: torch.Tensor, p: float) -> torch.Tensor:
    """``logits`` with every token outside the smallest set of probability >= ``p`` set to -inf."""
    sorted_l, order = logits.sort(descending=True)
    cum = sorted_l.softmax(-1).cumsum(-1)
    drop = cum - sorted_l.softmax(-1) >= p  # keep the token that crosses p
    sorted_l = sorted_l.masked_fill(drop, float("-inf"))
    return torch.empty_like(logits).scatter_(-1, order, sorted_l)


def sample_rows(logits: torch.Tensor, requests: Sequence[GenerationRequest]) -> list[int]:
    """One token per row of ``logits`` [R, vocab] (float32) for ``requests`` (same order)."""
    out: list[int] = []
    greedy = [i for i, r in enumerate(requests) if r.params.temperature <= 0]
    if greedy:
        idx = torch.tensor(greedy, device=logits.device)
        tokens = logits.index_select(0, idx).argmax(-1).tolist()
    picked = dict(zip(greedy, tokens)) if greedy else {}
    for i, r in enumerate(requests):
        if i in picked:
            out.append(int(picked[i]))
            continue
        row = logits[i].float() / r.params.temperature
        if r.params.top_p < 1.0:
            row = _top_p(row, r.params.top_p)
        probs = row.softmax(-1).cpu()
        out.append(int(torch.multinomial(probs, 1, generator=r.generator)))
    return out
