"""What a decode loop needs of the engine: a slot per task key, plans per batch, the empty slot.

Generation keeps tasks in the same slot tables as the classification override path (rows written
once per task, each batch carries only slot indices), with two differences:

- the slot key is ``task@version``: a request keeps the version it was admitted with even if the
  task is replaced while it decodes (the new version gets its own slot);
- a key is *held* while any request of it is in flight (:meth:`DecodeSlots.hold` /
  :meth:`release`), so no other task can take its slot mid-sequence; and one slot is reserved and
  never written (:attr:`empty`): tokens of the base model read it, and a slot with no rows, columns
  or bias leaves every layer's frozen output exactly as it is.

Every call takes the engine's lock: slot writes never interleave with registration.
"""
from __future__ import annotations

from typing import Sequence

import torch

from .plan import module_plans

__all__ = ["DecodeSlots", "slot_key"]


def slot_key(task_id: str, version: str) -> str:
    return f"{task_id}@{version}"


class DecodeSlots:
    def __init__(self, engine):
        self.engine = engine
        self.hooks = engine.hooks
        self.device = engine.device
        with engine._lock:
            self.empty = engine.assigner.reserve_empty()

    def assign(self, keys: Sequence[str], residents: Sequence) -> tuple[list[int], int]:
        with self.engine._lock:
            return self.engine.assigner.assign(keys, residents)

    def hold(self, key: str) -> None:
        with self.engine._lock:
            self.engine.assigner.hold(key)

    def release(self, key: str) -> None:
        with self.engine._lock:
            self.engine.assigner.release_hold(key)

    def activate(self, per_row: Sequence[int]) -> int:
        """Make the row-op hooks apply slot ``per_row[i]`` to row ``i`` of the next forward's packed
        input (tokens or samples); returns the number of modules with work. All rows of the empty
        slot: nothing is activated, the base runs untouched."""
        self.hooks.active.clear()  # nothing of an earlier forward stays live (one that raised never cleared)
        present = sorted(set(per_row))
        if present == [self.empty]:
            return 0
        t = torch.tensor(per_row, dtype=torch.long).to(self.device, non_blocking=True)
        plans = module_plans(self.engine.slots, present, t)
        self.hooks.active.update(plans)
        return len(plans)

    def deactivate(self) -> None:
        self.hooks.active.clear()
