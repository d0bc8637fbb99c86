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
import logging
import math
import time

from ray import serve
from ray.serve.exceptions import RayServeException

from ..core.package import PreprocessingUnrunnableError, TaskPackage
from . import metrics as M
from .prepare import Chunk, Prepare, collate
from .replica_core import ReplicaCore
from .runnable import RunnableCheck
from .schemas import ApiError, error_item

__all__ = ["BackboneServer", "Chunk", "collate"]

log = logging.getLogger("grft_serve.app")


def _n_inputs(chunks: list[Chunk]) -> int:
    return sum(len(c) for c in chunks)


class BackboneServer(ReplicaCore):
    """Owns one engine; answers whole requests; batches across concurrent requests by inputs."""

    def __init__(self, spec: dict, store: dict, limits: dict, sync_interval_s: float = 2.0,
                 metrics_task_label_cap: int = 100):
        super().__init__(spec, store, limits, sync_interval_s, metrics_task_label_cap)
        self.runnable = RunnableCheck(self.engine, self.spec.max_input_pixels)
        tok = getattr(self.engine.backbone, "tokenizer", None)
        self._pad_id = int(getattr(tok, "pad_token_id", 0) or 0)
        self.decode_aborts = {"cancelled": 0}
        self._batched = self._batcher()
        self.start()

    def check_runnable(self, task_id: str) -> str | None:
        try:
            self.runnable.check_registered(task_id)
        except PreprocessingUnrunnableError:
            return "this base cannot run its preprocessing"
        return None

    def check_package(self, pkg: TaskPackage) -> None:
        self.runnable.check_package(pkg)  # raises PreprocessingUnrunnableError (422)

    def info(self) -> dict:
        return {**super().info(), "max_batch_size": self.spec.max_batch_size,
                "batch_wait_timeout_s": self.spec.batch_wait_timeout_s}

    def stats(self) -> dict:
        return {**super().stats(), "decode_aborts": dict(self.decode_aborts)}

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

