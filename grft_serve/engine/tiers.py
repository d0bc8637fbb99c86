"""Task tiers: store → host → device, as one object with public counters.

A task lives in up to three places:

- **store** (:mod:`grft_serve.store`, disk or object storage): the package file. A task registered
  from a store can always be reloaded from it, so the host tier may drop it.
- **host**: the task packed in ONE contiguous buffer (pinned memory on CUDA), capped at
  ``host_bytes`` and evicted least-recently-used. A miss reloads the package from the store (read,
  validate, pack) — lazily, on the first batch that needs it. A task registered from bytes without a
  store has no other copy and is never dropped from the host tier.
- **device**: the same buffer uploaded with ONE copy (or, when the engine runs on the CPU, the host
  buffer itself), capped at ``device_bytes``, LRU.

Each tier is one :class:`~grft_serve.engine.lru.LRU` (sized in bytes). Eviction never removes a
task that is *pinned* or *in use* by a running batch (:meth:`TaskCache.use` holds its tasks on both
tiers); when everything left is pinned or in use the tier runs over its cap rather than fail the
batch, and says so in :meth:`TaskCache.stats` (``*_over_cap``).

Counters are per tier: a *hit* finds the task on the tier, a *miss* does not (the task is then
loaded from the tier below), an *eviction* drops a task from the tier to make room. :meth:`use`
returns the counts of that one call (:class:`Usage`), so a caller reports what a batch did without
diffing global counters.
"""
from __future__ import annotations

import threading
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any, Callable, Generic, Iterator, Sequence, TypeVar

from .lru import LRU

__all__ = ["TaskCache", "UnknownTaskError", "Usage"]

H = TypeVar("H")  # host value (has .nbytes)
D = TypeVar("D")  # device value (has .nbytes)


class UnknownTaskError(KeyError):
    """No task with this id is registered."""

    def __str__(self) -> str:  # KeyError quotes its message; keep it readable
        return str(self.args[0]) if self.args else "unknown task"


@dataclass
class Usage:
    """What one :meth:`TaskCache.use` call did."""

    hits: int = 0  # tasks found on the device tier
    misses: int = 0  # tasks loaded onto the device tier
    store_loads: int = 0  # tasks reloaded from the store into the host tier
    evictions: int = 0  # tasks dropped from any tier to make room


@dataclass
class _Entry:
    version: str
    reload: Callable[[], Any] | None = None  # store -> host value; None: the host copy is the only one
    info: dict = field(default_factory=dict)
    hits: int = 0  # this task's device-tier hits / misses / evictions (any tier) since it was added
    misses: int = 0
    evictions: int = 0


def _nbytes(value: Any) -> int:
    return value.nbytes


class TaskCache(Generic[H, D]):
    """Store/host/device residency of tasks (see the module docstring).

    ``upload(task_id, host) -> device`` makes the device value (``None``: the device value is the host
    value). ``shared=True`` says the device value shares the host value's memory (CPU serving): then
    dropping a task from the host tier drops it from the device tier too. Values expose ``nbytes``.
    """

    def __init__(self, upload: Callable[[str, H], D] | None = None, *, host_bytes: int | None = None,
                 device_bytes: int | None = None, shared: bool = False):
        self._upload = upload
        self.shared = shared
        self._entries: dict[str, _Entry] = {}
        self._host: LRU[str, H] = LRU(host_bytes, getsizeof=_nbytes, on_evict=self._host_evicted, name="host",
                                      evictable=lambda t: self._entries[t].reload is not None)  # else: only copy
        self._dev: LRU[str, D] = LRU(device_bytes, getsizeof=_nbytes, on_evict=self._dev_evicted, name="device")
        self._tiers = (self._dev, self._host)
        self._lock = threading.RLock()

    def _host_evicted(self, tid: str, _value: H) -> None:
        self._entries[tid].evictions += 1
        if self.shared:  # the device value is the host value: it goes too (not a device eviction)
            self._dev.pop(tid)

    def _dev_evicted(self, tid: str, _value: D) -> None:
        self._entries[tid].evictions += 1

    # -- membership -----------------------------------------------------------------------------
    def add(self, task_id: str, version: str, host: H, reload: Callable[[], H] | None = None,
            **info: Any) -> None:
        """Register (or replace) ``task_id`` with its host value; the old device copy is dropped.
        ``reload`` reads it back from the store after a host eviction. A pin survives a replace."""
        with self._lock:
            self._dev.pop(task_id)
            self._entries[task_id] = _Entry(version, reload, info=info)
            self._host.put(task_id, host)
            self._host.make_room(0, keep=(task_id,))

    def remove(self, task_id: str) -> None:
        with self._lock:
            if self._entries.pop(task_id, None) is None:
                raise UnknownTaskError(f"unknown task {task_id!r}")
            for tier in self._tiers:
                tier.pop(task_id)
                tier.unpin(task_id)

    def __contains__(self, task_id: str) -> bool:
        return task_id in self._entries

    def __len__(self) -> int:
        return len(self._entries)

    def version(self, task_id: str) -> str:
        return self._entry(task_id).version

    def set_version(self, task_id: str, version: str) -> None:
        with self._lock:
            self._entry(task_id).version = version

    def _entry(self, task_id: str) -> _Entry:
        e = self._entries.get(task_id)
        if e is None:
            raise UnknownTaskError(f"unknown task {task_id!r}")
        return e

    # -- pinning --------------------------------------------------------------------------------
    def pin(self, task_id: str) -> Usage:
        """Keep ``task_id`` on the device tier for good (it is loaded now if it is not there)."""
        with self._lock:
            self._entry(task_id)
            for tier in self._tiers:  # pinned on the host too: a shared device value lives there
                tier.pin(task_id)
            with self.use([task_id]) as (_, usage):
                return usage

    def unpin(self, task_id: str) -> None:
        with self._lock:
            self._entry(task_id)
            for tier in self._tiers:
                tier.unpin(task_id)

    # -- use ------------------------------------------------------------------------------------
    @contextmanager
    def use(self, task_ids: Sequence[str]) -> Iterator[tuple[list[D], Usage]]:
        """Device values of the (unique) ``task_ids``, loaded as needed; none of them can be evicted
        until the block exits. Unknown ids raise :class:`UnknownTaskError` before anything loads."""
        usage = Usage()
        with self._lock:
            entries = [self._entry(t) for t in task_ids]
            for tier in self._tiers:
                tier.hold(task_ids)
        try:
            with self._lock:
                out = [self._ensure_device(t, e, usage) for t, e in zip(task_ids, entries)]
            yield out, usage
        finally:
            with self._lock:
                for tier in self._tiers:
                    tier.release(task_ids)

    def _ensure_host(self, tid: str, e: _Entry, usage: Usage) -> H:
        host = self._host.get(tid)
        if host is not None:
            return host
        if e.reload is None:  # cannot happen: such entries are never dropped from the host tier
            raise UnknownTaskError(f"task {tid!r} has no host copy and no store to reload it from")
        host = e.reload()
        usage.store_loads += 1
        usage.evictions += len(self._host.make_room(host.nbytes, keep=(tid,)))
        self._host.put(tid, host)
        return host

    def _ensure_device(self, tid: str, e: _Entry, usage: Usage) -> D:
        dev = self._dev.get(tid)
        if dev is not None:
            usage.hits += 1
            e.hits += 1
            self._host.touch(tid)
            return dev
        host = self._ensure_host(tid, e, usage)
        usage.evictions += len(self._dev.make_room(host.nbytes, keep=(tid,)))  # room first, then copy
        dev = host if self._upload is None else self._upload(tid, host)
        self._dev.put(tid, dev)
        usage.misses += 1
        e.misses += 1
        return dev

    # -- capacity -------------------------------------------------------------------------------
    def resize(self, host_bytes: int | None = ..., device_bytes: int | None = ...) -> int:  # type: ignore[assignment]
        """Change a tier's cap (``None``: unbounded) and evict down to it; returns the evictions."""
        with self._lock:
            n = 0
            if host_bytes is not ...:
                n += len(self._host.resize(host_bytes))
            if device_bytes is not ...:
                n += len(self._dev.resize(device_bytes))
            return n

    # -- reporting ------------------------------------------------------------------------------
    def tier(self, task_id: str) -> str:
        """The fastest tier holding ``task_id``: "device", "host" or "store"."""
        self._entry(task_id)
        return "device" if task_id in self._dev else "host" if task_id in self._host else "store"

    def residency(self) -> dict[str, dict]:
        """``{task_id: {"tier", "pinned", "in_use", "version", "host_bytes", "device_bytes", "hits",
        "misses", "evictions", ...}}`` (the task's own cache counters since it was added)."""
        with self._lock:
            out = {}
            for tid, e in self._entries.items():
                out[tid] = {"tier": self.tier(tid), "pinned": self._dev.pinned(tid), "in_use": self._dev.holds(tid),
                            "version": e.version, "host_bytes": self._host.size_of(tid),
                            "device_bytes": self._dev.size_of(tid), "reloadable": e.reload is not None,
                            "hits": e.hits, "misses": e.misses, "evictions": e.evictions, **e.info}
            return out

    def device_ids(self) -> list[str]:
        """Task ids on the device tier, least recently used first."""
        with self._lock:
            return list(self._dev)

    def host_value(self, task_id: str) -> H | None:
        """The host value if ``task_id`` is on the host tier (no load, no LRU update)."""
        self._entry(task_id)
        return self._host.peek(task_id)

    def hits(self, tier: str = "device") -> int:
        return self._t(tier).hits

    def misses(self, tier: str = "device") -> int:
        return self._t(tier).misses

    def evictions(self, tier: str = "device") -> int:
        return self._t(tier).evictions

    def nbytes(self, tier: str = "device") -> int:
        return self._t(tier).size

    def capacity(self, tier: str = "device") -> int | None:
        return self._t(tier).capacity

    def _t(self, tier: str) -> LRU:
        if tier not in ("device", "host"):
            raise ValueError(f"tier must be 'device' or 'host', not {tier!r}")
        return self._dev if tier == "device" else self._host

    def stats(self) -> dict:
        with self._lock:
            out: dict[str, Any] = {"tasks": len(self._entries),
                                   "pinned": sum(self._dev.pinned(t) for t in self._entries)}
            for t in self._tiers:
                st = t.stats()
                out.update({f"{t.name}_tasks": st["len"], f"{t.name}_bytes": st["size"]})
                out.update({f"{t.name}_{k}": st[k] for k in ("capacity", "hits", "misses", "evictions", "over_cap")})
            out["store_tasks"] = sum(t not in self._host for t in self._entries)
            return out
