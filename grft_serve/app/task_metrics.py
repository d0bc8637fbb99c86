"""Request metrics of the ingress: every request by route, method and status (``grft_requests``,
``grft_request_latency_ms``), and per task: requests, errors, inputs and latency.

One pure ASGI middleware (:class:`RequestMetrics`, no per-request task group) opens a per-request
record (a context variable, so the route code needs no request object to write to it); the
dispatcher notes each task a request resolves (:func:`note`) and the inputs it sends to a backbone
(:func:`note_inputs`). When the response has gone, a request to a
predict route counts once for every task it named: ``grft_task_requests``, ``grft_task_errors``
(status >= 400, wherever it failed: auth aside, after the task resolved), ``grft_task_inputs`` and
``grft_task_latency_ms`` (the whole request). Unknown task ids never become labels (they are not
tasks); the first ``cap`` tasks get their own label and the rest are ``other``
(:class:`~grft_serve.app.metrics.TaskLabels`), so the series stay bounded with any number of tasks.
"""
from __future__ import annotations

import time
from contextvars import ContextVar

from . import metrics as M

__all__ = ["PREDICT_ROUTES", "RequestMetrics", "configure", "note", "note_inputs", "labels"]

PREDICT_ROUTES = frozenset({"/v1/tasks/{task_id}/predict", "/v1/predict", "/v2/models/{task}/infer",
                            "/v2/models/{task}/versions/{version}/infer"})

labels = M.TaskLabels(100)
_current: ContextVar[dict | None] = ContextVar("grft_task_metrics", default=None)


def configure(cap: int) -> None:
    labels.cap = cap


def note(task_id: str, inputs: int = 0) -> None:
    """Count ``task_id`` (resolved, so a real task) in the current request, with ``inputs`` more inputs."""
    acc = _current.get()
    if acc is not None:
        acc[task_id] = acc.get(task_id, 0) + inputs


def note_inputs(items: list) -> None:
    """Count one input for the task of each item (:class:`~.messages.PredictInput`)."""
    for it in items:
        note(it.task, 1)


def record(tasks: dict[str, int], status: int, ms: float) -> None:
    for tid, n in tasks.items():
        tag = {"task": labels(tid)}
        M.inc("grft_task_requests", 1, tag)
        if status >= 400:
            M.inc("grft_task_errors", 1, tag)
        M.inc("grft_task_inputs", n, tag)
        M.observe("grft_task_latency_ms", ms, tag)


class RequestMetrics:
    def __init__(self, app):
        self.app = app

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        acc: dict[str, int] = {}
        token = _current.set(acc)
        status = [500]
        t0 = time.perf_counter()

        async def send_status(msg):
            if msg["type"] == "http.response.start":
                status[0] = msg["status"]
            await send(msg)

        try:
            await self.app(scope, receive, send_status)
        finally:
            _current.reset(token)
            ms = (time.perf_counter() - t0) * 1e3
            route = getattr(scope.get("route"), "path", None)
            endpoint = route or "unmatched"
            M.inc("grft_requests", 1, {"endpoint": endpoint, "method": scope.get("method", ""),
                                       "status": str(status[0])})
            M.observe("grft_request_latency_ms", ms, {"endpoint": endpoint})
            if acc and route in PREDICT_ROUTES:
                record(acc, status[0], ms)
