"""One least-recently-used map, capped by size, with pins, in-use holds and an eviction callback.

The engine keeps three things least-recently-used: the host tier (task → packed buffer, sized in
bytes), the device tier (task → resident buffer, bytes) and the slot tables' task → slot map (size 1
per slot, capacity = the number of slots). All three are this class (the shape of vLLM's
``vllm/utils/cache.py`` LRU: ``getsizeof``, ``pin``, ``on_remove``):

- **size**: every key has a size (``getsizeof(value)``, default 1); :meth:`make_room` evicts least
  recently used keys until ``need`` more fits under ``capacity`` (None: unbounded).
- **protection**: a key is never evicted while it is *pinned* (:meth:`pin`, until :meth:`unpin`), *held*
  (:meth:`hold` / :meth:`release`, counted: one hold per running user), listed in ``keep`` of the
  :meth:`make_room` call, or refused by the ``evictable`` predicate (e.g. a value with no other copy).
  Pins and holds belong to the key, not to its current value: they may be set before the key is
  inserted and survive :meth:`pop` / re-insertion (a replaced task stays pinned).
- **over the cap**: when everything left is protected, :meth:`make_room` leaves the map over its cap
  rather than fail the caller, and counts it (``over_cap``).
- **eviction**: ``on_evict(key, value)`` runs for every key :meth:`make_room` drops (not for an
  explicit :meth:`pop`). Counters: ``hits`` / ``misses`` (:meth:`get`), ``evictions``, ``over_cap``.

:meth:`put` never evicts: a caller makes room *before* it builds the value (so a new device copy is
allocated only after the old ones are gone), then puts it. Not thread-safe: its owner holds a lock.
"""
from __future__ import annotations

from collections import OrderedDict
from typing import Callable, Generic, Hashable, Iterable, Iterator, TypeVar

__all__ = ["LRU"]

K = TypeVar("K", bound=Hashable)
V = TypeVar("V")


class LRU(Generic[K, V]):
    """``key → value``, least recently used first (see the module docstring)."""

    def __init__(self, capacity: int | None = None, *, getsizeof: Callable[[V], int] | None = None,
                 on_evict: Callable[[K, V], None] | None = None, evictable: Callable[[K], bool] | None = None,
                 name: str = ""):
        self.capacity = capacity
        self.name = name
        self._getsizeof = getsizeof
        self._on_evict = on_evict
        self._evictable = evictable
        self._data: OrderedDict[K, tuple[V, int]] = OrderedDict()  # key -> (value, size), least recent first
        self._pins: set[K] = set()
        self._holds: dict[K, int] = {}
        self.size = 0  # sum of the sizes of the keys present
        self.hits = self.misses = self.evictions = 0
        self.over_cap = 0  # make_room calls that had to leave the map over its cap

    # -- membership -----------------------------------------------------------------------------
    def __contains__(self, key: object) -> bool:
        return key in self._data

    def __len__(self) -> int:
        return len(self._data)

    def __iter__(self) -> Iterator[K]:
        """Keys, least recently used first."""
        return iter(self._data)

    def get(self, key: K) -> V | None:
        """The value (now the most recently used), counted as a hit; None (a miss) if absent."""
        item = self._data.get(key)
        if item is None:
            self.misses += 1
            return None
        self._data.move_to_end(key)
        self.hits += 1
        return item[0]

    def peek(self, key: K) -> V | None:
        """The value if present; no reordering, no counting."""
        item = self._data.get(key)
        return None if item is None else item[0]

    def touch(self, key: K) -> None:
        """Mark ``key`` most recently used (no counting; absent keys are ignored)."""
        if key in self._data:
            self._data.move_to_end(key)

    def size_of(self, key: K) -> int:
        """The size ``key`` counts for (0 if absent)."""
        item = self._data.get(key)
        return 0 if item is None else item[1]

    def put(self, key: K, value: V) -> None:
        """Insert or replace ``key`` as the most recently used; never evicts (see :meth:`make_room`)."""
        self.pop(key)
        n = 1 if self._getsizeof is None else int(self._getsizeof(value))
        self._data[key] = (value, n)
        self.size += n

    def pop(self, key: K) -> V | None:
        """Remove ``key`` (not an eviction: no callback, not counted); its pins and holds stay."""
        item = self._data.pop(key, None)
        if item is None:
            return None
        self.size -= item[1]
        return item[0]

    # -- protection -----------------------------------------------------------------------------
    def pin(self, key: K) -> None:
        self._pins.add(key)

    def unpin(self, key: K) -> None:
        self._pins.discard(key)

    def pinned(self, key: K) -> bool:
        return key in self._pins

    def hold(self, keys: Iterable[K]) -> None:
        """One more user of each of ``keys``: not evicted until as many :meth:`release` calls."""
        for k in keys:
            self._holds[k] = self._holds.get(k, 0) + 1

    def release(self, keys: Iterable[K]) -> None:
        for k in keys:
            n = self._holds.get(k, 0) - 1
            if n > 0:
                self._holds[k] = n
            else:
                self._holds.pop(k, None)

    def holds(self, key: K) -> int:
        """How many users hold ``key`` now."""
        return self._holds.get(key, 0)

    def protected(self, key: K) -> bool:
        return key in self._pins or key in self._holds or (self._evictable is not None and not self._evictable(key))

    # -- capacity -------------------------------------------------------------------------------
    def fits(self, need: int = 0) -> bool:
        return self.capacity is None or self.size + need <= self.capacity

    def make_room(self, need: int = 0, keep: Iterable[K] = ()) -> list[tuple[K, V]]:
        """Evict least recently used, unprotected keys (not in ``keep``) until ``need`` more fits;
        returns the evicted ``(key, value)`` pairs, oldest first."""
        if self.fits(need):
            return []
        keep = set(keep)
        evicted = []
        for key in list(self._data):
            if self.fits(need):
                break
            if key in keep or self.protected(key):
                continue
            value = self.pop(key)
            self.evictions += 1
            evicted.append((key, value))
            if self._on_evict is not None:
                self._on_evict(key, value)
        if not self.fits(need):
            self.over_cap += 1
        return evicted

    def resize(self, capacity: int | None) -> list[tuple[K, V]]:
        """A new cap (None: unbounded); evicts down to it and returns what went."""
        self.capacity = capacity
        return self.make_room(0)

    def stats(self) -> dict:
        return {"len": len(self._data), "size": self.size, "capacity": self.capacity, "hits": self.hits,
                "misses": self.misses, "evictions": self.evictions, "over_cap": self.over_cap}

    def __repr__(self) -> str:
        return f"LRU({self.name or 'unnamed'}: {len(self._data)} keys, size {self.size}/{self.capacity})"
