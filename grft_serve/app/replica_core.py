"""What every backbone replica does besides its data path: one engine, its tasks, the store.

:class:`ReplicaCore` builds the backbone (:func:`~grft_serve.core.backbones.load_backbone`) and ONE
:class:`~grft_serve.engine.Engine` over it from a :class:`~.config.BackboneDeploymentConfig`, and owns
the replica's side of the consistency rules:

* **lazy loading** (:meth:`ReplicaCore.ensure_task`): a request for a (task, version) the engine does
  not hold loads that task from the store first (registered *with* the store, so a host tier capped
  by ``host_cache_bytes`` may drop it and reload it); a stored package that fails validation — or
  that the subclass cannot run (:meth:`check_runnable`) — is remembered per version and answered 422
  ``broken_task``;
* **sync**: a slow background loop drops tasks deleted from the store and applies pins / reports
  residency (:class:`~.residency.ReplicaResidency`);
* the small RPCs every backbone answers: ``info``, ``stats``, ``validate`` (a full validation against
  this base, nothing registered).

The data paths are subclasses: :class:`~.replica.BackboneServer` (classification, batched by inputs)
and :class:`~.generation.GenerationServer` (text generation, one decode loop).
"""
from __future__ import annotations

import asyncio
import json
import logging
import os
import threading
import time
from concurrent.futures import ThreadPoolExecutor

from ray import serve

from ..core.package import PackageError, TaskPackage
from ..store import TaskNotFoundError, content_version
from . import metrics as M
from .config import BackboneDeploymentConfig, Limits, make_store
from .index import TaskIndex
from .residency import ReplicaResidency
from .runnable import TEMP_PREFIX
from .schemas import ApiError

__all__ = ["ReplicaCore", "replica_id"]

log = logging.getLogger("grft_serve.app")


def replica_id() -> str:
    try:
        ctx = serve.get_replica_context()
        rid = getattr(ctx, "replica_id", None)
        return getattr(rid, "unique_id", None) or getattr(ctx, "replica_tag", "") or str(os.getpid())
    except Exception:  # noqa: BLE001 - outside Serve
        return str(os.getpid())


class ReplicaCore:
    """One engine and its tasks (see the module docstring); subclasses add the data path and call
    :meth:`start` at the end of their ``__init__``."""

    def __init__(self, spec: dict, store: dict, limits: dict, sync_interval_s: float = 2.0,
                 metrics_task_label_cap: int = 100):
        import torch

        from ..core.backbones import load_backbone
        from ..core.device import resolve_device, resolve_dtype
        from ..engine import Engine

        self.spec = BackboneDeploymentConfig(**spec)
        self.limits = Limits(**limits)
        self.name = self.spec.name
        self.tags = {"backbone": self.name}
        if self.spec.torch_threads:
            torch.set_num_threads(self.spec.torch_threads)
        device = str(resolve_device(self.spec.device))
        dtype = resolve_dtype(self.spec.dtype, device)
        if self.spec.seed is not None:
            torch.manual_seed(self.spec.seed)
        backbone = load_backbone(self.spec.backbone)
        self.engine = Engine(backbone, device=device, dtype=getattr(torch, dtype),
                             device_cache_bytes=self.spec.device_cache_bytes,
                             host_cache_bytes=self.spec.host_cache_bytes,
                             max_package_bytes=self.limits.max_package_bytes)
        self.kind = backbone.kind
        self.store = make_store(store)
        self.index = TaskIndex(self.store, ttl_s=0.0)
        self.replica = replica_id()
        self.residency = ReplicaResidency(self.engine, self.store, self.ensure_task, self.name, self.replica,
                                          metrics_task_label_cap)  # pins, reports, per-task metrics
        self._pool = ThreadPoolExecutor(self.spec.decode_workers, thread_name_prefix=f"grft-decode-{self.name}")
        self._load_lock = threading.Lock()
        self._bad: set[tuple[str, str]] = set()  # (task, version) that failed validation or cannot run here
        self._stop = threading.Event()
        self._interval = sync_interval_s
        self.last_sync: dict = {}

    def start(self) -> None:
        """Start the background store sync (once the subclass is ready to load tasks)."""
        threading.Thread(target=self._sync_loop, name="grft-sync", daemon=True).start()

    # -- what a subclass decides ----------------------------------------------------------------
    def check_runnable(self, task_id: str) -> str | None:
        """Why the registered ``task_id`` cannot be served here (None: it can)."""
        return None

    def check_package(self, pkg: TaskPackage) -> None:
        """Raise a ``PackageError`` if a validated package could not be served here."""

    # -- task loading ---------------------------------------------------------------------------
    def ensure_task(self, tid: str, version: str | None) -> None:
        """Make the engine hold ``tid`` at ``version`` (or the store's current one), loading it lazily."""
        if self._holds(tid, version):
            return
        with self._load_lock:
            if self._holds(tid, version):
                return
            have = self._holds(tid, None)
            try:
                data = self.store.get(tid)
            except (TaskNotFoundError, ValueError):
                if have:  # deleted from the store since: stop serving it
                    self.engine.unregister(tid)
                raise ApiError(404, "unknown_task", f"unknown task {tid!r}") from None
            v = content_version(data)
            if (tid, v) in self._bad:
                raise ApiError(422, "broken_task", f"stored task {tid!r} (version {v}) cannot be served here")
            try:
                self.engine.register(data, replace=True, version=v, store=self.store)
            except PackageError as e:
                self._bad.add((tid, v))
                log.warning("backbone %s: stored task %r (version %s) failed validation: %s", self.name, tid, v, e)
                raise ApiError(422, "broken_task", f"stored task {tid!r} failed validation: {e.message}") from None
            why = self.check_runnable(tid)
            if why is not None:
                self.engine.unregister(tid)
                self._bad.add((tid, v))
                log.warning("backbone %s: stored task %r (version %s) cannot run: %s", self.name, tid, v, why)
                raise ApiError(422, "broken_task", f"stored task {tid!r} cannot be served: {why}")
            M.set_gauge("grft_tasks_loaded", len(self.engine.tasks()), self.tags)

    def _holds(self, tid: str, version: str | None) -> bool:
        try:
            info = self.engine.task(tid)
        except KeyError:
            return False
        return version is None or info.version == version

    def sync(self) -> dict:
        """Drop tasks that are gone from the store (or were replaced by a package of another base)."""
        want = self.index.versions_for(self.engine.spec.fingerprint)
        removed = []
        for t in self.engine.tasks():
            if t.task_id not in want and not t.task_id.startswith(TEMP_PREFIX):
                try:
                    self.engine.unregister(t.task_id)
                    removed.append(t.task_id)
                except KeyError:
                    pass
        self.last_sync = {"removed": removed, "at": time.time(), **self.residency.sync(want)}
        M.inc("grft_syncs", 1, self.tags)
        M.set_gauge("grft_tasks_loaded", len(self.engine.tasks()), self.tags)
        return self.last_sync

    def _sync_loop(self) -> None:
        while not self._stop.wait(self._interval):
            try:
                self.sync()
            except Exception:  # noqa: BLE001 - keep syncing
                log.exception("background sync failed")

    def close(self) -> None:
        self._stop.set()
        self._pool.shutdown(wait=False, cancel_futures=True)

    def __del__(self):
        stop = getattr(self, "_stop", None)
        if stop is not None:
            stop.set()

    # -- small RPCs -------------------------------------------------------------------------------
    def info(self) -> dict:
        bb = self.engine.backbone
        return {"name": self.name, "kind": self.kind, "task_kind": self.engine.spec.task_kind,
                "model_id": self.engine.spec.model_id, "fingerprint": self.engine.spec.fingerprint,
                "feature_dim": self.engine.spec.feature_dim, "max_length": getattr(bb, "max_length", None),
                "device": str(self.engine.device), "dtype": str(self.engine.dtype).replace("torch.", ""),
                "replicas": self.spec.replicas}

    def stats(self) -> dict:
        return {"replica": self.replica, "engine": self.engine.stats(),
                "tasks": {t.task_id: t.version for t in self.engine.tasks()}, "last_sync": self.last_sync,
                "metrics": M.snapshot()}

    async def validate(self, data: bytes) -> dict:
        """Fully validate a package against this base, and that it can be served here
        (:meth:`check_package`); nothing stays registered."""
        def run():
            try:
                pkg = self.engine.validate(data)
                self.check_package(pkg)
            except PackageError as e:
                return {"ok": False, "status": e.status, "code": e.code, "message": e.message}
            return {"ok": True, "num_params": pkg.num_params(), "meta": json.loads(pkg.meta.model_dump_json())}
        return await asyncio.get_running_loop().run_in_executor(self._pool, run)
