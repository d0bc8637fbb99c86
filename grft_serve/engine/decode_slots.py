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

Steady state: a decode step over the same sequences as the step before (every sequence decoding one
token, none joined or left) has the same row → slot vector, so :meth:`DecodeSlots.activate` hands
the hooks the SAME per-module plans again — unless a slot was written or a table reallocated since
— and from the first repeat on, those plans keep what they gathered from the tables
(``MixedPlan.gathered``): the per-row index / row values / bias gathers run once per batch
composition instead of once per step, with the same values, so the results are the same bit for bit.
The kept gathers cost :func:`~grft_serve.engine.plan.gather_bytes` per row; a batch over
``keep_bytes`` (a long prefill chunk repeating) does not keep them; ``keep_bytes=0`` plans every
step afresh.
"""
from __future__ import annotations

from typing import Sequence

import torch

from .plan import gather_bytes, module_plans

__all__ = ["DEFAULT_KEEP_BYTES", "DecodeSlots", "slot_key"]

DEFAULT_KEEP_BYTES = 128 << 20


def slot_key(task_id: str, version: str) -> str:
    return f"{task_id}@{version}"


class DecodeSlots:
    def __init__(self, engine, keep_bytes: int = DEFAULT_KEEP_BYTES):
        self.engine = engine
        self.hooks = engine.hooks
        self.device = engine.device
        self.keep_bytes = int(keep_bytes)
        self._last: tuple | None = None  # (stamp, plans, kept) of the last activation
        self.reused = False  # whether the last activation reused the plans before it
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
        self.reused = False
        present = sorted(set(per_row))
        if present == [self.empty]:
            return 0
        plans = self._plans(per_row, present)
        self.hooks.active.update(plans)
        return len(plans)

    def _plans(self, per_row: Sequence[int], present: list[int]) -> dict:
        """The last activation's plans when nothing changed since (same rows, no slot written, no
        table reallocated), keeping their gathers from the first repeat on; else new plans."""
        stamp = (tuple(per_row), self.engine.assigner.loads, self.engine.slots.generation)
        last = self._last
        if last is not None and last[0] == stamp and self.keep_bytes > 0:
            plans, self.reused = last[1], True
            if not last[2]:
                if len(per_row) * gather_bytes(plans) <= self.keep_bytes:
                    for p in plans.values():
                        p.gathered = {}
                self._last = (stamp, plans, True)
            return plans
        t = torch.tensor(per_row, dtype=torch.long).to(self.device, non_blocking=True)
        plans = module_plans(self.engine.slots, present, t)
        self._last = (stamp, plans, False) if self.keep_bytes > 0 else None
        return plans

    def deactivate(self) -> None:
        self.hooks.active.clear()

    def reset(self) -> None:
        """Nothing active, nothing kept (the decode loop stops)."""
        self.hooks.active.clear()
        self._last = None
