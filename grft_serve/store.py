"""Task stores: where task packages live at rest (the tier below the engine's host/device caches).

The engine and the serving app only use the small :class:`TaskStore` interface, so an object-store
backend can slot in beside :class:`DirectoryTaskStore` (a local or shared directory — on a multi-node
Ray cluster point every node at the same shared path). :class:`BaseTaskStore` derives ``info`` and
``list`` (per-task version, metadata, or why the stored package is broken) from the four core methods.

:class:`DirectoryTaskStore` keeps one ``<task_id>.grft.safetensors`` per task. Every write goes to a
temp file that is then published in one step: ``put(replace=True)`` renames over the old file,
``put(replace=False)`` hard-links the temp file to the task's name, which fails if the name is taken,
so of concurrent registrations of one new id exactly one succeeds (no check-then-write window).
Readers see a whole old or a whole new package, never a part. Temp files left by a killed writer are
removed once older than ``stale_tmp_s``.

Only *regular files* are tasks. Anything else under a task's name — a symlink (an "alias"), a
directory, a FIFO, a device — is never opened (``lstat`` first, then ``O_NOFOLLOW | O_NONBLOCK`` and
an ``fstat`` check on the open file), never listed and never served: ``get`` / ``info`` / ``delete``
answer :class:`TaskNotFoundError`, and ``list`` logs it once. A package whose embedded ``task_id``
differs from its file name (a copied file) is listed as broken, since no replica could serve it under
that name.
"""
from __future__ import annotations

import errno
import hashlib
import logging
import os
import stat
import sys
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Protocol

from .core.atomic import TMP_SUFFIX, atomic_write
from .core.package import SUFFIX, PackageError, read_header, valid_task_id

log = logging.getLogger("grft_serve.store")

__all__ = ["BaseTaskStore", "DirectoryTaskStore", "StoredTask", "TaskExistsError", "TaskNotFoundError",
           "TaskStore", "content_version"]


class TaskExistsError(KeyError):
    """A task with this id is already stored/registered and ``replace`` was not asked for."""

    def __str__(self) -> str:
        return str(self.args[0]) if self.args else "task exists"


class TaskNotFoundError(KeyError):
    """No task with this id in the store."""


def content_version(data: bytes) -> str:
    """A task version: the first 16 hex digits of the package's SHA-256."""
    return hashlib.sha256(data).hexdigest()[:16]


@dataclass(frozen=True)
class StoredTask:
    """What the store holds for one task: its version and header facts, or why it is ``broken``
    (``meta`` is then empty). ``meta`` is the package metadata as JSON; ``bytes`` the package size."""

    task_id: str
    version: str
    meta: dict = field(default_factory=dict)
    num_params: int = 0
    bytes: int = 0
    broken: str | None = None

    @property
    def fingerprint(self) -> str | None:
        """The base fingerprint the package was trained on."""
        return self.meta.get("base_fingerprint")


class TaskStore(Protocol):
    def put(self, task_id: str, data: bytes, replace: bool = False) -> str: ...
    def get(self, task_id: str) -> bytes: ...
    def delete(self, task_id: str) -> None: ...
    def versions(self) -> dict[str, str]: ...
    def info(self, task_id: str) -> StoredTask: ...
    def list(self) -> dict[str, StoredTask]: ...


def _describe(task_id: str, data: bytes) -> StoredTask:
    """A stored package's :class:`StoredTask` from its bytes (the version and the header of one read)."""
    version = content_version(data)
    try:
        h = read_header(data, max_bytes=sys.maxsize)  # size limits apply at upload, not at rest
    except PackageError as e:
        return StoredTask(task_id, version, bytes=len(data), broken=f"{e.code}: {e.message}")
    if h.meta.task_id != task_id:
        return StoredTask(task_id, version, bytes=len(data),
                          broken=f"task_id_mismatch: the package is task {h.meta.task_id!r}, stored as {task_id!r}")
    return StoredTask(task_id, version, h.meta.model_dump(mode="json"), h.num_params, h.size)


class BaseTaskStore:
    """``info`` and ``list`` from ``get`` and ``versions``; subclasses implement the core methods."""

    def put(self, task_id: str, data: bytes, replace: bool = False) -> str:
        raise NotImplementedError

    def get(self, task_id: str) -> bytes:
        raise NotImplementedError

    def delete(self, task_id: str) -> None:
        raise NotImplementedError

    def versions(self) -> dict[str, str]:
        raise NotImplementedError

    def info(self, task_id: str) -> StoredTask:
        """The stored task's version and metadata, or the reason its package is broken.
        Raises :class:`TaskNotFoundError` if there is none."""
        return _describe(task_id, self.get(task_id))

    def list(self) -> dict[str, StoredTask]:
        """:meth:`info` of every stored task (broken ones included, marked as such)."""
        out = {}
        for tid in self.versions():
            try:
                out[tid] = self.info(tid)
            except TaskNotFoundError:  # deleted meanwhile
                continue
        return out


class DirectoryTaskStore(BaseTaskStore):
    """One ``<task_id>.grft.safetensors`` file per task in ``root`` (see the module docstring)."""

    def __init__(self, root: str | os.PathLike, stale_tmp_s: float = 3600.0, sweep_interval_s: float = 60.0):
        self.root = Path(root)
        self.root.mkdir(parents=True, exist_ok=True)
        self.stale_tmp_s = stale_tmp_s
        self.sweep_interval_s = sweep_interval_s  # list() sweeps at most this often (and every stale_tmp_s)
        # id -> ((inode, mtime_ns, size), StoredTask); files are never rewritten in place, so a
        # changed file has a new inode and a cached entry can only be stale by its key
        self._cache: dict[str, tuple[tuple[int, int, int], StoredTask]] = {}
        self._lock = threading.Lock()
        self._swept = float("-inf")
        self._ignored: set[str] = set()  # non-regular entries named like tasks, logged once
        self.sweep()

    def path(self, task_id: str) -> Path:
        if not valid_task_id(task_id):
            raise ValueError(f"invalid task id {task_id!r}: use letters, digits, '_', '-', '.' (max 128)")
        return self.root / f"{task_id}{SUFFIX}"

    def sweep(self) -> list[str]:
        """Remove temp files of interrupted writes older than ``stale_tmp_s``; returns their names."""
        self._swept = time.monotonic()
        cutoff, removed = time.time() - self.stale_tmp_s, []
        for p in self.root.glob(f".*{SUFFIX}.*{TMP_SUFFIX}"):
            try:
                if p.stat().st_mtime < cutoff:
                    p.unlink()
                    removed.append(p.name)
            except FileNotFoundError:  # published or swept by another process meanwhile
                continue
        return removed

    def put(self, task_id: str, data: bytes, replace: bool = False) -> str:
        p = self.path(task_id)
        try:
            atomic_write(p, data, replace=replace)
        except (FileExistsError, IsADirectoryError):
            if p.is_dir() and not p.is_symlink():
                raise TaskExistsError(f"the store holds a directory named like task {task_id!r}; remove it "
                                      "by hand") from None
            raise TaskExistsError(f"task {task_id!r} already exists; pass replace to overwrite it") from None
        return content_version(data)

    def _open(self, task_id: str) -> int:
        """A read-only descriptor of the task's file; :class:`TaskNotFoundError` for no file or a file
        that is not regular (never opened, or opened without blocking and refused)."""
        p = self.path(task_id)
        try:
            st = os.lstat(p)
        except FileNotFoundError:
            raise TaskNotFoundError(f"unknown task {task_id!r}") from None
        if not stat.S_ISREG(st.st_mode):
            raise TaskNotFoundError(f"unknown task {task_id!r} (the store entry is not a regular file)")
        try:
            fd = os.open(p, os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_CLOEXEC)
        except FileNotFoundError:
            raise TaskNotFoundError(f"unknown task {task_id!r}") from None
        except OSError as e:
            if e.errno == errno.ELOOP:  # swapped for a symlink since the lstat
                raise TaskNotFoundError(f"unknown task {task_id!r} (the store entry is a symlink)") from None
            raise
        if not stat.S_ISREG(os.fstat(fd).st_mode):
            os.close(fd)
            raise TaskNotFoundError(f"unknown task {task_id!r} (the store entry is not a regular file)")
        return fd

    def get(self, task_id: str) -> bytes:
        with open(self._open(task_id), "rb") as f:
            return f.read()

    def delete(self, task_id: str) -> None:
        p = self.path(task_id)
        try:
            if not stat.S_ISREG(os.lstat(p).st_mode):
                raise TaskNotFoundError(f"unknown task {task_id!r} (the store entry is not a regular file)")
            p.unlink()
        except FileNotFoundError:
            raise TaskNotFoundError(f"unknown task {task_id!r}") from None
        finally:
            with self._lock:
                self._cache.pop(task_id, None)

    def info(self, task_id: str) -> StoredTask:
        """Version and header facts of one stored task, from one open file (so they always agree);
        re-read only when the file changed."""
        try:
            with open(self._open(task_id), "rb") as f:
                st = os.fstat(f.fileno())
                key = (st.st_ino, st.st_mtime_ns, st.st_size)
                c = self._cache.get(task_id)
                if c is not None and c[0] == key:
                    return c[1]
                entry = _describe(task_id, f.read())
        except OSError as e:  # e.g. permissions: listed as broken, not hidden
            return StoredTask(task_id, "", broken=f"unreadable: {e.strerror or e}")
        with self._lock:
            self._cache[task_id] = (key, entry)
        return entry

    def versions(self) -> dict[str, str]:
        """``{task_id: version}`` of every stored task (cached per file; broken ones included)."""
        return {tid: t.version for tid, t in self.list().items()}

    def list(self) -> dict[str, StoredTask]:
        if time.monotonic() - self._swept >= min(self.stale_tmp_s, self.sweep_interval_s):
            self.sweep()
        out = {}
        with os.scandir(self.root) as it:
            names = sorted(e.name for e in it if e.name.endswith(SUFFIX) and self._is_task_entry(e))
        for name in names:
            tid = name[: -len(SUFFIX)]
            if not valid_task_id(tid):
                continue
            try:
                out[tid] = self.info(tid)
            except TaskNotFoundError:  # deleted meanwhile
                continue
        with self._lock:
            for tid in set(self._cache) - set(out):
                self._cache.pop(tid, None)
        return out

    def _is_task_entry(self, entry: os.DirEntry) -> bool:
        """A regular file (no stat for most file systems: the directory entry's type); else logged once."""
        try:
            if entry.is_file(follow_symlinks=False):
                return True
        except OSError:
            return False
        if entry.name not in self._ignored:
            self._ignored.add(entry.name)
            log.warning("task store %s: %r is not a regular file; it is not a task", self.root, entry.name)
        return False
