"""Per-task text generation on one engine: prompts rendered, budgets checked, sequences decoded.

:class:`TextGenerator` sits on an :class:`~grft_serve.engine.Engine` whose backbone is a causal LM
(``task_kind == "generation"``). It owns ONE decode loop for the engine —
:class:`~grft_serve.engine.continuous.ContinuousDecoder` (the default: requests join and leave at
every step, per-token row override, paged KV cache) or
:class:`~grft_serve.engine.padded.PaddedDecoder` (static batches joined at batch boundaries) — and
nothing else of the engine runs forwards while it serves (the patch path is never used).

A request is: a task id (``None``: the base model), prompt token ids rendered with the task's own
template (:func:`~grft_serve.core.generation.prompt_ids` / ``chat_ids``), :class:`SamplingParams`
resolved from the request over the task's defaults (:meth:`TextGenerator.params`), and a sink for
its :class:`StreamEvent` s. The task's device copy is taken at admission and kept by the request, so
eviction or a replace of the task never changes a sequence that is already decoding.

Budgets: ``prompt tokens + max_new_tokens <= context`` (the backbone's ``max_length``), checked
before admission (:class:`GenerationInputError`, OpenAI's ``context_length_exceeded``). The KV cache
holds ``kv_cache_tokens`` tokens (default: ``max_requests`` full contexts), sized explicitly.
"""
from __future__ import annotations

import math
from typing import Any, Callable, Sequence

from ..core.generation import GenerationMeta, PromptError, chat_ids, prompt_ids
from .continuous import ContinuousDecoder
from .decode_slots import DecodeSlots, slot_key
from .padded import PaddedDecoder
from .sequences import GenerationRequest, SamplingParams, StreamEvent

__all__ = ["DECODERS", "GenerationInputError", "TextGenerator"]

DECODERS = ("continuous", "padded")


class GenerationInputError(ValueError):
    """A request that cannot be generated as asked (the message says why; ``param`` names the field)."""

    def __init__(self, message: str, param: str | None = None, code: str = "invalid_value"):
        super().__init__(message)
        self.message, self.param, self.code = message, param, code


class TextGenerator:
    """Generation for every task of ``engine`` (see the module docstring)."""

    def __init__(self, engine, decoder: str = "continuous", *, max_tasks_per_batch: int = 8, max_requests: int = 32,
                 max_batch_tokens: int = 512, kv_cache_tokens: int | None = None, page_size: int = 64):
        bb = engine.backbone
        if getattr(bb, "task_kind", None) != "generation":
            raise ValueError(f"backbone {bb.model_id} is not a generation base (task_kind {bb.task_kind!r})")
        if decoder not in DECODERS:
            raise ValueError(f"decoder must be one of {', '.join(DECODERS)}, not {decoder!r}")
        self.engine, self.backbone, self.tokenizer = engine, bb, bb.tokenizer
        self.context = int(bb.max_length)
        self.base_defaults: GenerationMeta = bb.generation_defaults()
        self.slots = DecodeSlots(engine)
        engine.decoding = True  # the patch path would rewrite weights under the decode thread
        if decoder == "continuous":
            kv = kv_cache_tokens or max_requests * self.context
            self.decoder = ContinuousDecoder(bb.lm, self.slots, max_tasks_per_batch=max_tasks_per_batch,
                                             max_requests=max_requests, max_batch_tokens=max_batch_tokens,
                                             num_blocks=max(2, math.ceil(kv / page_size)), page_size=page_size)
        else:
            self.decoder = PaddedDecoder(bb.lm, self.slots, pad_id=int(self.tokenizer.pad_token_id or 0),
                                         max_tasks_per_batch=max_tasks_per_batch, max_requests=max_requests)

    # -- what a request becomes -----------------------------------------------------------------
    def defaults(self, task_id: str | None) -> GenerationMeta:
        """The task's generation metadata (its template and sampling defaults); the base's for None."""
        if task_id is None:
            return self.base_defaults
        meta = self.engine.task(task_id).meta
        return meta.generation or self.base_defaults

    def render(self, task_id: str | None, *, prompt: str | None = None, messages: Any = None) -> list[int]:
        """Prompt token ids, rendered exactly as the task was trained (raises :class:`GenerationInputError`)."""
        meta = self.defaults(task_id)
        try:
            ids = chat_ids(meta, self.tokenizer, messages) if messages is not None else \
                prompt_ids(meta, self.tokenizer, prompt)
        except PromptError as e:
            raise GenerationInputError(str(e), "messages" if messages is not None else "prompt") from None
        if not ids:
            raise GenerationInputError("the prompt renders to no tokens", "prompt")
        return ids

    def params(self, task_id: str | None, prompt_len: int, *, max_tokens: int | None = None,
               temperature: float | None = None, top_p: float | None = None, stop: Sequence[str] = (),
               seed: int | None = None) -> SamplingParams:
        """Sampling parameters for one sequence: the request's values over the task's defaults, and
        the context budget checked."""
        meta = self.defaults(task_id)
        room = self.context - prompt_len
        if room < 1:
            raise GenerationInputError(f"the prompt has {prompt_len} tokens; this model's context is {self.context} "
                                       "tokens, and at least one must be left to generate", "prompt",
                                       "context_length_exceeded")
        if max_tokens is not None and max_tokens > room:
            raise GenerationInputError(f"max_tokens {max_tokens} + the prompt's {prompt_len} tokens exceed the "
                                       f"context of {self.context} tokens (at most {room} here)", "max_tokens",
                                       "context_length_exceeded")
        n = max_tokens if max_tokens is not None else min(meta.max_new_tokens, room)
        return SamplingParams(max_new_tokens=n, temperature=meta.temperature if temperature is None else temperature,
                              top_p=meta.top_p if top_p is None else top_p, seed=seed,
                              stop=tuple(stop) or tuple(meta.stop), eos_ids=tuple(meta.eos_ids(self.tokenizer)))

    # -- decoding ---------------------------------------------------------------------------------
    def submit(self, task_id: str | None, ids: list[int], params: SamplingParams,
               sink: Callable[[StreamEvent], None]) -> GenerationRequest:
        """Start decoding one sequence; ``sink`` gets its events (from the decode thread)."""
        key = resident = None
        if task_id is not None:
            with self.engine.cache.use([task_id]) as (res, _):
                resident = res[0]
                key = slot_key(task_id, self.engine.cache.version(task_id))
        req = GenerationRequest(ids, params, sink, self.decode, key=key, resident=resident)
        self.decoder.submit(req)
        return req

    def decode(self, ids: list[int]) -> str:
        return self.tokenizer.decode(ids, skip_special_tokens=True)

    def cancel(self, rid: str) -> None:
        self.decoder.cancel(rid)

    def stats(self) -> dict:
        return {"decoder": self.decoder.name, "context": self.context, "pending": self.decoder.pending(),
                **{f"decode_{k}": v for k, v in self.decoder.counters.items()}}

    def close(self) -> None:
        self.decoder.close()
        self.engine.decoding = False
