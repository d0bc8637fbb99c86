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

Eviction never removes a task that is *pinned* or *in use* by a running batch (:meth:`TaskCache.use`
counts users per task); when everything left is pinned or in use the tier runs over its cap rather
than fail the batch, and says so in :meth:`TaskCache.stats` (``*_over_cap``).

Counters are per tier: a *hit* finds the task on the tier, a *miss* loads it from the tier below, an
*eviction* drops a task from the tier to make room. :meth:`use` returns the counts of that one call
(:class:`Usage`), so a caller reports what a batch did without diffing global counters.
"""
from __future__ import annotations

import threading
from collections import OrderedDict
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any, Callable, Generic, Iterator, Sequence, TypeVar

__all__ = ["TaskCache", "Usage", "UnknownTaskError", "TIERS"]

H = TypeVar("H")  # host value (has .nbytes)
D = TypeVar("D")  # device value (has .nbytes)
TIERS = ("device", "host", "store")


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
    host: Any = None
    device: Any = None
    reload: Callable[[], Any] | None = None  # store -> host value; None: the host copy is the only one
    pinned: bool = False
    in_use: int = 0
    info: dict = field(default_factory=dict)
    hits: int = 0  # this task's device-tier hits / misses / evictions (any tier) since it was added
    misses: int = 0
    evictions: int = 0


class _Tier:
    def __init__(self, name: str, capacity: int | None):
        self.name, self.capacity = name, capacity
        self.lru: OrderedDict[str, int] = OrderedDict()  # task id -> bytes, least recent first
        self.bytes = 0
        self.hits = self.misses = self.evictions = 0
        self.over_cap = 0  # times a load had to exceed the cap (everything else pinned / in use)

    def put(self, tid: str, n: int) -> None:
        self.drop(tid)
        self.lru[tid] = n
        self.bytes += n

    def drop(self, tid: str) -> bool:
        n = self.lru.pop(tid, None)
        if n is None:
            return False
        self.bytes -= n
        return True

    def fits(self, n: int) -> bool:
        return self.capacity is None or self.bytes + n <= self.capacity


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
        self._host = _Tier("host", host_bytes)
        self._dev = _Tier("device", device_bytes)
        self._entries: dict[str, _Entry] = {}
        self._lock = threading.RLock()

    # -- membership -----------------------------------------------------------------------------
    def add(self, task_id: str, version: str, host: H, reload: Callable[[], H] | None = None,
            **info: Any) -> None:
        """Register (or replace) ``task_id`` with its host value; the old device copy is dropped.
        ``reload`` reads it back from the store after a host eviction. A pin survives a replace."""
        with self._lock:
            old = self._entries.get(task_id)
            self._dev.drop(task_id)
            e = _Entry(version, host, None, reload, pinned=bool(old and old.pinned), info=info)
            self._entries[task_id] = e
            self._host.put(task_id, host.nbytes)
            self._make_room(self._host, 0, keep=(task_id,))

    def remove(self, task_id: str) -> None:
        with self._lock:
            if self._entries.pop(task_id, None) is None:
                raise UnknownTaskError(f"unknown task {task_id!r}")
            self._host.drop(task_id)
            self._dev.drop(task_id)

    def __contains__(self, task_id: str) -> bool:
        return task_id in self._entries

    def __len__(self) -> int:
        return len(self._entries)

    def ids(self) -> list[str]:
        with self._lock:
            return list(self._entries)

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
            self._entry(task_id).pinned = True
            with self.use([task_id]) as (_, usage):
                return usage

    def unpin(self, task_id: str) -> None:
        with self._lock:
            self._entry(task_id).pinned = False

    # -- use ------------------------------------------------------------------------------------
    @contextmanager
    def use(self, task_ids: Sequence[str]) -> Iterator[tuple[list[D], Usage]]:
        """Device values of the (unique) ``task_ids``, loaded as needed; none of them can be evicted
        until the block exits. Unknown ids raise :class:`UnknownTaskError` before anything loads."""
        usage = Usage()
        with self._lock:
            entries = [self._entry(t) for t in task_ids]
            for e in entries:
                e.in_use += 1
        try:
            with self._lock:
                out = [self._ensure_device(t, e, usage) for t, e in zip(task_ids, entries)]
            yield out, usage
        finally:
            with self._lock:
                for e in entries:
                    e.in_use -= 1

    def _ensure_host(self, tid: str, e: _Entry, usage: Usage) -> H:
        if e.host is not None:
            self._host.lru.move_to_end(tid)
            self._host.hits += 1
            return e.host
        if e.reload is None:  # cannot happen: such entries are never dropped from the host tier
            raise UnknownTaskError(f"task {tid!r} has no host copy and no store to reload it from")
        host = e.reload()
        self._host.misses += 1
        usage.store_loads += 1
        usage.evictions += self._make_room(self._host, host.nbytes, keep=(tid,))
        e.host = host
        self._host.put(tid, host.nbytes)
        return host

    def _ensure_device(self, tid: str, e: _Entry, usage: Usage) -> D:
        if e.device is not None:
            self._dev.lru.move_to_end(tid)
            self._dev.hits += 1
            usage.hits += 1
            e.hits += 1
            if e.host is not None:
                self._host.lru.move_to_end(tid)
            return e.device
        host = self._ensure_host(tid, e, usage)
        usage.evictions += self._make_room(self._dev, host.nbytes, keep=(tid,))  # room first, then copy
        dev = host if self._upload is None else self._upload(tid, host)
        e.device = dev
        self._dev.put(tid, dev.nbytes)
        self._dev.misses += 1
        usage.misses += 1
        e.misses += 1
        return dev

    def _make_room(self, tier: _Tier, need: int, keep: Sequence[str] = ()) -> int:
        """Evict least-recently-used tasks from ``tier`` until ``need`` more bytes fit."""
        evicted = 0
        if tier.fits(need):
            return 0
        for tid in list(tier.lru):
            if tier.fits(need):
                break
            e = self._entries[tid]
            if tid in keep or e.pinned or e.in_use:
                continue
            if tier is self._host:
                if e.reload is None:
                    continue  # the only copy: never dropped
                e.host = None
                if self.shared and e.device is not None:
                    e.device = None
                    self._dev.drop(tid)
            else:
                e.device = None
            tier.drop(tid)
            tier.evictions += 1
            e.evictions += 1
            evicted += 1
        if not tier.fits(need):
            tier.over_cap += 1
        return evicted

    # -- capacity -------------------------------------------------------------------------------
    def resize(self, host_bytes: int | None = ..., device_bytes: int | None = ...) -> int:  # type: ignore[assignment]
        """Change a tier's cap (``None``: unbounded) and evict down to it; returns the evictions."""
        with self._lock:
            n = 0
            if host_bytes is not ...:
                self._host.capacity = host_bytes
                n += self._make_room(self._host, 0)
            if device_bytes is not ...:
                self._dev.capacity = device_bytes
                n += self._make_room(self._dev, 0)
            return n

    # -- reporting ------------------------------------------------------------------------------
    def tier(self, task_id: str) -> str:
        """The fastest tier holding ``task_id``: "device", "host" or "store"."""
        e = self._entry(task_id)
        return "device" if e.device is not None else "host" if e.host is not None else "store"

    def residency(self) -> dict[str, dict]:
        """``{task_id: {"tier", "pinned", "in_use", "version", "host_bytes", "device_bytes", "hits",
        "misses", "evictions", ...}}`` (the task's own cache counters since it was added)."""
        with self._lock:
            out = {}
            for tid, e in self._entries.items():
                out[tid] = {"tier": self.tier(tid), "pinned": e.pinned, "in_use": e.in_use, "version": e.version,
                            "host_bytes": self._host.lru.get(tid, 0), "device_bytes": self._dev.lru.get(tid, 0),
                            "reloadable": e.reload is not None, "hits": e.hits, "misses": e.misses,
                            "evictions": e.evictions, **e.info}
            return out

    def device_ids(self) -> list[str]:
        """Task ids on the device tier, least recently used first."""
        with self._lock:
            return list(self._dev.lru)

    def device_value(self, task_id: str) -> D | None:
        """The device value if ``task_id`` is on the device tier (no load, no LRU update)."""
        return self._entry(task_id).device

    def host_value(self, task_id: str) -> H | None:
        """The host value if ``task_id`` is on the host tier (no load, no LRU update)."""
        return self._entry(task_id).host

    def hits(self, tier: str = "device") -> int:
        return self._t(tier).hits

    def misses(self, tier: str = "device") -> int:
        return self._t(tier).misses

    def evictions(self, tier: str = "device") -> int:
        return self._t(tier).evictions

    def nbytes(self, tier: str = "device") -> int:
        return self._t(tier).bytes

    def capacity(self, tier: str = "device") -> int | None:
        return self._t(tier).capacity

    def _t(self, tier: str) -> _Tier:
        if tier not in ("device", "host"):
            raise ValueError(f"tier must be 'device' or 'host', not {tier!r}")
        return self._dev if tier == "device" else self._host

    def stats(self) -> dict:
        with self._lock:
            out: dict[str, Any] = {"tasks": len(self._entries),
                                   "pinned": sum(e.pinned for e in self._entries.values())}
            for t in (self._dev, self._host):
                out.update({f"{t.name}_tasks": len(t.lru), f"{t.name}_bytes": t.bytes,
                            f"{t.name}_capacity": t.capacity, f"{t.name}_hits": t.hits,
                            f"{t.name}_misses": t.misses, f"{t.name}_evictions": t.evictions,
                            f"{t.name}_over_cap": t.over_cap})
            out["store_tasks"] = sum(e.host is None for e in self._entries.values())
            return out
