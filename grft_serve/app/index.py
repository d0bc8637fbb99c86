"""The task index: one view of the store, used the same way by the ingress and the backbone replicas.

Each process keeps one :class:`TaskIndex` over the store, with two kinds of entries, each trusted
for ``ttl_s``:

* the **listing** — :meth:`~grft_serve.store.TaskStore.list` (``{task_id: StoredTask}``: version,
  header metadata, or why the package is *broken*), read only for what needs every task: the task
  listings and the replicas' sync;
* **single-entry lookups** — :meth:`~grft_serve.store.TaskStore.info` of one id, *misses included*
  (a negative cache), at most ``max_lookups`` of them (least recently used dropped first).

A request resolves its task with :meth:`TaskIndex.get`: a fresh listing or lookup answers without
I/O, otherwise ONE entry is read (a directory store: one ``lstat`` + ``open``, and the header only
when the file changed). So neither an unknown id nor ``GET /v1/tasks/{id}`` ever re-lists the store,
whatever its size; a task registered through another node is seen within ``ttl_s``. A process that
writes or deletes a task calls :meth:`refresh` for it, and sees its own change at once.
"""
from __future__ import annotations

import threading
import time
from collections import OrderedDict

from ..core.package import valid_task_id
from ..store import StoredTask, TaskNotFoundError, TaskStore

__all__ = ["StoredTask", "TaskIndex"]

_MISS = object()


class TaskIndex:
    """``{task_id: StoredTask}`` of a store: a listing and single-entry lookups, each trusted ``ttl_s``."""

    def __init__(self, store: TaskStore, ttl_s: float = 0.5, max_lookups: int = 4096):
        self.store, self.ttl_s, self.max_lookups = store, ttl_s, max_lookups
        self._entries: dict[str, StoredTask] = {}
        self._at = float("-inf")
        self._lookups: OrderedDict[str, tuple[StoredTask | None, float]] = OrderedDict()
        self._lock = threading.Lock()

    def snapshot(self, force: bool = False) -> dict[str, StoredTask]:
        """The whole listing (re-read when older than ``ttl_s``, or on ``force``)."""
        with self._lock:
            if force or time.monotonic() - self._at >= self.ttl_s:
                self._entries, self._at = self.store.list(), time.monotonic()
                self._lookups.clear()  # the listing is newer than every lookup
            return self._entries

    def cached(self, tid: str):
        """The entry of ``tid`` (``None``: no such task) while known fresh, without I/O; else ``_MISS``."""
        now = time.monotonic()
        with self._lock:
            hit = self._lookups.get(tid)
            if hit is not None and now - hit[1] < self.ttl_s:
                return hit[0]
            if now - self._at < self.ttl_s:
                return self._entries.get(tid)
        return _MISS

    def get(self, tid: str) -> StoredTask | None:
        """The entry of ``tid``, or None: from the cache while fresh, else one single-entry lookup."""
        e = self.cached(tid)
        return self.refresh(tid) if e is _MISS else e

    def refresh(self, tid: str) -> StoredTask | None:
        """Re-read one task now (after this process wrote or deleted it; or a cache miss)."""
        entry = None
        if valid_task_id(tid):
            try:
                entry = self.store.info(tid)
            except (TaskNotFoundError, ValueError):
                entry = None
        with self._lock:
            self._lookups[tid] = (entry, time.monotonic())
            self._lookups.move_to_end(tid)
            while len(self._lookups) > self.max_lookups:
                self._lookups.popitem(last=False)
            if self._entries.get(tid) != entry:  # the listing is out of date: read it again when asked
                self._at = float("-inf")
        return entry

    def count(self) -> int:
        """Tasks in the store (the listing, re-read when older than ``ttl_s``)."""
        return len(self.snapshot())

    def versions_for(self, fingerprint: str) -> dict[str, str]:
        """``{task_id: version}`` of the healthy tasks of one base."""
        return {t: e.version for t, e in self.snapshot().items() if e.broken is None and e.fingerprint == fingerprint}


def is_miss(value) -> bool:
    """Whether :meth:`TaskIndex.cached` found nothing fresh."""
    return value is _MISS
