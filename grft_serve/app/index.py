"""The task index: one view of the store, shared in design by the ingress and the backbone replicas.

Each process keeps one :class:`TaskIndex`: ``{task_id: TaskEntry}`` built from the store's version
listing plus each package's header metadata, read once per (task, version) and reused until the
version changes. The ingress resolves every request against it (task → backbone, version); replicas
use it to drop tasks deleted from the store. A stored package whose header cannot be read is listed
as *broken* (with the reason) instead of being served or silently hidden.
"""
from __future__ import annotations

import threading
import time
from dataclasses import dataclass, field

from ..package import PackageError, read_header_info
from ..store import TaskStore

__all__ = ["TaskEntry", "TaskIndex"]


@dataclass(frozen=True)
class TaskEntry:
    task_id: str
    version: str
    meta: dict = field(default_factory=dict)
    num_params: int = 0
    bytes: int = 0
    broken: str | None = None

    @property
    def fingerprint(self) -> str | None:
        return self.meta.get("base_fingerprint")


class TaskIndex:
    """``{task_id: TaskEntry}`` of a store, refreshed at most every ``ttl_s`` (or on ``force``)."""

    def __init__(self, store: TaskStore, ttl_s: float = 0.5):
        self.store, self.ttl_s = store, ttl_s
        self._entries: dict[str, TaskEntry] = {}
        self._at = float("-inf")
        self._lock = threading.Lock()

    def _read(self, tid: str, version: str) -> TaskEntry:
        try:
            info = read_header_info(self.store.path(tid)) if hasattr(self.store, "path") \
                else read_header_info(self.store.get(tid))
        except (PackageError, OSError, ValueError, KeyError) as e:
            return TaskEntry(tid, version, broken=f"{type(e).__name__}: {getattr(e, 'message', e)}")
        return TaskEntry(tid, version, info["meta"], info["num_params"], info["bytes"])

    def snapshot(self, force: bool = False) -> dict[str, TaskEntry]:
        with self._lock:
            if not force and time.monotonic() - self._at < self.ttl_s:
                return self._entries
            new = {}
            for tid, v in self.store.versions().items():
                cur = self._entries.get(tid)
                new[tid] = cur if cur is not None and cur.version == v else self._read(tid, v)
            self._entries, self._at = new, time.monotonic()
            return new

    def get(self, tid: str) -> TaskEntry | None:
        """The entry of ``tid``; a miss re-lists the store once (a task registered through another node)."""
        e = self.snapshot().get(tid)
        return e if e is not None else self.snapshot(force=True).get(tid)

    def versions_for(self, fingerprint: str) -> dict[str, str]:
        """``{task_id: version}`` of the healthy tasks of one base."""
        return {t: e.version for t, e in self.snapshot().items() if e.broken is None and e.fingerprint == fingerprint}

    def remember(self, entry: TaskEntry) -> None:
        with self._lock:
            self._entries = {**self._entries, entry.task_id: entry}

    def forget(self, tid: str) -> None:
        with self._lock:
            self._entries = {k: v for k, v in self._entries.items() if k != tid}
