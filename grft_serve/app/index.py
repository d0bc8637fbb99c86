"""The task index: one view of the store, used the same way by the ingress and the backbone replicas.

Each process keeps one :class:`TaskIndex`: the store's :meth:`~grft_serve.store.TaskStore.list`
(``{task_id: StoredTask}`` — version, header metadata, or why the package is *broken*), trusted for
``ttl_s``. The store reads each package header once per version, so refreshing is cheap. The ingress
resolves every request against it (task → backbone, version); replicas use it to drop tasks deleted
from the store.
"""
from __future__ import annotations

import threading
import time

from ..store import StoredTask, TaskNotFoundError, TaskStore

__all__ = ["StoredTask", "TaskIndex"]


class TaskIndex:
    """``{task_id: StoredTask}`` of a store, refreshed at most every ``ttl_s`` (or on ``force``)."""

    def __init__(self, store: TaskStore, ttl_s: float = 0.5):
        self.store, self.ttl_s = store, ttl_s
        self._entries: dict[str, StoredTask] = {}
        self._at = float("-inf")
        self._lock = threading.Lock()

    def snapshot(self, force: bool = False) -> dict[str, StoredTask]:
        with self._lock:
            if force or time.monotonic() - self._at >= self.ttl_s:
                self._entries, self._at = self.store.list(), time.monotonic()
            return self._entries

    def fresh(self) -> dict[str, StoredTask] | None:
        """The cached listing while it is within ``ttl_s`` (no I/O), else None."""
        return self._entries if time.monotonic() - self._at < self.ttl_s else None

    def get(self, tid: str) -> StoredTask | None:
        """The entry of ``tid``; a miss re-lists the store once (a task registered through another node)."""
        e = self.snapshot().get(tid)
        return e if e is not None else self.snapshot(force=True).get(tid)

    def versions_for(self, fingerprint: str) -> dict[str, str]:
        """``{task_id: version}`` of the healthy tasks of one base."""
        return {t: e.version for t, e in self.snapshot().items() if e.broken is None and e.fingerprint == fingerprint}

    def refresh(self, tid: str) -> StoredTask | None:
        """Re-read one task (after this process wrote or deleted it)."""
        try:
            entry = self.store.info(tid)
        except TaskNotFoundError:
            entry = None
        with self._lock:
            rest = {k: v for k, v in self._entries.items() if k != tid}
            self._entries = rest if entry is None else {**rest, tid: entry}
        return entry
