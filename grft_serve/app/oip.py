"""Open Inference Protocol v2 (KServe / Triton HTTP) routes: one model per task, id = task id.

::

    GET  /v2/health/live | /v2/health/ready          open, like /healthz
    GET  /v2                                         server metadata (extensions)
    GET  /v2/models/{task}[/versions/{v}]            metadata: BYTES images|texts in; FP32 probabilities,
                                                     BYTES labels out (see :mod:`.oip_codec`)
    GET  /v2/models/{task}[/versions/{v}]/ready      200 when the task can be served
    GET  /v2/models/{task}[/versions/{v}]/config     backbone, labels, batch limit
    POST /v2/models/{task}[/versions/{v}]/infer      JSON or binary tensor data
    POST /v2/repository/index                        every stored task, READY or UNAVAILABLE (reason)
    POST /v2/repository/models/{task}/load | unload  pin the task on the device of EVERY replica / unpin

A model version is the task's version (content hash); another version in a path is 404. Inference
runs through the same checks and the same dispatch as ``/v1`` (one call per request and backbone).
Load / unload record a pin beside the stored packages (:mod:`.residency`) that every backbone
replica applies at its next sync; they answer once every live replica of the task's backbone
reports it (or after a bounded wait). Registering packages stays ``POST /v1/tasks``.

Auth is the ``/v1`` rule: reads and inference need the read token when one is set, load / unload the
admin token. Errors carry the ``/v1`` statuses in the protocol's ``{"error": "<message>"}`` shape
(:class:`OipErrorShape` rewrites every error answer under ``/v2``, FastAPI's own 404/405/422 too).
"""
from __future__ import annotations

import asyncio
import json
import logging
import time

import numpy as np
from fastapi import Request
from fastapi.responses import JSONResponse, Response

from .. import __version__
from ..core.package import valid_task_id
from .api import api
from .oip_codec import HEADER, infer_response, input_name, model_metadata, parse_infer
from .schemas import ApiError

__all__ = ["OipRoutes", "OipErrorShape"]

log = logging.getLogger("grft_serve.app")

_TAGS = ["open inference protocol v2"]
_SMALL_BODY = 1 << 16
_MODEL = ["/v2/models/{task}", "/v2/models/{task}/versions/{version}"]


def _routes(method, suffix: str = "", **kw):
    """Register one handler for the unversioned and the versioned model path."""
    def deco(fn):
        for path in _MODEL:
            fn = method(path + suffix, tags=_TAGS, **kw)(fn)
        return fn
    return deco


class OipRoutes:
    """Mixed into the ingress: uses its guard, task resolution, input checks and dispatch."""

    async def _oip_model(self, task: str, version: str | None) -> tuple[str, str, dict, dict]:
        """(backbone, version, task metadata, backbone info); statuses as ``/v1``, 404 for another version."""
        bb, v = await self._resolve(task)
        if version not in (None, "", v):
            raise ApiError(404, "unknown_version", f"task {task!r} is at version {v}, not {version!r}")
        e = await self._entry(task)
        return bb, v, e.meta, (await self.backbones())[bb]

    # -- server -----------------------------------------------------------------------------------
    @api.get("/v2/health/live", tags=_TAGS, summary="Liveness")
    async def oip_live(self) -> dict:
        return {"live": True}

    @api.get("/v2/health/ready", tags=_TAGS, summary="Readiness: every backbone deployment answered")
    async def oip_ready(self) -> dict:
        try:
            await asyncio.wait_for(self.backbones(), timeout=10)
        except Exception:  # noqa: BLE001
            raise ApiError(503, "unavailable", "backbones not ready") from None
        return {"ready": True}

    @api.get("/v2", tags=_TAGS, summary="Server metadata")
    async def oip_server(self, request: Request) -> dict:
        self.guard.reader(request)
        return {"name": "grft-serve", "version": __version__,
                "extensions": ["binary_tensor_data", "model_repository", "model_configuration"]}

    # -- models -----------------------------------------------------------------------------------
    @_routes(api.get, summary="Model (task) metadata")
    async def oip_model(self, task: str, request: Request, version: str | None = None) -> dict:
        self.guard.reader(request)
        _, v, meta, info = await self._oip_model(task, version)
        return model_metadata(task, v, info["kind"], len(meta.get("labels", [])))

    @_routes(api.get, "/ready", summary="Model (task) readiness")
    async def oip_model_ready(self, task: str, request: Request, version: str | None = None) -> dict:
        self.guard.reader(request)
        _, v, _, _ = await self._oip_model(task, version)
        return {"name": task, "version": v, "ready": True}

    @_routes(api.get, "/config", summary="Model (task) configuration")
    async def oip_model_config(self, task: str, request: Request, version: str | None = None) -> dict:
        self.guard.reader(request)
        bb, v, meta, info = await self._oip_model(task, version)
        md = model_metadata(task, v, info["kind"], len(meta.get("labels", [])))
        return {"name": task, "platform": "grft", "backbone": bb, "base_model_id": meta.get("base_model_id", ""),
                "max_batch_size": self.limits.max_inputs_per_request, "labels": meta.get("labels", []),
                "input": md["inputs"], "output": md["outputs"]}

    @_routes(api.post, "/infer", summary="Inference (JSON or binary tensor data)")
    async def oip_infer(self, task: str, request: Request, version: str | None = None) -> Response:
        self.guard.reader(request)
        bb, v, meta, info = await self._oip_model(task, version)
        kind, labels = info["kind"], meta.get("labels", [])
        body = await self.guard.body(request, self.limits.max_request_bytes)
        header = request.headers.get(HEADER)
        args = (body, header, input_name(kind), self.limits)
        req = await asyncio.to_thread(parse_infer, *args) if len(body) > 65536 else parse_infer(*args)
        self._check_count(len(req.values))
        raw = req.values
        if req.binary and kind == "text":
            raw = [_utf8(x, i) for i, x in enumerate(raw)]
        inputs = await self._check_inputs([kind] * len(raw), raw, not req.binary)
        items = [{"task": task, "version": v, "input": x} for x in inputs]
        preds = await self._dispatch([bb] * len(items), items, len(labels))
        col = {lab: j for j, lab in enumerate(labels)}
        probs = np.zeros((len(preds), len(labels)), dtype=np.float32)
        for i, p in enumerate(preds):
            for t in p["top_k"]:
                j = col.get(t["label"])
                if j is None:  # the task was replaced by one with other labels during this request
                    raise ApiError(409, "task_changed", f"task {task!r} changed during the request; retry")
                probs[i, j] = t["score"]
        content, headers = infer_response(task, preds[0]["version"], probs, [p["label"] for p in preds],
                                          req.outputs, req.id)
        return Response(content, headers=headers)

    # -- repository extension ---------------------------------------------------------------------
    @api.post("/v2/repository/index", tags=_TAGS, summary="Every stored task (READY / UNAVAILABLE)")
    async def oip_index(self, request: Request):
        self.guard.reader(request)
        body = await self._small_json(request)
        ready_only = isinstance(body, dict) and body.get("ready") is True
        entries = await asyncio.to_thread(self.index.snapshot)
        fps = {i["fingerprint"] for i in (await self.backbones()).values()}
        out = []
        for tid, e in sorted(entries.items()):
            reason = e.broken or ("" if e.fingerprint in fps else "no backbone of this app serves its base")
            if reason and ready_only:
                continue
            out.append({"name": tid, "version": e.version, "state": "UNAVAILABLE" if reason else "READY",
                        "reason": reason})
        return JSONResponse(out)

    @api.post("/v2/repository/models/{task}/load", tags=_TAGS, summary="Pin a task on every replica")
    async def oip_load(self, task: str, request: Request) -> dict:
        """Keeps the task on the device tier of every replica of its backbone (it no longer takes part
        in LRU eviction) until it is unloaded or deleted."""
        self.guard.admin(request)
        await self._repository_body(request)
        bb, _ = await self._resolve(task)
        state = self._pin_state()
        await asyncio.to_thread(state.pin, task)
        await self._await_replicas(task, bb, True)
        return {}

    @api.post("/v2/repository/models/{task}/unload", tags=_TAGS, summary="Unpin a task on every replica")
    async def oip_unload(self, task: str, request: Request) -> dict:
        """Releases the pin: the task stays registered and servable, and goes back to the LRU tiers."""
        self.guard.admin(request)
        await self._repository_body(request)
        state = self._pin_state()
        if not valid_task_id(task):
            raise ApiError(404, "unknown_task", f"unknown task {task!r}")
        had = await asyncio.to_thread(state.unpin, task)
        e = await asyncio.to_thread(self.index.get, task)
        if e is None:
            if had:
                return {}  # the task was deleted; its pin is gone now
            raise ApiError(404, "unknown_task", f"unknown task {task!r}")
        bb = await self._backbone_for(e.fingerprint, e.meta.get("kind", "classification"))
        if bb is not None and not e.broken:
            await self._await_replicas(task, bb, False)
        return {}

    def _pin_state(self):
        if self.residency.state is None:
            raise ApiError(501, "not_supported", "this app's task store keeps no pins (a directory store does)")
        return self.residency.state

    async def _small_json(self, request: Request):
        """An optional small JSON body (empty: ``{}``)."""
        data = await self.guard.body(request, _SMALL_BODY)
        return await self.guard.json(request, _SMALL_BODY) if data.strip() else {}  # re-reads the cached body

    async def _repository_body(self, request: Request) -> None:
        body = await self._small_json(request)
        params = body.get("parameters") if isinstance(body, dict) else None
        if isinstance(params, dict) and any(k == "config" or k.startswith("file:") for k in params):
            raise ApiError(400, "not_supported", "loading a model from a config or files is not supported: "
                                                 "register task packages with POST /v1/tasks")

    async def _await_replicas(self, task: str, backbone: str, pinned: bool) -> None:
        """Wait (bounded: a few sync intervals) until every live replica of ``backbone`` applied the pin."""
        deadline = time.monotonic() + 3 * self.cfg.sync_interval_s + 5
        while not await asyncio.to_thread(self.residency.applied, task, backbone, pinned):
            if time.monotonic() > deadline:
                log.warning("task %s: not every replica of %s reports pinned=%s yet", task, backbone, pinned)
                return
            await asyncio.sleep(min(0.2, self.cfg.sync_interval_s / 4))


def _utf8(x: bytes, i: int) -> str:
    try:
        return x.decode("utf-8")
    except UnicodeDecodeError:
        raise ApiError(422, "invalid_input", f"input {i}: text is not UTF-8") from None


class OipErrorShape:
    """ASGI middleware: under ``/v2``, error answers leave as ``{"error": "<message>"}`` (same status
    and headers); an unhandled exception there becomes a logged 500 with a generic message."""

    def __init__(self, app):
        self.app = app

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http" or not scope.get("path", "").startswith("/v2"):
            return await self.app(scope, receive, send)
        held: dict = {}
        chunks: list[bytes] = []
        started = False

        async def reshape(msg):
            nonlocal started
            if msg["type"] == "http.response.start":
                started = True
                if msg["status"] < 400:
                    return await send(msg)
                held["start"] = msg
                return None
            if "start" not in held:
                return await send(msg)
            chunks.append(msg.get("body", b""))
            if msg.get("more_body"):
                return None
            await _send_error(send, held["start"], b"".join(chunks))
            return None

        try:
            await self.app(scope, receive, reshape)
        except Exception:
            if started:
                raise
            log.exception("unhandled error")
            await _send_error(send, {"type": "http.response.start", "status": 500, "headers": []},
                              json.dumps({"error": "internal server error (see the server log)"}).encode())


async def _send_error(send, start: dict, body: bytes) -> None:
    try:
        err = json.loads(body).get("error")
        msg = err.get("message", "") if isinstance(err, dict) else err
        body = json.dumps({"error": str(msg)}).encode()
    except (ValueError, AttributeError):
        body = json.dumps({"error": body.decode("utf-8", "replace")}).encode()
    headers = [(k, v) for k, v in start.get("headers", []) if k.lower() not in (b"content-length", b"content-type")]
    headers += [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode())]
    await send({**start, "headers": headers})
    await send({"type": "http.response.body", "body": body})


api.add_middleware(OipErrorShape)
