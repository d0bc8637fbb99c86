"""The one way from an HTTP route to the backbone replicas: :class:`Dispatcher`.

Every route family — ``/v1`` (:mod:`.ingress`), ``/v2`` (:mod:`.oip`) and the OpenAI-compatible
routes (:mod:`.openai_api`) — calls the same dispatcher, which the ingress builds once. It holds the
backbone deployments' handles, their infos (asked once, then kept), the task index and the pins, and
it notes each resolved task for the per-task request metrics (:mod:`.task_metrics`)::

    resolve(task) ─────────► Route(backbone, version, kind, entry)   404 / 422 / 409 as ApiError
    resolve_model(model) ──► (generation backbone, task, version)    OpenAI's 404 / 400
    predict(backbones, items, top_k)
      │ the request's inputs grouped by backbone: ONE PredictCall per backbone, sent together
      ▼
    PredictResult per backbone ──► answers back in input order, or the first CallError as ApiError
    generate(backbone, GenerateCall) ──► (stream, GenerateStarted)   a refusal raised before any token
    validate(backbone, package) ──► ValidateResult                   a refusal raised as ApiError
    pin(task) / unpin(task) ──► a pin beside the store, applied by every replica of its backbone

A task resolves through the :class:`~.index.TaskIndex` (no I/O while its entry is fresh) to the
backbone whose base fingerprint it carries and whose kind of task (classification or generation) it
is. Replica errors cross the Ray call as :class:`~.messages.CallError` and leave here as
:class:`~.schemas.ApiError` (a request of several items names the failing one: ``item i: ...``).
"""
from __future__ import annotations

import asyncio
import logging
import time
from typing import Any, NamedTuple

from ..core.package import valid_task_id
from . import task_metrics
from .index import StoredTask, TaskIndex, is_miss
from .messages import GenerateCall, GenerateStarted, PredictCall, PredictInput, ValidateResult
from .residency import ResidencyView
from .schemas import ApiError

__all__ = ["Dispatcher", "Route"]

log = logging.getLogger("grft_serve.app")

CLASSIFICATION, GENERATION = "classification", "generation"


class Route(NamedTuple):
    """Where a classification task's inputs go: its backbone, the version resolved, the backbone's
    input kind (``image`` / ``text``) and the task's store entry (metadata)."""

    backbone: str
    version: str
    kind: str
    entry: StoredTask


class Dispatcher:
    """Task resolution and the calls to the backbone replicas (see the module docstring).

    ``handles``: backbone name → Serve deployment handle; ``residency``: the pins and what each
    replica holds; ``sync_interval_s``: how often replicas apply pins (bounds :meth:`pin`'s wait)."""

    def __init__(self, handles: dict, index: TaskIndex, residency: ResidencyView, sync_interval_s: float):
        self.handles, self.index, self.residency = handles, index, residency
        self.sync_interval_s = sync_interval_s
        self._info: dict[str, dict] | None = None
        self._info_lock = asyncio.Lock()

    # -- backbones ----------------------------------------------------------------------------------
    async def backbones(self) -> dict[str, dict]:
        """Every backbone's ``info`` (name → dict), asked once."""
        if self._info is None:
            async with self._info_lock:
                if self._info is None:
                    infos = await asyncio.gather(*(h.info.remote() for h in self.handles.values()))
                    self._info = {i["name"]: i for i in infos}
        return self._info

    async def backbone_for(self, fingerprint: str | None, kind: str = CLASSIFICATION) -> str | None:
        """The backbone serving tasks of ``kind`` on the base with ``fingerprint`` (a causal LM and its
        classification body share one fingerprint: the kind tells their deployments apart)."""
        return _find(await self.backbones(), fingerprint, kind)

    async def stats(self) -> dict[str, dict]:
        """One replica's ``stats`` per backbone."""
        names = list(await self.backbones())
        return dict(zip(names, await asyncio.gather(*(self.handles[n].stats.remote() for n in names))))

    # -- tasks ----------------------------------------------------------------------------------------
    async def tasks(self) -> dict[str, StoredTask]:
        """The store's listing (the index's while fresh)."""
        return await asyncio.to_thread(self.index.snapshot)

    async def entry(self, task_id: str, force: bool = False) -> StoredTask:
        """One task's store entry: the index's while fresh (no I/O), else ONE entry read off the loop;
        404 unknown, 422 broken."""
        e = None if force else self.index.cached(task_id)
        if force or is_miss(e):
            e = await asyncio.to_thread(self.index.refresh, task_id)
        if e is None:
            raise ApiError(404, "unknown_task", f"unknown task {task_id!r}")
        if e.broken:
            raise ApiError(422, "broken_task", f"stored task {task_id!r} cannot be read: {e.broken}")
        return e

    async def resolve(self, task_id: Any) -> Route:
        """Where a classification task's inputs go; 404 unknown, 422 broken or not a classifier, 409
        no backbone has its base."""
        if not isinstance(task_id, str):
            raise ApiError(422, "invalid_request", "a task id must be a string")
        e = await self.entry(task_id)
        kind = e.meta.get("kind", CLASSIFICATION)
        if kind != CLASSIFICATION:
            raise ApiError(422, "task_kind_mismatch", f"task {task_id!r} is a {kind} task: it has no classifier "
                                                      "(use /v1/completions or /v1/chat/completions)")
        infos = await self.backbones()
        bb = _find(infos, e.fingerprint, CLASSIFICATION)
        if bb is None:
            raise ApiError(409, "no_backbone", f"task {task_id!r} needs base {e.meta.get('base_model_id')} "
                                               "which no backbone of this app serves")
        task_metrics.note(task_id)
        return Route(bb, e.version, infos[bb]["kind"], e)

    async def generation_backbones(self) -> dict[str, dict]:
        return {n: i for n, i in (await self.backbones()).items() if i.get("task_kind") == GENERATION}

    async def resolve_model(self, model: str) -> tuple[str, str | None, str | None]:
        """(generation backbone, task id or None, version or None) of an OpenAI ``model``: a backbone's
        name, ``backbone:task`` or a generation task's id."""
        gen = await self.generation_backbones()
        if model in gen:
            return model, None, None
        base, sep, task = model.partition(":")
        if sep and base in gen:
            model = task
        entry = await asyncio.to_thread(self.index.get, model)
        if entry is None:
            raise ApiError(404, "model_not_found", f"the model {model!r} does not exist", param="model")
        if entry.broken:
            raise ApiError(422, "broken_task", f"stored task {model!r} cannot be read: {entry.broken}", param="model")
        kind = entry.meta.get("kind", CLASSIFICATION)
        if kind != GENERATION:
            raise ApiError(400, "unsupported_model", f"task {model!r} is a {kind} task: it does not generate text "
                                                     "(use /v1/tasks/{id}/predict)", param="model")
        bb = next((n for n, i in gen.items() if i["fingerprint"] == entry.fingerprint), None)
        if bb is None or (sep and bb != base):
            raise ApiError(404, "model_not_found", f"no generation backbone of this app serves the base of {model!r}",
                           param="model")
        return bb, model, entry.version

    # -- calls to the replicas --------------------------------------------------------------------------
    async def predict(self, backbones: list[str], items: list[PredictInput], top_k: int) -> list[dict]:
        """ONE call per backbone with all of this request's inputs for it (``backbones[i]``: the
        backbone of ``items[i]``); the answers back in order."""
        task_metrics.note_inputs(items)
        groups: dict[str, list[int]] = {}
        for i, b in enumerate(backbones):
            groups.setdefault(b, []).append(i)
        calls = [self.handles[b].predict.remote(PredictCall([items[i] for i in idx], top_k))
                 for b, idx in groups.items()]
        results = await asyncio.gather(*calls)
        out: list[dict | None] = [None] * len(items)
        for idx, res in zip(groups.values(), results):
            err = res.error
            if err is not None:
                where = f"item {idx[err.index]}: " if err.index is not None and len(items) > 1 else ""
                raise ApiError.from_call(err, where)
            for i, p in zip(idx, res.predictions):
                out[i] = p
        return out  # type: ignore[return-value]

    async def generate(self, backbone: str, call: GenerateCall):
        """Start a generation: (the stream of :class:`~.messages.GenerateEvents`, its
        :class:`~.messages.GenerateStarted`); a call refused before any token raises its ApiError."""
        stream = self.handles[backbone].options(stream=True).generate.remote(call)
        try:
            first: GenerateStarted = await stream.__anext__()
        except BaseException:
            stream.cancel()
            raise
        if first.error is not None:
            stream.cancel()
            raise ApiError.from_call(first.error)
        return stream, first

    async def validate(self, backbone: str, data: bytes) -> ValidateResult:
        """A package fully validated by ``backbone`` (nothing registered); its refusal as ApiError."""
        res: ValidateResult = await self.handles[backbone].validate.remote(data)
        if res.error is not None:
            raise ApiError.from_call(res.error)
        return res

    # -- pins ------------------------------------------------------------------------------------------
    def _pins(self):
        if self.residency.state is None:
            raise ApiError(501, "not_supported", "this app's task store keeps no pins (a directory store does)")
        return self.residency.state

    async def pin(self, task_id: str) -> None:
        """Pin a classification task on the device of every replica of its backbone (waits, bounded,
        until they report it)."""
        route = await self.resolve(task_id)
        await asyncio.to_thread(self._pins().pin, task_id)
        await self._await_replicas(task_id, route.backbone, True)

    async def unpin(self, task_id: str) -> None:
        """Release a pin (a task deleted meanwhile only loses its pin); 404 for a task never stored."""
        state = self._pins()
        if not valid_task_id(task_id):
            raise ApiError(404, "unknown_task", f"unknown task {task_id!r}")
        had = await asyncio.to_thread(state.unpin, task_id)
        e = await asyncio.to_thread(self.index.get, task_id)
        if e is None:
            if had:
                return  # the task was deleted; its pin is gone now
            raise ApiError(404, "unknown_task", f"unknown task {task_id!r}")
        bb = await self.backbone_for(e.fingerprint, e.meta.get("kind", CLASSIFICATION))
        if bb is not None and not e.broken:
            await self._await_replicas(task_id, bb, False)

    async def _await_replicas(self, task_id: str, backbone: str, pinned: bool) -> None:
        """Wait (bounded: a few sync intervals) until every live replica of ``backbone`` applied the pin."""
        deadline = time.monotonic() + 3 * self.sync_interval_s + 5
        while not await asyncio.to_thread(self.residency.applied, task_id, backbone, pinned):
            if time.monotonic() > deadline:
                log.warning("task %s: not every replica of %s reports pinned=%s yet", task_id, backbone, pinned)
                return
            await asyncio.sleep(min(0.2, self.sync_interval_s / 4))


def _find(infos: dict[str, dict], fingerprint: str | None, kind: str) -> str | None:
    return next((name for name, info in infos.items()
                 if info["fingerprint"] == fingerprint and info.get("task_kind", CLASSIFICATION) == kind), None)
