"""Which task holds which slot of the slot tables: one LRU over the slots, pins, stale uploads.

The task → slot map is an :class:`~grft_serve.engine.lru.LRU` with size 1 per task and capacity
``max_slots`` (the slot count; it grows with the tables when every slot is protected). A task keeps
its slot across batches, so its rows are written once (:meth:`SlotTables.write
<grft_serve.engine.slots.SlotTables.write>`) and then only referenced by index. A slot is reused for
another task only when every slot is taken; the least recently used task goes, never one of the
running batch (``keep``) nor a pinned one (:meth:`SlotAssigner.pin`). When all of them are in the
batch or pinned the tables grow instead (the batch is served, over the cap).

A task's slot is rewritten when its device upload changes (``Resident.gen``: replaced, or evicted
from the device tier and uploaded again). :meth:`SlotAssigner.release` forgets a task's slot and
clears it (unregistered or replaced). A slot that is never written is exactly the base, so a "no
task" slot (base-model rows in a mixed decode batch) is one that a pinned sentinel key holds.
"""
from __future__ import annotations

from typing import Sequence

import torch

from .lru import LRU
from .slots import SlotTables

__all__ = ["SlotAssigner"]

_EMPTY = "\x00empty"  # not a valid task id: no task can take this key


class SlotAssigner:
    """Task → slot of ``tables`` (LRU over ``max_slots`` slots, see the module docstring)."""

    def __init__(self, tables: SlotTables, max_slots: int = 64):
        self.tables = tables
        self.max_slots = max(1, int(max_slots))
        self.lru: LRU[str, int] = LRU(max(self.max_slots, tables.capacity), on_evict=self._evicted, name="slots")
        self._gen: list[int | None] = [None] * tables.capacity  # upload written into each slot; None: free
        self.loads = 0  # tasks written into a slot

    def assign(self, task_ids: Sequence[str], residents: Sequence) -> tuple[list[int], int]:
        """A slot for each (unique) task of a batch, writing the tasks not already there; returns
        (slots, loads). No slot of ``task_ids`` is reused by this call."""
        out, new = [], []
        for tid, r in zip(task_ids, residents):
            s = self.lru.get(tid)
            if s is not None and self._gen[s] == r.gen:
                out.append(s)
                continue
            if s is None:
                s = self._free_slot(task_ids)
                self.lru.put(tid, s)
            self._gen[s] = r.gen  # reserved now, written below
            new.append((s, r))
            out.append(s)
        by_layout: dict[int, list] = {}
        for s, r in new:
            by_layout.setdefault(id(r.layout), []).append((s, r))
        for group in by_layout.values():  # one stacked write per task structure
            self.tables.write([s for s, _ in group], [r for _, r in group])
        self.loads += len(new)
        return out, len(new)

    @torch.inference_mode()  # the tables are inference tensors (built in the engine's forward)
    def release(self, task_id: str) -> None:
        """Forget ``task_id``'s slot (unregistered or replaced); a pin stays."""
        s = self.lru.pop(task_id)
        if s is not None:
            self.tables.clear([s])
            self._gen[s] = None

    def pin(self, task_id: str) -> None:
        """Never give ``task_id``'s slot to another task (from when it gets one)."""
        self.lru.pin(task_id)

    def unpin(self, task_id: str) -> None:
        self.lru.unpin(task_id)

    def hold(self, key: str) -> None:
        """Protect ``key``'s slot (from when it gets one) until :meth:`release_hold`: a generation
        task with sequences in flight (counted: one hold per call)."""
        self.lru.hold([key])

    def release_hold(self, key: str) -> None:
        self.lru.release([key])

    def reserve_empty(self) -> int:
        """A slot that is never written nor given to a task: every table reads zero rows there, which
        is exactly the base model (the tokens of base-model requests in a mixed decode batch)."""
        s = self.lru.peek(_EMPTY)
        if s is None:
            s = self._free_slot([])
            self.lru.put(_EMPTY, s)
            self.lru.pin(_EMPTY)
            self._gen[s] = -1
        return s

    def slot_of(self, task_id: str) -> int | None:
        return self.lru.peek(task_id)

    def _evicted(self, task_id: str, slot: int) -> None:
        self._gen[slot] = None  # its contents are cleared by the write that takes the slot

    def _free_slot(self, keep: Sequence[str]) -> int:
        if len(self.lru) >= self.tables.capacity:  # every slot is taken
            if self.tables.capacity < self.max_slots:
                self._grow(min(2 * self.tables.capacity, self.max_slots))
            elif not self.lru.make_room(1, keep):  # every slot is in this batch or pinned: more slots
                self._grow(2 * self.tables.capacity)
        return self._gen.index(None)

    def _grow(self, capacity: int) -> None:
        self._gen += [None] * (capacity - self.tables.capacity)
        self.tables.grow(capacity)
        self.lru.capacity = max(self.max_slots, capacity)

    def stats(self) -> dict:
        return {"slots": self.tables.capacity, "slots_used": len(self.lru), "max_slots": self.max_slots,
                "slot_loads": self.loads, "slot_evictions": self.lru.evictions, "slot_bytes": self.tables.nbytes()}
