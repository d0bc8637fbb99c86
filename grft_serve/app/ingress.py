"""The ingress: HTTP routes (FastAPI), auth, input checks, routing by base fingerprint.

A plain class whose routes live on :data:`~grft_serve.app.api.api`; ``serve.ingress`` and
``serve.deployment`` are applied in :mod:`grft_serve.app.build`. Each request is checked whole
(auth and size from the headers, then every input's base64 and image header or text) before anything
runs; then ALL inputs of the request that go to one backbone travel in ONE call.

Consistency: a registration is fully validated by the target backbone deployment, then written to the
store atomically (a new id can be written once: concurrent registrations of one new id get one 201 and
409s). Every predict call carries the task version the ingress resolved from its :class:`TaskIndex`;
a replica holding another version loads the stored one first, and every answer names its version.
"""
from __future__ import annotations

import asyncio
import logging
from typing import Any

from fastapi import Query, Request
from fastapi.openapi.docs import get_swagger_ui_html
from fastapi.responses import HTMLResponse, JSONResponse, PlainTextResponse
from pydantic import ValidationError

from . import metrics as M
from ..core.package import PackageError, peek_meta
from ..store import TaskExistsError, TaskNotFoundError
from .api import api, pyd_error
from .config import AppConfig, make_store
from .guard import Guard
from .index import StoredTask, TaskIndex, is_miss
from .inputs import check_input
from .oip import OipRoutes
from .openai_api import OpenAIRoutes
from .proxy import HeaderLimit
from .residency import ResidencyView, StateDir
from .schemas import (ERR, ERRORS_PREDICT, ERRORS_READ, ApiError, BatchPredictRequest, PredictRequest,
                      PredictResponse, TaskList, TaskOut)
from . import task_metrics

__all__ = ["Ingress"]

log = logging.getLogger("grft_serve.app")

LIST_LIMIT, MAX_LIST_LIMIT = 100, 1000  # GET /v1/tasks page size: default, largest
_INLINE_CHECK_BYTES = 64 << 10  # smaller inputs are checked on the event loop (a thread hop costs more)
_PREDICT_BODY = {"requestBody": {"required": True, "content": {
    "application/json": {"schema": PredictRequest.model_json_schema()},
    "multipart/form-data": {"schema": {"type": "object", "properties": {
        "files": {"type": "array", "items": {"type": "string", "format": "binary"},
                  "description": "image files (image tasks) or UTF-8 text files"},
        "top_k": {"type": "integer", "default": 5}}}}}}}
_REGISTER_BODY = {"requestBody": {"required": True, "content": {"multipart/form-data": {"schema": {
    "type": "object", "required": ["file"], "properties": {
        "file": {"type": "string", "format": "binary", "description": "a .grft.safetensors task package"},
        "replace": {"type": "boolean", "default": False}}}}}}}


class Ingress(OipRoutes, OpenAIRoutes):
    def __init__(self, config: dict, backbones: dict):
        self.cfg = AppConfig(**config)
        self.limits = self.cfg.limits
        HeaderLimit.default_limit = self.limits.max_header_bytes  # the ingress app's own header cap
        self.guard = Guard(self.cfg)
        self.handles = backbones  # name -> DeploymentHandle
        self.store = make_store(self.cfg.store)
        self.index = TaskIndex(self.store, ttl_s=self.cfg.task_cache_ttl_s)
        self.residency = ResidencyView(StateDir.for_store(self.store))  # pins + what each replica holds
        task_metrics.configure(self.cfg.metrics_task_label_cap)
        self._info: dict[str, dict] | None = None
        self._info_lock = asyncio.Lock()

    # -- backbones ------------------------------------------------------------------------------
    async def backbones(self) -> dict[str, dict]:
        if self._info is None:
            async with self._info_lock:
                if self._info is None:
                    infos = await asyncio.gather(*(h.info.remote() for h in self.handles.values()))
                    self._info = {i["name"]: i for i in infos}
        return self._info

    async def _backbone_for(self, fingerprint: str | None, kind: str = "classification") -> str | None:
        """The backbone serving tasks of ``kind`` on the base with ``fingerprint`` (a causal LM and its
        classification body share one fingerprint: the kind tells their deployments apart)."""
        for name, info in (await self.backbones()).items():
            if info["fingerprint"] == fingerprint and info.get("task_kind", "classification") == kind:
                return name
        return None

    async def _task_out(self, e: StoredTask) -> dict:
        m = e.meta
        kind = m.get("kind", "classification")
        return {"task_id": e.task_id, "version": e.version, "kind": kind,
                "backbone": await self._backbone_for(e.fingerprint, kind), "base_model_id": m.get("base_model_id", ""), "base_fingerprint": m.get("base_fingerprint", ""),
                "mode": m.get("mode", ""), "labels": m.get("labels", []), "num_params": e.num_params,
                "bytes": e.bytes, "metrics": m.get("metrics", {}), "preprocessing": m.get("preprocessing", {}),
                "created": m.get("created"), **self.residency.of(e.task_id)}

    async def _entry(self, tid: str, force: bool = False) -> StoredTask:
        """One task's store entry: the index's while fresh (no I/O), else ONE entry read off the loop."""
        e = None if force else self.index.cached(tid)
        if force or is_miss(e):
            e = await asyncio.to_thread(self.index.refresh, tid)
        if e is None:
            raise ApiError(404, "unknown_task", f"unknown task {tid!r}")
        if e.broken:
            raise ApiError(422, "broken_task", f"stored task {tid!r} cannot be read: {e.broken}")
        return e

    async def _resolve(self, tid: str) -> tuple[str, str]:
        """(backbone, version) of a stored task; 404 unknown, 422 broken, 409 no backbone has its base."""
        if not isinstance(tid, str):
            raise ApiError(422, "invalid_request", "a task id must be a string")
        e = await self._entry(tid)
        if e.meta.get("kind", "classification") != "classification":
            raise ApiError(422, "task_kind_mismatch", f"task {tid!r} is a {e.meta.get('kind')} task: it has no "
                                                      "classifier (use /v1/completions or /v1/chat/completions)")
        bb = await self._backbone_for(e.fingerprint)
        if bb is None:
            raise ApiError(409, "no_backbone", f"task {tid!r} needs base {e.meta.get('base_model_id')} "
                                               "which no backbone of this app serves")
        task_metrics.note(tid)
        return bb, e.version

    # -- endpoints: ops -------------------------------------------------------------------------------
    @api.get("/healthz", summary="Liveness/readiness", tags=["ops"])
    async def healthz(self, request: Request) -> dict:
        """`200 {"status": "ok"}` once every backbone deployment answered (`503` otherwise); the
        backbones and task count are shown to callers that may read."""
        try:
            infos = await asyncio.wait_for(self.backbones(), timeout=10)
        except Exception:  # noqa: BLE001
            raise ApiError(503, "unavailable", "backbones not ready") from None
        try:
            self.guard.reader(request)
        except ApiError:
            return {"status": "ok"}
        tasks = await asyncio.to_thread(self.index.snapshot)
        return {"status": "ok", "backbones": {n: {k: i[k] for k in ("kind", "model_id", "fingerprint", "device")}
                                              for n, i in infos.items()}, "tasks": len(tasks)}

    @api.get("/openapi.json", include_in_schema=False)
    async def openapi(self, request: Request):
        self.guard.reader(request)
        return JSONResponse(api.openapi())

    @api.get("/docs", include_in_schema=False)
    async def docs(self, request: Request):
        self.guard.reader(request)
        html = get_swagger_ui_html(openapi_url="/openapi.json", title="grft-serve")
        return HTMLResponse(html.body)

    @api.get("/v1/backbones", summary="Backbones of this app, with one replica's engine stats", tags=["ops"],
             responses=ERRORS_READ)
    async def list_backbones(self, request: Request) -> dict:
        self.guard.reader(request)
        infos = await self.backbones()
        stats = await asyncio.gather(*(self.handles[n].stats.remote() for n in infos))
        return {"backbones": [{**infos[n], "stats": s} for n, s in zip(infos, stats)]}

    @api.get("/metrics", summary="Prometheus metrics (grft_* of this node)", tags=["ops"],
             response_class=PlainTextResponse, responses=ERRORS_READ)
    async def metrics(self, request: Request, all: bool = Query(False, description="all Ray metrics, not only grft_*")):
        """Proxies this node's Ray metrics endpoint. On a cluster, scrape each node's Ray metrics
        port (``ray_grft_*`` series) instead."""
        self.guard.reader(request)
        text = await asyncio.to_thread(M.local_node_metrics)
        if text is None:
            raise ApiError(503, "metrics_unavailable", "this node's Ray metrics cannot be read")
        if not all:
            text = "\n".join(ln for ln in text.splitlines() if "grft_" in ln.split("{")[0]) + "\n"
        return PlainTextResponse(text, media_type="text/plain; version=0.0.4")

    # -- endpoints: tasks -----------------------------------------------------------------------------
    @api.post("/v1/tasks", status_code=201, response_model=TaskOut, summary="Register a task package",
              tags=["tasks"], responses={400: ERR, 401: ERR, 403: ERR, 408: ERR, 409: ERR, 413: ERR, 415: ERR,
                                         422: ERR}, openapi_extra=_REGISTER_BODY)
    async def register(self, request: Request, replace: bool = Query(False, description="overwrite an existing "
                                                                                         "task with the same id")):
        """Multipart upload (field `file`). Validates the package against the backbone whose
        fingerprint it carries, then stores it atomically. `409` when the id exists (without
        `replace`) or no backbone serves its base; the validator's errors surface as `400`, `409`,
        `413` or `422`."""
        self.guard.admin(request)
        status = "error"
        try:
            data, form_replace = await self.guard.package_upload(request)
            out = await self._register(data, replace or form_replace)
            status = "ok"
            return out
        finally:
            M.inc("grft_registrations", 1, {"op": "register", "status": status})

    async def _register(self, data: bytes, replace: bool) -> dict:
        limit = self.limits.max_package_bytes
        if len(data) > limit:
            raise ApiError(413, "too_large", f"package is larger than the limit of {limit} bytes")
        try:
            meta = await asyncio.to_thread(peek_meta, data, limit)
        except PackageError as e:
            raise ApiError(e.status, e.code, e.message) from None
        bb = await self._backbone_for(meta.base_fingerprint, meta.kind)
        other = None if bb is not None else next((n for n, i in (await self.backbones()).items()
                                                  if i["fingerprint"] == meta.base_fingerprint), None)
        if other is not None:
            raise ApiError(422, "task_kind_mismatch", f"task {meta.task_id!r} is a {meta.kind} package; backbone "
                                                      f"{other} of its base serves "
                                                      f"{(await self.backbones())[other].get('task_kind')} tasks")
        if bb is None:
            names = ", ".join(f"{n} ({i['model_id']}, {i['fingerprint']})" for n, i in (await self.backbones()).items())
            raise ApiError(409, "base_fingerprint_mismatch",
                           f"package was trained on base {meta.base_model_id} with fingerprint "
                           f"{meta.base_fingerprint}; no backbone of this app has it (serving: {names})")
        tid = meta.task_id
        existing = await asyncio.to_thread(self.index.refresh, tid)
        if not replace and existing is not None:
            raise ApiError(409, "task_exists", f"task {tid!r} is already registered; pass replace to overwrite")
        if existing is None and await asyncio.to_thread(self.index.count) >= self.limits.max_tasks:
            raise ApiError(409, "too_many_tasks", f"the store holds {self.limits.max_tasks} tasks, the limit; "
                                                  "delete one first")
        res = await self.handles[bb].validate.remote(data)
        if not res["ok"]:
            raise ApiError(res["status"], res["code"], res["message"])
        try:
            version = await asyncio.to_thread(self.store.put, tid, data, replace)
        except TaskExistsError:
            raise ApiError(409, "task_exists", f"task {tid!r} is already registered; pass replace to overwrite") \
                from None
        entry = await asyncio.to_thread(self.index.refresh, tid)
        if entry is None or entry.version != version:  # replaced or deleted meanwhile: answer what we stored
            entry = StoredTask(tid, version, res["meta"], res["num_params"], len(data))
        log.info("registered task %s version %s on backbone %s", tid, version, bb)
        return await self._task_out(entry)

    @api.get("/v1/tasks", response_model=TaskList, summary="List tasks", tags=["tasks"],
             responses={**ERRORS_READ, 422: ERR})
    async def list_tasks(self, request: Request,
                         limit: int = Query(LIST_LIMIT, ge=1, le=MAX_LIST_LIMIT, description="entries per page"),
                         after: str | None = Query(None, max_length=200, description="the `next` of the page "
                                                                                      "before: ids after it")):
        """Tasks by id, a page at a time: healthy ones under `tasks`, stored packages that cannot be
        read under `broken`; `next` is the cursor of the following page (`after=`), null on the last."""
        self.guard.reader(request)
        entries = await asyncio.to_thread(self.index.snapshot)
        ids = sorted(t for t in entries if after is None or t > after)
        page, more = ids[:limit], len(ids) > limit
        ok = [await self._task_out(entries[t]) for t in page if not entries[t].broken]
        broken = [{"task_id": t, "version": entries[t].version, "reason": entries[t].broken} for t in page
                  if entries[t].broken]
        return JSONResponse({"tasks": [TaskOut(**t).model_dump() for t in ok], "broken": broken,
                             "next": page[-1] if more else None})

    @api.get("/v1/tasks/{task_id}", response_model=TaskOut, summary="One task's metadata", tags=["tasks"],
             responses={**ERRORS_READ, 404: ERR, 422: ERR})
    async def get_task(self, task_id: str, request: Request):
        self.guard.reader(request)
        return await self._task_out(await self._entry(task_id, force=True))

    @api.delete("/v1/tasks/{task_id}", summary="Delete a task", tags=["tasks"],
                responses={401: ERR, 403: ERR, 404: ERR})
    async def delete_task(self, task_id: str, request: Request) -> dict:
        """Removes the package from the store; predictions for it stop at once (the ingress resolves
        every request against the store) and replicas free its memory at their next sync."""
        self.guard.admin(request)
        try:
            await asyncio.to_thread(self.store.delete, task_id)
        except (TaskNotFoundError, ValueError):
            M.inc("grft_registrations", 1, {"op": "delete", "status": "error"})
            raise ApiError(404, "unknown_task", f"unknown task {task_id!r}") from None
        await asyncio.to_thread(self.index.refresh, task_id)
        M.inc("grft_registrations", 1, {"op": "delete", "status": "ok"})
        return {"deleted": task_id}

    # -- endpoints: predict ---------------------------------------------------------------------------
    @api.post("/v1/tasks/{task_id}/predict", response_model=PredictResponse, summary="Predict with one task",
              tags=["predict"], responses=ERRORS_PREDICT, openapi_extra=_PREDICT_BODY)
    async def predict_task(self, task_id: str, request: Request):
        """JSON `{"inputs": [...], "top_k": 5}` (texts, or base64 / data-URL images) or a multipart
        upload of image files (any field name). One answer per input, in order."""
        self.guard.reader(request)
        bb, version = await self._resolve(task_id)
        kind = (await self.backbones())[bb]["kind"]
        if request.headers.get("content-type", "").startswith("multipart/form-data"):
            raw, top_k = await self.guard.multipart_inputs(request, kind)
            encoded = False
        else:
            req = self._model(PredictRequest, await self.guard.json(request, self.limits.max_request_bytes))
            raw, top_k, encoded = req.inputs, req.top_k, True
        self._check_count(len(raw))
        top_k = self._check_top_k(top_k)
        inputs = await self._check_inputs([kind] * len(raw), raw, encoded)
        items = [{"task": task_id, "version": version, "input": x} for x in inputs]
        return JSONResponse({"predictions": await self._dispatch([bb] * len(items), items, top_k)})

    @api.post("/v1/predict", response_model=PredictResponse, summary="Predict a batch of items for many tasks",
              tags=["predict"], responses=ERRORS_PREDICT,
              openapi_extra={"requestBody": {"required": True, "content": {
                  "application/json": {"schema": BatchPredictRequest.model_json_schema()}}}})
    async def predict_many(self, request: Request):
        """`{"items": [{"task": id, "input": ...}, ...], "top_k": 5}`: items for different tasks (and
        backbones) are batched together with all concurrent traffic. All items are checked before any
        runs; one bad item rejects the request."""
        self.guard.reader(request)
        body = self._model(BatchPredictRequest, await self.guard.json(request, self.limits.max_request_bytes))
        self._check_count(len(body.items))
        top_k = self._check_top_k(body.top_k)
        bbs, versions = [], []
        for i, it in enumerate(body.items):
            try:
                bb, version = await self._resolve(it.task)
            except ApiError as e:
                raise ApiError(e.status, e.code, f"item {i}: {e.message}") from None
            bbs.append(bb)
            versions.append(version)
        infos = await self.backbones()
        inputs = await self._check_inputs([infos[b]["kind"] for b in bbs], [it.input for it in body.items], True)
        items = [{"task": it.task, "version": v, "input": x} for it, v, x in zip(body.items, versions, inputs)]
        return JSONResponse({"predictions": await self._dispatch(bbs, items, top_k)})

    # -- predict helpers ---------------------------------------------------------------------------------
    @staticmethod
    def _model(model, body: Any):
        try:
            return model.model_validate(body)
        except ValidationError as e:
            raise pyd_error(e) from None

    def _check_count(self, n: int) -> None:
        if n == 0:
            raise ApiError(422, "no_inputs", "no inputs given")
        if n > self.limits.max_inputs_per_request:
            raise ApiError(413, "too_many_inputs",
                           f"{n} inputs in one request; the limit is {self.limits.max_inputs_per_request}")

    def _check_top_k(self, k: Any) -> int:
        try:
            k = int(k)
        except (TypeError, ValueError):
            raise ApiError(422, "invalid_request", f"top_k must be an integer, got {k!r}") from None
        if k < 1:
            raise ApiError(422, "invalid_request", "top_k must be >= 1")
        return min(k, self.limits.max_top_k)

    async def _check_inputs(self, kinds: list[str], raw: list[Any], encoded: bool) -> list[Any]:
        """Every input checked (base64, image header / text) before anything runs; off the event loop
        when images are involved."""
        def run():
            return [check_input(k, x, i, self.limits, encoded) for i, (k, x) in enumerate(zip(kinds, raw))]
        size = sum(len(x) for x in raw if isinstance(x, (str, bytes)))
        return await asyncio.to_thread(run) if "image" in kinds and size > _INLINE_CHECK_BYTES else run()

    async def _dispatch(self, bbs: list[str], items: list[dict], top_k: int) -> list[dict]:
        """ONE call per backbone with all of this request's inputs for it; answers back in order."""
        task_metrics.note_inputs(items)
        groups: dict[str, list[int]] = {}
        for i, b in enumerate(bbs):
            groups.setdefault(b, []).append(i)
        calls = [self.handles[b].predict.remote({"items": [items[i] for i in idx], "top_k": top_k})
                 for b, idx in groups.items()]
        results = await asyncio.gather(*calls)
        out: list[dict | None] = [None] * len(items)
        for idx, res in zip(groups.values(), results):
            if "error" in res:
                j = res.get("index")
                where = f"item {idx[j]}: " if j is not None and len(items) > 1 else ""
                raise ApiError.from_item(res, where)
            for i, p in zip(idx, res["predictions"]):
                out[i] = p
        return out  # type: ignore[return-value]
