"""Task stores: where task packages live at rest (the tier below the engine's host/device caches).

The engine and the serving app only use the small :class:`TaskStore` interface, so an object-store
backend can slot in beside :class:`DirectoryTaskStore` (a local or shared directory — on a multi-node
Ray cluster point every node at the same shared path).
"""
from __future__ import annotations

import hashlib
import os
import re
from pathlib import Path
from typing import Protocol

from .package import SUFFIX, atomic_write

_ID = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.\-]{0,127}$")


class TaskExistsError(KeyError):
    """A task with this id is already stored and ``replace`` was not asked for."""


class TaskNotFoundError(KeyError):
    """No task with this id in the store."""


def content_version(data: bytes) -> str:
    """A task version: the first 16 hex digits of the package's SHA-256."""
    return hashlib.sha256(data).hexdigest()[:16]


class TaskStore(Protocol):
    def put(self, task_id: str, data: bytes, replace: bool = False) -> str: ...
    def get(self, task_id: str) -> bytes: ...
    def delete(self, task_id: str) -> None: ...
    def versions(self) -> dict[str, str]: ...


class DirectoryTaskStore:
    """One ``<task_id>.grft.safetensors`` file per task in ``root``; writes are atomic renames."""

    def __init__(self, root: str | os.PathLike):
        self.root = Path(root)
        self.root.mkdir(parents=True, exist_ok=True)
        self._vcache: dict[str, tuple[int, int, str]] = {}  # id -> (mtime_ns, size, version)

    def path(self, task_id: str) -> Path:
        if not _ID.match(task_id):
            raise ValueError(f"invalid task id {task_id!r}: use letters, digits, '_', '-', '.' (max 128)")
        return self.root / f"{task_id}{SUFFIX}"

    def put(self, task_id: str, data: bytes, replace: bool = False) -> str:
        p = self.path(task_id)
        if p.exists() and not replace:
            raise TaskExistsError(f"task {task_id!r} already exists; pass replace to overwrite it")
        atomic_write(p, data)
        return content_version(data)

    def get(self, task_id: str) -> bytes:
        p = self.path(task_id)
        try:
            return p.read_bytes()
        except FileNotFoundError:
            raise TaskNotFoundError(f"unknown task {task_id!r}") from None

    def delete(self, task_id: str) -> None:
        try:
            self.path(task_id).unlink()
        except FileNotFoundError:
            raise TaskNotFoundError(f"unknown task {task_id!r}") from None

    def versions(self) -> dict[str, str]:
        """``{task_id: version}`` of every stored task (hashes cached by mtime and size)."""
        out = {}
        for p in sorted(self.root.glob(f"*{SUFFIX}")):
            tid = p.name[: -len(SUFFIX)]
            try:
                st = p.stat()
            except FileNotFoundError:
                continue
            c = self._vcache.get(tid)
            if c is None or c[:2] != (st.st_mtime_ns, st.st_size):
                try:
                    c = (st.st_mtime_ns, st.st_size, content_version(p.read_bytes()))
                except FileNotFoundError:
                    continue
                self._vcache[tid] = c
            out[tid] = c[2]
        return out
