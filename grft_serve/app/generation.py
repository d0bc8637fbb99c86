"""The generation server: ONE frozen causal LM per replica, every generation task of its base.

A plain class like :class:`~grft_serve.app.replica.BackboneServer` (the deployment is applied in
:mod:`grft_serve.app.build`), sharing its task loading, store sync and residency
(:class:`~grft_serve.app.replica_core.ReplicaCore`). Its one data-path method is an async generator,
streamed by Ray Serve::

    generate(GenerateCall)
      │ in the thread pool: load the task (lazily, the version the ingress resolved), render every
      │ prompt with the task's template, resolve sampling over its defaults, check the context budget
      ▼
    yield GenerateStarted (prompt tokens per prompt, or the error — nothing has run yet)
      │ every prompt × n sequences go into the ONE decode loop of this replica
      │ (:class:`~grft_serve.engine.generate.TextGenerator`), mixed with every other caller's
      ▼
    yield GenerateEvents ... (text deltas as they come; each choice's last event has its finish reason)

Choice ``i`` of prompt ``p`` is index ``p * n + i`` (OpenAI's order); with a ``seed`` it samples with
seed ``seed + i`` so the n choices differ yet repeat. When the caller goes away (client disconnect:
Serve cancels the generator) every sequence still running is cancelled and its KV blocks freed.
"""
from __future__ import annotations

import asyncio
import logging
from typing import AsyncIterator

from ..engine import GenerationInputError, TextGenerator, UnknownTaskError
from .messages import ChoiceEvent, GenerateCall, GenerateEvents, GenerateStarted
from .replica_core import ReplicaCore
from .schemas import ApiError

__all__ = ["GenerationServer"]

log = logging.getLogger("grft_serve.app")

_SEED_MOD = 2 ** 64


class GenerationServer(ReplicaCore):
    """Owns one engine over a causal LM and its decode loop (see the module docstring)."""

    def __init__(self, spec: dict, store: dict, limits: dict, sync_interval_s: float = 2.0,
                 metrics_task_label_cap: int = 100):
        super().__init__(spec, store, limits, sync_interval_s, metrics_task_label_cap)
        g = self.spec.generation
        self.generator = TextGenerator(self.engine, g.decoder, max_tasks_per_batch=g.max_tasks_per_batch,
                                       max_requests=g.max_requests, max_batch_tokens=g.max_batch_tokens,
                                       kv_cache_tokens=g.kv_cache_tokens, page_size=g.page_size)
        self.max_pending = g.max_pending
        self.start()

    def info(self) -> dict:
        return {**super().info(), "context": self.generator.context, "decoder": self.generator.decoder.name}

    def stats(self) -> dict:
        return {**super().stats(), "generation": self.generator.stats()}

    def close(self) -> None:
        super().close()
        self.generator.close()

    # -- the data path ----------------------------------------------------------------------------
    def _plan(self, call: GenerateCall) -> tuple[list[tuple[list[int], object]], list[int]]:
        """(per choice: prompt ids and sampling params, prompt tokens per prompt), or ApiError."""
        if call.task is not None:
            try:
                self.ensure_task(call.task, call.version)
            except ApiError as e:
                if e.code == "unknown_task":
                    raise ApiError(404, "model_not_found", f"the model {call.task!r} does not exist",
                                   param="model") from None
                raise
        g = self.generator
        n_seq = call.n * (1 if call.messages is not None else len(call.prompts or []))
        if g.decoder.pending() + n_seq > self.max_pending:
            raise ApiError(503, "overloaded", f"replica {self.replica} has {g.decoder.pending()} sequences "
                                              "decoding or waiting; retry later")
        try:
            rendered = [g.render(call.task, messages=call.messages)] if call.messages is not None else \
                [g.render(call.task, prompt=p) for p in call.prompts or []]
            seqs = []
            for ids in rendered:
                for i in range(call.n):
                    seed = None if call.seed is None else (call.seed + i) % _SEED_MOD
                    seqs.append((ids, g.params(call.task, len(ids), max_tokens=call.max_tokens,
                                               temperature=call.temperature, top_p=call.top_p, stop=call.stop,
                                               seed=seed)))
        except GenerationInputError as e:
            raise ApiError(400, e.code, e.message, param=e.param) from None
        except UnknownTaskError:
            raise ApiError(404, "model_not_found", f"the model {call.task!r} does not exist", param="model") from None
        return seqs, [len(ids) for ids in rendered]

    async def generate(self, call: GenerateCall) -> AsyncIterator[GenerateStarted | GenerateEvents]:
        loop = asyncio.get_running_loop()
        try:
            seqs, prompt_tokens = await loop.run_in_executor(self._pool, self._plan, call)
        except ApiError as e:
            yield GenerateStarted(error={"status": e.status, "code": e.code, "message": e.message,
                                         "param": e.extra.get("param")})
            return
        q: asyncio.Queue = asyncio.Queue()
        reqs = []
        try:
            for index, (ids, params) in enumerate(seqs):
                def sink(ev, i=index):
                    loop.call_soon_threadsafe(q.put_nowait, (i, ev))
                reqs.append(self.generator.submit(call.task, ids, params, sink))
        except UnknownTaskError:  # deleted between the plan and now
            for r in reqs:
                self.generator.cancel(r.rid)
            yield GenerateStarted(error={"status": 404, "code": "model_not_found", "param": "model",
                                         "message": f"the model {call.task!r} does not exist"})
            return
        try:
            yield GenerateStarted(prompt_tokens, len(seqs), call.version, self.replica)
            open_ = len(reqs)
            while open_:
                got = [await q.get()]
                while not q.empty():  # everything that came meanwhile travels as one item
                    got.append(q.get_nowait())
                items = []
                for i, ev in got:
                    items.append(ChoiceEvent(i, ev.text, ev.finish_reason, ev.completion_tokens))
                    if ev.finish_reason is not None:
                        open_ -= 1
                        if ev.error:
                            log.warning("generation %s: choice %d failed: %s", self.name, i, ev.error)
                yield GenerateEvents(items)
        finally:
            for r in reqs:
                if r.finished is None:
                    self.generator.cancel(r.rid)
