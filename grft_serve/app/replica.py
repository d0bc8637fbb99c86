"""The backbone server: ONE frozen base (an :class:`~grft_serve.engine.Engine`) per replica.

A plain class (``serve.deployment`` is applied in :mod:`grft_serve.app.build`), so it runs and is
tested without Ray Serve. One call = the inputs of ONE HTTP request for this backbone::

    predict({"items": [{"task", "version", "input"}, ...], "top_k": k})
      │ decode + preprocess in a thread pool (never under the engine lock; overlaps the forward
      │ of the batch before), grouped by the tasks' preprocessing, image by image, in slices that
      │ interleave requests (:mod:`.prepare`); a cancelled call stops its decode
      ▼
    chunks of <= max_batch_size inputs ──► @serve.batch(batch_size_fn = inputs in the chunks)
      │ chunks of concurrent requests are merged up to max_batch_size INPUTS (not calls)
      ▼
    Engine.run(one merged batch) → answers + a BatchReport (path, tasks, cache hits/misses/evictions)

A request's chunks are answered in order and each answer names the task version that computed it.
Isolation: an input that cannot be decoded fails only its own request (before batching); if a merged
batch raises, each request in it is re-run alone so only the failing one gets the error; an input
whose scores are not finite numbers fails its request with 422 ``non_finite_result``.

Tasks are loaded lazily: an input for a (task, version) the engine does not hold loads that task from
the store first (registered with the store, so a host tier capped by ``host_cache_bytes`` may drop it
and reload it), and serves it only if the base can run its preprocessing (:mod:`.runnable`; else 422
``broken_task``). A slow background loop drops tasks that were deleted from the store.
"""
from __future__ import annotations

import asyncio
import json
import logging
import math
import os
import threading
import time
from concurrent.futures import ThreadPoolExecutor

from ray import serve
from ray.serve.exceptions import RayServeException

from ..core.package import PackageError, PreprocessingUnrunnableError
from . import metrics as M
from ..store import TaskNotFoundError, content_version
from .config import BackboneDeploymentConfig, Limits, make_store
from .index import TaskIndex
from .prepare import Chunk, Prepare, collate
from .residency import ReplicaResidency
from .runnable import TEMP_PREFIX, RunnableCheck
from .schemas import ApiError, error_item

__all__ = ["BackboneServer", "Chunk", "collate"]

log = logging.getLogger("grft_serve.app")


def _n_inputs(chunks: list[Chunk]) -> int:
    return sum(len(c) for c in chunks)


def _replica_id() -> str:
    try:
        ctx = serve.get_replica_context()
        rid = getattr(ctx, "replica_id", None)
        return getattr(rid, "unique_id", None) or getattr(ctx, "replica_tag", "") or str(os.getpid())
    except Exception:  # noqa: BLE001 - outside Serve
        return str(os.getpid())


class BackboneServer:
    """Owns one engine; answers whole requests; batches across concurrent requests by inputs."""

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
        self.runnable = RunnableCheck(self.engine, self.spec.max_input_pixels)
        self.kind = backbone.kind
        tok = getattr(backbone, "tokenizer", None)
        self._pad_id = int(getattr(tok, "pad_token_id", 0) or 0)
        self.store = make_store(store)
        self.index = TaskIndex(self.store, ttl_s=0.0)
        self.replica = _replica_id()
        self.residency = ReplicaResidency(self.engine, self.store, self.ensure_task, self.name, self.replica,
                                          metrics_task_label_cap)  # pins, reports, per-task metrics
        self._pool = ThreadPoolExecutor(self.spec.decode_workers, thread_name_prefix=f"grft-decode-{self.name}")
        self._load_lock = threading.Lock()
        self._bad: set[tuple[str, str]] = set()  # (task, version) that failed validation here
        self.decode_aborts = {"cancelled": 0}
        self._batched = self._batcher()
        self._stop = threading.Event()
        self._interval = sync_interval_s
        self.last_sync: dict = {}
        threading.Thread(target=self._sync_loop, name="grft-sync", daemon=True).start()

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
                raise ApiError(422, "broken_task", f"stored task {tid!r} (version {v}) failed validation")
            try:
                self.engine.register(data, replace=True, version=v, store=self.store)
            except PackageError as e:
                self._bad.add((tid, v))
                log.warning("backbone %s: stored task %r (version %s) failed validation: %s", self.name, tid, v, e)
                raise ApiError(422, "broken_task", f"stored task {tid!r} failed validation: {e.message}") from None
            try:
                self.runnable.check_registered(tid)
            except PreprocessingUnrunnableError as e:
                self.engine.unregister(tid)
                self._bad.add((tid, v))
                log.warning("backbone %s: stored task %r (version %s) cannot run: %s", self.name, tid, v, e)
                raise ApiError(422, "broken_task", f"stored task {tid!r} cannot be served: this base cannot run "
                                                   "its preprocessing") from None
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
        return {"name": self.name, "kind": self.kind, "model_id": self.engine.spec.model_id,
                "fingerprint": self.engine.spec.fingerprint, "feature_dim": self.engine.spec.feature_dim,
                "max_length": getattr(bb, "max_length", None), "device": str(self.engine.device),
                "dtype": str(self.engine.dtype).replace("torch.", ""), "replicas": self.spec.replicas,
                "max_batch_size": self.spec.max_batch_size, "batch_wait_timeout_s": self.spec.batch_wait_timeout_s}

    def stats(self) -> dict:
        return {"replica": self.replica, "engine": self.engine.stats(),
                "tasks": {t.task_id: t.version for t in self.engine.tasks()}, "last_sync": self.last_sync,
                "decode_aborts": dict(self.decode_aborts), "metrics": M.snapshot()}

    async def validate(self, data: bytes) -> dict:
        """Fully validate a package against this base, including a dry run of its preprocessing
        (:mod:`.runnable`); nothing stays registered."""
        def run():
            try:
                pkg = self.engine.validate(data)
                self.runnable.check_package(pkg)
            except PackageError as e:
                return {"ok": False, "status": e.status, "code": e.code, "message": e.message}
            return {"ok": True, "num_params": pkg.num_params(), "meta": json.loads(pkg.meta.model_dump_json())}
        return await asyncio.get_running_loop().run_in_executor(self._pool, run)

    # -- predict ----------------------------------------------------------------------------------
    async def predict(self, request: dict) -> dict:
        """All inputs of one request for this backbone → ``{"predictions": [...]}`` in input order, or
        ``{"error": {...}, "index": i}`` for the first input that could not be served."""
        t0 = time.perf_counter()
        items, top_k = request["items"], int(request.get("top_k", 5))
        job = Prepare(self.engine, self.kind, self.limits, self.ensure_task, items, top_k)
        loop = asyncio.get_running_loop()
        try:
            while not job.done:  # one slice at a time: other requests' slices queue in between
                await loop.run_in_executor(self._pool, job.step)
        except asyncio.CancelledError:  # the caller is gone (e.g. the HTTP client disconnected)
            job.cancel.set()
            self.decode_aborts["cancelled"] += 1
            raise
        except ApiError as e:
            return {**e.item(), "index": e.extra.get("index")}
        groups = job.groups
        chunks, order = [], []
        for idx, chunk in groups:
            for s, part in chunk.split(self.spec.max_batch_size):
                chunks.append(part)
                order.append(idx[s])
        results = await asyncio.gather(*(self._batched(c) for c in chunks))
        out: list[dict | None] = [None] * len(items)
        for idx, res in zip(order, results):
            if "error" in res:
                M.inc("grft_predict_errors", len(items), self.tags)
                return {"error": res["error"], "index": idx[res.get("at", 0)]}
            for i, answer in zip(idx, res["answers"]):
                out[i] = answer
        M.observe("grft_request_in_replica_ms", (time.perf_counter() - t0) * 1e3, self.tags)
        return {"predictions": out}

    def prepare_inputs(self, items: list[dict], top_k: int) -> list[tuple[list[int], Chunk]]:
        """Decode and preprocess one request's inputs at once (see :class:`~.prepare.Prepare`)."""
        job = Prepare(self.engine, self.kind, self.limits, self.ensure_task, items, top_k)
        while not job.done:
            job.step()
        return job.groups

    def _batcher(self):
        """Inside Serve: ``@serve.batch`` counting INPUTS (``batch_size_fn``), so chunks of concurrent
        requests merge up to ``max_batch_size`` inputs. Outside Serve (unit tests, embedding the class
        elsewhere) each chunk runs as its own batch."""
        async def run(chunks: list[Chunk]) -> list[dict]:
            return await asyncio.to_thread(self.run_chunks, chunks)

        try:
            serve.get_replica_context()
        except RayServeException:
            async def single(chunk: Chunk) -> dict:
                return (await run([chunk]))[0]
            return single
        return serve.batch(max_batch_size=self.spec.max_batch_size, batch_wait_timeout_s=self.spec.batch_wait_timeout_s,
                           batch_size_fn=_n_inputs)(run)

    def run_chunks(self, chunks: list[Chunk]) -> list[dict]:
        """Run chunks of several requests as one forward per preprocessing; isolate failures."""
        out: list[dict | None] = [None] * len(chunks)
        by_prep: dict[str, list[int]] = {}
        for j, c in enumerate(chunks):
            by_prep.setdefault(c.prep_key, []).append(j)
        for js in by_prep.values():
            try:
                for j, res in zip(js, self._forward([chunks[j] for j in js])):
                    out[j] = res
            except Exception:  # noqa: BLE001 - find the request that breaks the batch; fail only it
                if len(js) > 1:
                    log.warning("backbone %s: a batch of %d requests failed; re-running them one by one",
                                self.name, len(js))
                for j in js:
                    try:
                        out[j] = self._forward([chunks[j]])[0]
                    except ApiError as e:
                        out[j] = e.item()
                    except Exception:  # noqa: BLE001
                        log.exception("backbone %s: request failed", self.name)
                        out[j] = error_item(500, "internal", "the backbone failed on this request")
        return out  # type: ignore[return-value]

    def _forward(self, chunks: list[Chunk]) -> list[dict]:
        """One forward for ``chunks``: per chunk ``{"answers": [...]}``, or an error item (with ``at``, the
        input within the chunk) when an input's scores are not finite."""
        t0 = time.perf_counter()
        batch = collate([c.batch for c in chunks], self._pad_id)
        tids = [t for c in chunks for t in c.task_ids]
        try:
            res = self.engine.run(batch, tids, top_k=max(c.top_k for c in chunks))
        except KeyError as e:  # a task was deleted between its request's check and this batch
            raise ApiError(404, "unknown_task", str(e)) from None
        rep = res.report
        n_tasks = len(rep.tasks)
        extra = {"backbone": self.name, "replica": self.replica, "batch_size": len(tids), "batch_tasks": n_tasks}
        out, pos = [], 0
        for c in chunks:
            part = res.answers[pos:pos + len(c)]
            pos += len(c)
            bad = next((k for k, a in enumerate(part) if not all(math.isfinite(t["score"]) for t in a["top_k"])), None)
            if bad is not None:
                err = error_item(422, "non_finite_result", f"task {part[bad]['task']!r} gives scores that are "
                                                           "not finite numbers for this input")
                out.append({**err, "at": bad})
                continue
            out.append({"answers": [{**a, "top_k": a["top_k"][:c.top_k], **extra} for a in part]})
        M.inc("grft_batches", 1, {**self.tags, "path": rep.path})
        M.observe("grft_batch_size", len(tids), self.tags)
        M.observe("grft_tasks_per_batch", n_tasks, self.tags)
        M.inc("grft_predict_inputs", len(tids), self.tags)
        for c in ("cache_hits", "cache_misses", "cache_evictions"):
            M.inc(f"grft_{c}", getattr(rep, c), self.tags)
        M.observe("grft_batch_latency_ms", (time.perf_counter() - t0) * 1e3, self.tags)
        return out

