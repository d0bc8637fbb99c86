"""The serving engine: ONE frozen base on one device, any number of GRFT tasks (orchestration).

The engine registers tasks (validate, pack into the host tier), keeps them resident
(:class:`~grft_serve.engine.tiers.TaskCache`: store → host → device, one LRU each) and runs batches
through one of two paths, picked per batch and reported (:class:`BatchReport`):

- **patch** (:class:`~grft_serve.engine.patch.PatchPath`, one task in the batch): the task's rows are
  written into the base weights and restored in a ``finally``;
- **override** (:class:`~grft_serve.engine.override.OverridePath`, several tasks): no weight is
  touched; per-sample rows come from the slot tables through forward hooks.

Both are bit-exact with respect to the base (see ``tests/test_engine.py``). One lock guards weight
mutation and the forward, so the override path never sees half-patched weights. The map of the
package (a task's forms, where weights are written) is :mod:`grft_serve.engine`'s docstring.
"""
from __future__ import annotations

import threading
import time
from dataclasses import dataclass, field
from dataclasses import replace as _replace
from typing import Any, Literal, Sequence

import torch
from torch import nn

from ..core.backbones import Backbone
from ..core.package import (
    DEFAULT_MAX_BYTES,
    PackageMeta,
    PreprocessingMismatchError,
    TaskPackage,
    load_package,
    package_bytes,
    read_package_bytes,
)
from ..core.rowop import RowOpHooks
from ..core.spec import BaseSpec, fingerprint_modules, iter_patchable
from ..store import TaskExistsError, TaskStore, content_version
from .assign import SlotAssigner
from .flat import FlatWeights
from .graphs import GraphRunner
from .override import OverridePath
from .packed import Packed, Packer, Resident
from .patch import PatchPath
from .slots import SlotTables
from .tiers import TaskCache, UnknownTaskError

__all__ = ["BatchReport", "BatchResult", "Engine", "TaskExistsError", "TaskInfo", "UnknownTaskError"]

Path_ = Literal["auto", "patch", "override"]


@dataclass
class TaskInfo:
    """The engine's record of a registered task: the version served, its metadata and sizes (``nbytes``:
    the packed host buffer)."""

    task_id: str
    version: str
    meta: PackageMeta
    num_params: int
    nbytes: int
    registered_at: float = field(default_factory=time.time)


@dataclass
class BatchReport:
    """What the engine did for one batch. ``path``: "patch" or "override"; ``cache_hits``: tasks
    found on the device tier; ``cache_misses``: tasks loaded onto it; ``store_loads``: of those, tasks
    first reloaded from the store; ``cache_evictions``: tasks dropped from a tier to make room;
    ``slot_loads``: tasks written into the slot tables (override path)."""

    path: str
    tasks: list[str]
    samples: int
    cache_hits: int = 0
    cache_misses: int = 0
    cache_evictions: int = 0
    store_loads: int = 0
    slot_loads: int = 0
    seconds: float = 0.0


@dataclass
class BatchResult:
    """What :meth:`Engine.run` computed for one batch: per sample its ``logits`` (float32, CPU; each
    task has its own classes) and the ``versions`` of its task that computed them; ``infos``: the
    registration of each task of the batch as of the forward (its labels are the columns of its
    logits); ``report``: what the engine did. Turning logits into answers is the caller's part."""

    logits: list[torch.Tensor]
    versions: list[str]
    infos: dict[str, TaskInfo]
    report: BatchReport


class Engine:
    """Serve many GRFT tasks from one frozen ``backbone``.

    The engine takes the backbone over: it casts it to the serving ``dtype`` on ``device``, puts it
    in eval mode with gradients off, and re-homes every patchable weight (and bias) as a view into a
    few flat buffers (:class:`~grft_serve.engine.flat.FlatWeights`), which the patch path writes
    into. Do not use ``backbone`` elsewhere while an engine serves it.

    ``device_cache_bytes`` caps the task bytes on the device (LRU); ``host_cache_bytes`` caps the
    host tier (None: unbounded; only tasks registered from a store can leave it); ``max_slots`` is
    the number of tasks the mixed path keeps in its slot tables (default 256 on CUDA, 64 on CPU);
    ``max_package_bytes`` caps accepted packages; ``dtype`` is the serving dtype; ``graphs`` replays
    captured CUDA graphs per (path, batch-size bucket) (:mod:`grft_serve.engine.graphs`).
    """

    def __init__(self, backbone: Backbone, device: str | torch.device = "cpu", dtype: torch.dtype | None = None,
                 device_cache_bytes: int = 1 << 30, max_package_bytes: int = DEFAULT_MAX_BYTES,
                 device_tier: bool | None = None, host_cache_bytes: int | None = None,
                 max_slots: int | None = None, graphs: bool = False):
        self.backbone = backbone
        self.device = torch.device(device)
        self.max_package_bytes = max_package_bytes
        mods = iter_patchable(backbone, backbone.exclude_from_patching())
        # the fingerprint is taken on the pretrained weights before any dtype conversion
        self.spec: BaseSpec = backbone.describe(fingerprint=fingerprint_modules(mods))
        backbone.to(device=self.device, dtype=dtype).eval().requires_grad_(False)
        self.dtype = dtype or next(backbone.parameters()).dtype
        self.modules: dict[str, nn.Module] = dict(mods)
        self.flat = FlatWeights(self.modules, self.dtype, self.device)
        self.hooks = RowOpHooks(self.modules)
        self.packer = Packer(self.flat, pin=self.device.type == "cuda")
        # on CPU the device copy would duplicate the host copy: the device tier shares it, unless
        # ``device_tier=True`` asks for a separate copy (tests exercise eviction that way)
        copy = self.device.type != "cpu" if device_tier is None else device_tier
        self.cache: TaskCache[Packed, Resident] = TaskCache(
            self._upload if copy else self._materialise, host_bytes=host_cache_bytes,
            device_bytes=int(device_cache_bytes), shared=not copy)
        max_slots = max_slots or (256 if self.device.type == "cuda" else 64)
        self.slots = SlotTables(self.modules, self.flat.base_bias, capacity=min(8, max_slots))
        self.assigner = SlotAssigner(self.slots, max_slots)
        # CUDA graphs per (path, batch bucket, input shape); on CPU the same static-buffer code runs eagerly
        self.graphs = GraphRunner(backbone, self.device, self.slots, self.hooks) if graphs else None
        self.patch = PatchPath(backbone, self.flat, self.device, self.graphs)
        self.override = OverridePath(backbone, self.slots, self.assigner, self.hooks, self.device, self.graphs)
        self._lock = threading.RLock()
        self.decoding = False  # set by a decode loop (engine.generate): no batch may patch weights then
        self._tasks: dict[str, TaskInfo] = {}
        self._pinned: set[str] = set()
        self.counters = {"batches": 0, "samples": 0, "patch_batches": 0, "override_batches": 0,
                         "cache_hits": 0, "cache_misses": 0, "cache_evictions": 0}

    # -- registration ---------------------------------------------------------------------------
    def register(self, source: str | bytes | TaskPackage | Any, replace: bool = False,
                 version: str | None = None, store: TaskStore | None = None) -> TaskInfo:
        """Validate and register a task package (path, bytes or :class:`TaskPackage`).

        With ``store`` (the store the package came from) the host tier may drop the task and reload
        it from there. Raises a ``PackageError`` subclass for a bad package, :class:`TaskExistsError`
        when the id is taken and ``replace`` is false. On any error the engine is unchanged.
        """
        data = package_bytes(source) if isinstance(source, TaskPackage) else \
            read_package_bytes(source, self.max_package_bytes)
        pkg = self.validate(data)
        version = version or content_version(data)
        with self._lock:  # packing reads nothing patched, but replacing must not race a batch
            if pkg.task_id in self._tasks and not replace:
                raise TaskExistsError(f"task {pkg.task_id!r} is already registered; pass replace to overwrite")
            packed = self.packer(pkg)
            info = TaskInfo(pkg.task_id, version, pkg.meta, pkg.num_params(), packed.nbytes)
            reload = None if store is None else self._reloader(store, pkg.task_id)
            self.assigner.release(pkg.task_id)
            self.cache.add(pkg.task_id, version, packed, reload)
            self._tasks[pkg.task_id] = info
            if pkg.task_id in self._pinned:  # a pinned task stays on the device across a replace
                self.cache.pin(pkg.task_id)
        return info

    def validate(self, data: bytes) -> TaskPackage:
        """Everything :meth:`register` checks, without registering: the package against this base
        (see :func:`~grft_serve.core.package.load_package`) and its preprocessing against the backbone."""
        pkg = load_package(data, base=self.spec, max_bytes=self.max_package_bytes)
        why = self.backbone.check_preprocessing(pkg.meta.preprocessing)
        if why is not None:
            raise PreprocessingMismatchError(why)
        return pkg

    def unregister(self, task_id: str) -> None:
        with self._lock:
            if task_id not in self._tasks:
                raise UnknownTaskError(f"unknown task {task_id!r}")
            self.cache.remove(task_id)
            self.assigner.release(task_id)
            self.assigner.unpin(task_id)
            self._pinned.discard(task_id)
            del self._tasks[task_id]

    def tasks(self) -> list[TaskInfo]:
        return list(self._tasks.values())  # no lock: listing must not wait for a running batch

    def task(self, task_id: str) -> TaskInfo:
        try:
            return self._tasks[task_id]
        except KeyError:
            raise UnknownTaskError(f"unknown task {task_id!r}") from None

    def sync(self, store: TaskStore, versions: dict[str, str] | None = None) -> dict[str, list[str]]:
        """Make the registered tasks equal the store's (new/changed loaded, missing dropped).

        ``versions`` (default ``store.versions()``) is the wanted ``{task_id: version}``, e.g. the
        store's listing filtered to the tasks of this base. Tasks loaded here can be reloaded from
        ``store`` after a host-tier eviction."""
        want = store.versions() if versions is None else versions
        added, removed, failed = [], [], []
        for tid, v in want.items():
            cur = self._tasks.get(tid)
            if cur is not None and cur.version == v:
                continue
            try:
                self.register(store.get(tid), replace=True, version=v, store=store)
                added.append(tid)
            except Exception:  # noqa: BLE001 - a bad or vanished file must not stop the others
                failed.append(tid)
        for tid in [t for t in list(self._tasks) if t not in want]:
            try:
                self.unregister(tid)
                removed.append(tid)
            except UnknownTaskError:
                pass
        return {"added": added, "removed": removed, "failed": failed}

    def _reloader(self, store: TaskStore, task_id: str):
        def reload() -> Packed:
            try:
                data = store.get(task_id)
            except KeyError:
                raise UnknownTaskError(f"task {task_id!r} is no longer in the store") from None
            pkg = self.validate(data)
            v = content_version(data)
            info = self._tasks.get(task_id)
            if info is not None and info.version != v:  # changed at rest since registration: say so
                self._tasks[task_id] = _replace(info, version=v, meta=pkg.meta, num_params=pkg.num_params())
                self.cache.set_version(task_id, v)
            return self.packer(pkg)
        return reload

    def _upload(self, task_id: str, packed: Packed) -> Resident:
        return Resident(packed, self.device)  # ONE host-to-device copy

    def _materialise(self, task_id: str, packed: Packed) -> Resident:
        return Resident(packed, packed.buf.device)  # CPU: the host buffer itself

    # -- residency ------------------------------------------------------------------------------
    def pin(self, task_id: str) -> None:
        """Keep ``task_id`` on the device (loaded now) and in the slot tables once it gets a slot."""
        with self._lock:
            self.cache.pin(task_id)
            self.assigner.pin(task_id)
            self._pinned.add(task_id)

    def unpin(self, task_id: str) -> None:
        with self._lock:
            self.cache.unpin(task_id)
            self.assigner.unpin(task_id)
            self._pinned.discard(task_id)

    def residency(self) -> dict[str, dict]:
        """``{task_id: {"tier": "device"|"host"|"store", "pinned", "version", "slot", ...}}`` (does not
        wait for a running batch)."""
        out = self.cache.residency()
        for tid, r in out.items():
            r["slot"] = self.assigner.slot_of(tid)
        return out

    def device_cache(self) -> dict:
        return {"tasks": self.cache.device_ids(), "bytes": self.cache.nbytes("device"),
                "capacity": self.cache.capacity("device")}

    # -- forward --------------------------------------------------------------------------------
    def forward(self, batch: Any, task_ids: Sequence[str],
                path: Path_ = "auto") -> tuple[list[torch.Tensor], list[str]]:
        """Logits per sample (float32, CPU; each task has its own classes) and the task versions used."""
        res = self.run(batch, task_ids, path)
        return res.logits, res.versions

    @torch.inference_mode()
    def run(self, batch: Any, task_ids: Sequence[str], path: Path_ = "auto") -> BatchResult:
        """Run a preprocessed ``batch`` (see :meth:`Backbone.preprocess`; possibly several requests
        merged) of ``len(task_ids)`` samples: logits, versions and a report of what the engine did."""
        t0 = time.perf_counter()
        n = Backbone.batch_len(batch)
        if n != len(task_ids):
            raise ValueError(f"batch has {n} samples but {len(task_ids)} task ids")
        if path not in ("auto", "patch", "override"):
            raise ValueError(f"path must be 'auto', 'patch' or 'override', not {path!r}")
        if self.decoding:
            raise RuntimeError("a decode loop serves this engine: it runs no classification batches (and never "
                               "patches weights under the decoder)")
        unique = list(dict.fromkeys(task_ids))
        if not unique:
            return BatchResult([], [], {}, BatchReport("patch", [], 0, seconds=time.perf_counter() - t0))
        pos = {t: i for i, t in enumerate(unique)}
        use_patch = path == "patch" or (path == "auto" and len(unique) == 1)
        runner = self.patch if use_patch else self.override
        report = BatchReport(runner.name, unique, n)
        with self._lock, self.cache.use(unique) as (res, usage):
            versions = [self.cache.version(t) for t in task_ids]
            infos = {t: self.task(t) for t in unique}  # after the loads: a reload may have updated them
            batch = Backbone.batch_to(batch, self.device, self.dtype)
            logits, report.slot_loads = runner.run(batch, unique, res, [pos[t] for t in task_ids])
            report.cache_hits, report.cache_misses = usage.hits, usage.misses
            report.cache_evictions, report.store_loads = usage.evictions, usage.store_loads
            c = self.counters
            c["batches"] += 1
            c["samples"] += n
            c["patch_batches" if use_patch else "override_batches"] += 1
            c["cache_hits"] += usage.hits
            c["cache_misses"] += usage.misses
            c["cache_evictions"] += usage.evictions
        report.seconds = time.perf_counter() - t0
        return BatchResult(logits, versions, infos, report)

    def stats(self) -> dict:
        """Counters and tier sizes (does not wait for a running batch)."""
        return {**self.counters, "tasks": len(self._tasks), "device_cache_bytes": self.cache.nbytes("device"),
                "host_cache_bytes": self.cache.nbytes("host"), "pinned": len(self._pinned),
                **self.assigner.stats(), **(self.graphs.stats() if self.graphs else {}), "cache": self.cache.stats()}
