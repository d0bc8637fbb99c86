"""The override path: a batch of several tasks in ONE forward, no weight written.

Per batch: the :class:`~grft_serve.engine.assign.SlotAssigner` gives each task a slot (writing the
task's rows into the slot tables only if it is not there yet), the sample → slot index goes to the
device in one copy, and :func:`~grft_serve.engine.plan.module_plans` says per module how much of the
tables this batch needs (:class:`~grft_serve.engine.plan.BatchPlan`). The forward hooks then correct
every patchable layer's output per sample (:func:`grft_serve.core.rowop.apply_mixed`) and the heads
are one ``bmm`` from the slot tables. The base weights are only read, so this path is safe beside
anything that reads them.
"""
from __future__ import annotations

from typing import Any, Callable, Sequence

import torch

from ..core.rowop import RowOpHooks
from .assign import SlotAssigner
from .graphs import GraphRunner
from .plan import BatchPlan, applied, module_plans
from .slots import SlotTables

__all__ = ["OverridePath"]


class OverridePath:
    """Mixed batches of ``backbone`` through slot tables and row-op hooks (see the module docstring)."""

    name = "override"

    def __init__(self, backbone: Callable[[Any], torch.Tensor], tables: SlotTables, assigner: SlotAssigner,
                 hooks: RowOpHooks, device: torch.device, graphs: GraphRunner | None = None):
        self.backbone, self.tables, self.assigner, self.hooks = backbone, tables, assigner, hooks
        self.device, self.graphs = device, graphs

    def prepare(self, unique: Sequence[str], residents: Sequence, sample_pos: Sequence[int]) -> BatchPlan:
        """The per-batch work before the forward: slots for the tasks (written if new), the sample →
        slot index (one host-to-device copy) and, without graphs, the per-module plans."""
        slots, loads = self.assigner.assign(unique, residents)
        sample_slot = [slots[p] for p in sample_pos]
        slot = torch.tensor(sample_slot, dtype=torch.long).to(self.device, non_blocking=True)
        modules = None if self.graphs else module_plans(self.tables, slots, slot)
        return BatchPlan(slots, sample_slot, slot, modules, loads)

    def run(self, batch: Any, unique: Sequence[str], residents: Sequence,
            sample_pos: Sequence[int]) -> tuple[list[torch.Tensor], int]:
        """Logits per sample (float32, CPU) of ``batch`` on the device, whose sample ``i`` belongs to
        task ``unique[sample_pos[i]]`` (device values ``residents``); and the slot loads it took."""
        plan = self.prepare(unique, residents, sample_pos)
        feats = self.graphs.run(batch, "override", sample_slot=plan.slot) if self.graphs else None
        if feats is None:
            if plan.modules is None:  # the graph declined this batch (size / capture): plan it now
                plan.modules = module_plans(self.tables, plan.slots, plan.slot)
            with applied(self.hooks, plan.modules):
                feats = self.backbone(batch)
        return self.tables.heads(feats, plan.slot, plan.sample_slot), plan.loads  # one bmm for all the heads
