"""Prometheus metrics of the serving app, recorded through Ray Serve's metrics API.

Ray exports every ``ray.serve.metrics`` metric on each node's metrics port (``ray start
--metrics-export-port``, ``ray.init(_metrics_export_port=...)``) with a ``ray_`` prefix and the Serve tags
(``application``, ``deployment``, ``replica``) added; the ingress also proxies the local node's
``grft_*`` lines at ``GET /metrics``. Each metric object is created lazily inside the replica process
that records it (metric objects must not be pickled into a deployment).

Besides the Ray metric, every recording is mirrored in a plain in-process dict (:func:`snapshot`) so
tests and the ``/v1/backbones`` stats can check what was recorded without waiting for the exporter.
"""
from __future__ import annotations

import threading
from collections import defaultdict

__all__ = ["LATENCY_BOUNDARIES_MS", "OTHER", "SIZE_BOUNDARIES", "SPECS", "TaskLabels", "inc", "local_node_metrics",
           "observe", "set_gauge", "snapshot"]

LATENCY_BOUNDARIES_MS = [1, 2, 5, 10, 20, 50, 100, 200, 500, 1000, 2000, 5000, 10000]
SIZE_BOUNDARIES = [1, 2, 4, 8, 16, 32, 64, 128, 256]

_lock = threading.Lock()
_objs: dict[str, object] = {}
_mirror: dict[str, float] = defaultdict(float)


def _metric(kind: str, name: str, description: str, tag_keys: tuple[str, ...] = (), boundaries=None):
    with _lock:
        m = _objs.get(name)
        if m is None:
            from ray.serve import metrics as sm

            if kind == "counter":
                m = sm.Counter(name, description=description, tag_keys=tag_keys)
            elif kind == "gauge":
                m = sm.Gauge(name, description=description, tag_keys=tag_keys)
            else:
                m = sm.Histogram(name, description=description, boundaries=boundaries, tag_keys=tag_keys)
            _objs[name] = m
        return m


def _key(name: str, tags: dict | None) -> str:
    if not tags:
        return name
    return name + "{" + ",".join(f"{k}={v}" for k, v in sorted(tags.items())) + "}"


def _safe(fn):
    try:
        fn()
    except Exception:  # noqa: BLE001 - metrics must never fail a request (e.g. outside a Ray worker)
        pass


# -- definitions ---------------------------------------------------------------------------------
SPECS = {
    "grft_requests": ("counter", "HTTP requests handled by the ingress", ("endpoint", "method", "status")),
    "grft_request_latency_ms": ("histogram", "Ingress request latency in milliseconds", ("endpoint",),
                                LATENCY_BOUNDARIES_MS),
    "grft_predict_inputs": ("counter", "Inputs predicted", ("backbone",)),
    "grft_batch_size": ("histogram", "Samples per backbone forward (Serve dynamic batch)", ("backbone",),
                        SIZE_BOUNDARIES),
    "grft_tasks_per_batch": ("histogram", "Distinct tasks per backbone forward", ("backbone",), SIZE_BOUNDARIES),
    "grft_batch_latency_ms": ("histogram", "Backbone batch latency (sync + preprocess + forward) in ms",
                              ("backbone",), LATENCY_BOUNDARIES_MS),
    "grft_batches": ("counter", "Backbone forwards by path", ("backbone", "path")),
    "grft_cache_hits": ("counter", "Device task-cache hits", ("backbone",)),
    "grft_cache_misses": ("counter", "Device task-cache misses (host-to-device uploads)", ("backbone",)),
    "grft_cache_evictions": ("counter", "Device task-cache evictions", ("backbone",)),
    "grft_tasks_loaded": ("gauge", "Tasks registered in this replica's engine", ("backbone",)),
    "grft_syncs": ("counter", "Store syncs run by a backbone replica", ("backbone",)),
    "grft_registrations": ("counter", "Task registrations / deletions through the API", ("op", "status")),
    "grft_predict_errors": ("counter", "Inputs of requests a backbone replica could not serve", ("backbone",)),
    "grft_request_in_replica_ms": ("histogram", "Time a request spends in a backbone replica (decode, "
                                   "queue, forward) in ms", ("backbone",), LATENCY_BOUNDARIES_MS),
    # per task (label: the task id, or OTHER beyond the cap; see TaskLabels)
    "grft_task_requests": ("counter", "Predict requests per task (ingress)", ("task",)),
    "grft_task_errors": ("counter", "Predict requests per task answered with an error (ingress)", ("task",)),
    "grft_task_inputs": ("counter", "Inputs sent to a backbone per task (ingress)", ("task",)),
    "grft_task_latency_ms": ("histogram", "Predict request latency per task in ms (ingress)", ("task",),
                             LATENCY_BOUNDARIES_MS),
    "grft_task_residency": ("gauge", "Tasks of this label on each tier (device / host / store) of a backbone "
                            "replica: 1 or 0 for a labelled task, a count for OTHER", ("backbone", "task", "tier")),
    "grft_task_cache_hits": ("counter", "Device task-cache hits per task", ("backbone", "task")),
    "grft_task_cache_misses": ("counter", "Device task-cache misses per task", ("backbone", "task")),
    "grft_task_cache_evictions": ("counter", "Task-cache evictions per task", ("backbone", "task")),
}

OTHER = "other"


class TaskLabels:
    """Bounded task labels: the first ``cap`` task ids a process records get their own label, every
    other task (and a task literally named ``other``) is aggregated under :data:`OTHER`. So a process
    exports at most ``cap + 1`` task series per metric, whatever the number of tasks; the sum over all
    labels is the total."""

    def __init__(self, cap: int = 100):
        self.cap = cap
        self._ids: set[str] = set()
        self._lock = threading.Lock()

    def __call__(self, task_id: str) -> str:
        if task_id in self._ids:
            return task_id
        with self._lock:
            if task_id != OTHER and len(self._ids) < self.cap:
                self._ids.add(task_id)
                return task_id
        return task_id if task_id in self._ids else OTHER

    def labelled(self) -> set[str]:
        with self._lock:
            return set(self._ids)


def _get(name: str):
    kind, desc, tags, *rest = SPECS[name]
    return _metric(kind, name, desc, tags, rest[0] if rest else None)


def inc(name: str, value: float = 1.0, tags: dict | None = None) -> None:
    if value <= 0:
        return
    with _lock:
        _mirror[_key(name, tags)] += value
    _safe(lambda: _get(name).inc(value, tags=dict(tags or {})))


def observe(name: str, value: float, tags: dict | None = None) -> None:
    with _lock:
        _mirror[_key(name, tags) + ":count"] += 1
        _mirror[_key(name, tags) + ":sum"] += value
    _safe(lambda: _get(name).observe(value, tags=dict(tags or {})))


def set_gauge(name: str, value: float, tags: dict | None = None) -> None:
    with _lock:
        _mirror[_key(name, tags)] = value
    _safe(lambda: _get(name).set(value, tags=dict(tags or {})))


def snapshot() -> dict[str, float]:
    """What this process recorded so far (``name{tags}`` → value; histograms as ``:count``/``:sum``)."""
    with _lock:
        return dict(_mirror)


def local_node_metrics(timeout_s: float = 5.0) -> str | None:
    """The Prometheus text of this Ray node's metrics port (None where it has none or cannot be read)."""
    import urllib.request

    import ray

    try:
        node = ray.get_runtime_context().get_node_id()
        port = next((n.get("MetricsExportPort") for n in ray.nodes() if n.get("NodeID") == node), None)
        if not port:
            return None
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=timeout_s) as r:
            return r.read().decode()
    except Exception:  # noqa: BLE001 - no Ray, no port, exporter down: the caller answers 503
        return None
