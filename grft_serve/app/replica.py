"""The backbone server: ONE frozen base (an :class:`~grft_serve.engine.Engine`) per replica.

A plain class (``serve.deployment`` is applied in :mod:`grft_serve.app.build`), so it runs and is
tested without Ray Serve. One call = the inputs of ONE HTTP request for this backbone::

    predict({"items": [{"task", "version", "input"}, ...], "top_k": k})
      │ decode + preprocess in a thread pool (never under the engine lock; overlaps the forward
      │ of the batch before), grouped by the tasks' preprocessing
      ▼
    chunks of <= max_batch_size inputs ──► @serve.batch(batch_size_fn = inputs in the chunks)
      │ chunks of concurrent requests are merged up to max_batch_size INPUTS (not calls)
      ▼
    Engine.run(one merged batch) → answers + a BatchReport (path, tasks, cache hits/misses/evictions)

A request's chunks are answered in order and each answer names the task version that computed it.
Isolation: an input that cannot be decoded fails only its own request (before batching); if a merged
batch raises, each request in it is re-run alone so only the failing one gets the error.

Tasks are loaded lazily: an input for a (task, version) the engine does not hold loads that task from
the store first. A slow background loop drops tasks that were deleted from the store.
"""
from __future__ import annotations

import asyncio
import json
import logging
import os
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any

from ray import serve
from ray.serve.exceptions import RayServeException

from . import metrics as M
from ..core.package import PackageError
from ..store import TaskNotFoundError, content_version
from .config import BackboneDeploymentConfig, Limits, make_store
from .index import TaskIndex
from .inputs import decode_image
from .residency import ReplicaResidency
from .schemas import ApiError, error_item

__all__ = ["BackboneServer", "Chunk", "collate"]

log = logging.getLogger("grft_serve.app")


@dataclass
class Chunk:
    """Preprocessed inputs of one request that share a preprocessing (at most max_batch_size)."""

    batch: Any
    task_ids: list[str]
    prep_key: str
    top_k: int

    def __len__(self) -> int:
        return len(self.task_ids)

    def split(self, size: int) -> list[tuple[slice, "Chunk"]]:
        """Consecutive parts of at most ``size`` inputs, each with the slice of inputs it holds."""
        if len(self) <= size:
            return [(slice(0, len(self)), self)]
        out = []
        for i in range(0, len(self), size):
            s = slice(i, min(i + size, len(self)))
            batch = {k: v[s] for k, v in self.batch.items()} if isinstance(self.batch, dict) else self.batch[s]
            out.append((s, Chunk(batch, self.task_ids[s], self.prep_key, self.top_k)))
        return out


def collate(batches: list[Any], pad_id: int = 0) -> Any:
    """Concatenate preprocessed batches along dim 0; token batches are right-padded to one length."""
    import torch

    if len(batches) == 1:
        return batches[0]
    if isinstance(batches[0], dict):
        length = max(b["input_ids"].shape[1] for b in batches)
        out = {}
        for key in batches[0]:
            fill = pad_id if key == "input_ids" else 0
            out[key] = torch.cat([torch.nn.functional.pad(b[key], (0, length - b[key].shape[1]), value=fill)
                                  for b in batches])
        return out
    return torch.cat(batches)


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
                             max_package_bytes=self.limits.max_package_bytes)
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
                self.engine.register(data, replace=True, version=v)
            except PackageError as e:
                self._bad.add((tid, v))
                log.warning("backbone %s: stored task %r (version %s) failed validation: %s", self.name, tid, v, e)
                raise ApiError(422, "broken_task", f"stored task {tid!r} failed validation: {e.message}") from None
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
            if t.task_id not in want:
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
                "metrics": M.snapshot()}

    async def validate(self, data: bytes) -> dict:
        """Fully validate a package against this base (nothing is registered)."""
        def run():
            try:
                pkg = self.engine.validate(data)
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
        loop = asyncio.get_running_loop()
        try:
            groups = await loop.run_in_executor(self._pool, self.prepare_inputs, items, top_k)
        except ApiError as e:
            return {**e.item(), "index": e.extra.get("index")}
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
                return {**res, "index": idx[0]}
            for i, answer in zip(idx, res["answers"]):
                out[i] = answer
        M.observe("grft_request_in_replica_ms", (time.perf_counter() - t0) * 1e3, self.tags)
        return {"predictions": out}

    def prepare_inputs(self, items: list[dict], top_k: int) -> list[tuple[list[int], Chunk]]:
        """Decode and preprocess one request's inputs, grouped by their tasks' preprocessing."""
        for tid, version in dict.fromkeys((it["task"], it.get("version")) for it in items):
            self.ensure_task(tid, version)
        by_prep: dict[str, list[int]] = {}
        preps: dict[str, dict] = {}
        for i, it in enumerate(items):
            try:
                prep = self.engine.task(it["task"]).meta.preprocessing
            except KeyError:
                raise ApiError(404, "unknown_task", f"unknown task {it['task']!r}", index=i) from None
            key = json.dumps(prep, sort_keys=True, default=str)
            by_prep.setdefault(key, []).append(i)
            preps[key] = prep
        out = []
        for key, idx in by_prep.items():
            raws = []
            for i in idx:
                x = items[i]["input"]
                try:
                    raws.append(decode_image(x, self.limits, i) if self.kind == "image" else x)
                except ApiError as e:
                    e.extra["index"] = i
                    raise
            try:
                batch = self.engine.backbone.preprocess(raws, preps[key])
            except Exception as e:  # noqa: BLE001 - this request's inputs only
                raise ApiError(422, "bad_input", f"cannot preprocess the inputs ({type(e).__name__})",
                               index=idx[0]) from None
            out.append((idx, Chunk(batch, [items[i]["task"] for i in idx], key, top_k)))
        return out

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
                answers = self._forward([chunks[j] for j in js])
                for j, a in zip(js, answers):
                    out[j] = {"answers": a}
            except Exception:  # noqa: BLE001 - find the request that breaks the batch; fail only it
                if len(js) > 1:
                    log.warning("backbone %s: a batch of %d requests failed; re-running them one by one",
                                self.name, len(js))
                for j in js:
                    try:
                        out[j] = {"answers": self._forward([chunks[j]])[0]}
                    except ApiError as e:
                        out[j] = e.item()
                    except Exception:  # noqa: BLE001
                        log.exception("backbone %s: request failed", self.name)
                        out[j] = error_item(500, "internal", "the backbone failed on this request")
        return out  # type: ignore[return-value]

    def _forward(self, chunks: list[Chunk]) -> list[list[dict]]:
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
            out.append([{**a, "top_k": a["top_k"][:c.top_k], **extra} for a in part])
        M.inc("grft_batches", 1, {**self.tags, "path": rep.path})
        M.observe("grft_batch_size", len(tids), self.tags)
        M.observe("grft_tasks_per_batch", n_tasks, self.tags)
        M.inc("grft_predict_inputs", len(tids), self.tags)
        for c in ("cache_hits", "cache_misses", "cache_evictions"):
            M.inc(f"grft_{c}", getattr(rep, c), self.tags)
        M.observe("grft_batch_latency_ms", (time.perf_counter() - t0) * 1e3, self.tags)
        return out

