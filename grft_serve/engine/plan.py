"""The override path's per-batch plan: which slot each sample reads, and how much of each table.

A mixed batch needs nothing from its tasks but slot numbers: the slot tables already hold every
task's rows (:mod:`grft_serve.engine.slots`). :class:`BatchPlan` is the small per-batch record
(LoRAX's per-batch dataclasses): the slots present, the slot of each sample on the host (heads) and
on the device (``slot``, the one index every patchable module gathers with), and the per-module
:class:`~grft_serve.core.rowop.MixedPlan` s the forward hooks apply.

``slot`` is per *sample* today (``[B]``, indexing dim 0 of each layer's input). A packed decode batch
(``x [1, N, H]``, one row per token) plans the same way with a token → slot vector ``[N]``; a token
of no task reads a slot nothing was written to, which is exactly the base.
"""
from __future__ import annotations

import math
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Iterator, Sequence

import numpy as np
import torch

from ..core.rowop import MixedPlan, RowOpHooks
from .slots import SlotTables

__all__ = ["BatchPlan", "applied", "gather_bytes", "module_plans"]


@dataclass
class BatchPlan:
    """One override batch: ``slots`` (one per unique task, in task order), ``sample_slot`` (host, one
    per sample), ``slot`` (the same on the device), ``modules`` (per-module plans; None when a
    captured graph brings its own static plans) and ``loads`` (tasks written into a slot for it)."""

    slots: list[int]
    sample_slot: list[int]
    slot: torch.Tensor
    modules: dict[str, MixedPlan] | None = None
    loads: int = 0


def module_plans(tables: SlotTables, slots: Sequence[int], slot: torch.Tensor,
                 static: bool = False) -> dict[str, MixedPlan]:
    """Per-module :class:`MixedPlan` for a batch over ``slots`` (modules no present task touches
    are left out, so their hooks stay idle). ``static``: use whole tables and always mask / add
    the bias (one plan that is valid for any batch, for captured graphs)."""
    present = np.asarray(slots)
    kr = tables.k_row[:, present].max(1)
    kc = tables.k_col[:, present].max(1)
    hb = tables.has_bias[:, present].any(1)
    mask = (kr > 0) & (tables.k_row[:, present] == 0).any(1)
    plans = {}
    for name, r, c, b, m in zip(tables.names, kr.tolist(), kc.tolist(), hb.tolist(), mask.tolist()):
        t = tables.tables[name]
        if static:
            r = 0 if t.row_idx is None else t.row_idx.shape[1]
            c = 0 if t.col_idx is None else t.col_idx.shape[1]
            b, m = t.bias_delta is not None, r > 0
        if r or c or b:
            plans[name] = MixedPlan(t, slot, r, c, m, b)
    return plans


def gather_bytes(plans: dict[str, MixedPlan]) -> int:
    """Bytes that :func:`~grft_serve.core.rowop.apply_mixed` gathers from the tables per sample (or
    token) under ``plans``: what keeping the gathers (``MixedPlan.gathered``) costs per row."""
    n = 0
    for p in plans.values():
        t = p.tables
        if p.k_row:
            n += p.k_row * (math.prod(t.row_shape) * t.row_vals.element_size() + t.row_idx.element_size()
                            + t.row_bias.element_size() + t.row_valid.element_size())
        if p.k_col:
            n += p.k_col * (t.out * math.prod(t.col_rest) * t.col_delta.element_size() + t.col_idx.element_size())
        if p.bias:
            n += t.out * t.bias_delta.element_size()
    return n


@contextmanager
def applied(hooks: RowOpHooks, plans: dict[str, MixedPlan]) -> Iterator[None]:
    """The hooks apply ``plans`` while the block runs (the forward); idle again afterwards, also on error."""
    try:
        hooks.active.update(plans)
        yield
    finally:
        hooks.active.clear()
