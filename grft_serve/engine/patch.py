"""The patch path: one task at a time, its rows written into the base weights for the forward.

For each task of the batch (one, normally: the engine picks this path for single-task batches) the
task's rows, columns and biases are written into the flat weight buffers with ``index_copy_``, the
plain base forward runs on that task's samples, and the pretrained values are restored in a
``finally`` (:meth:`FlatWeights.patched <grft_serve.engine.flat.FlatWeights.patched>`). Then each
task's head runs on its samples' features, with one device-to-host copy for the whole batch.
"""
from __future__ import annotations

from typing import Any, Callable, Sequence

import torch
import torch.nn.functional as F

from ..core.backbones import Backbone
from .flat import FlatWeights
from .graphs import GraphRunner
from .packed import Resident

__all__ = ["PatchPath"]


class PatchPath:
    """Batches of ``backbone`` with each task patched into ``flat`` in turn (see the module docstring)."""

    name = "patch"

    def __init__(self, backbone: Callable[[Any], torch.Tensor], flat: FlatWeights, device: torch.device,
                 graphs: GraphRunner | None = None):
        self.backbone, self.flat, self.device, self.graphs = backbone, flat, device, graphs

    def run(self, batch: Any, unique: Sequence[str], residents: Sequence[Resident],
            sample_pos: Sequence[int]) -> tuple[list[torch.Tensor], int]:
        """Logits per sample (float32, CPU) of ``batch`` on the device, whose sample ``i`` belongs to
        task ``unique[sample_pos[i]]`` (device values ``residents``); and the slot loads (none)."""
        # per-task sample lists are built on the host: no device syncs for the routing
        groups: list[list[int]] = [[] for _ in unique]
        for i, p in enumerate(sample_pos):
            groups[p].append(i)
        sel = [torch.tensor(g, device=self.device) for g in groups] if len(unique) > 1 else None
        parts = []
        for i, r in enumerate(residents):
            sub = batch if sel is None else Backbone.batch_select(batch, sel[i])
            with self.flat.patched(r):
                f = self.graphs.run(sub, "patch", tuple(r.layout.free_bias)) if self.graphs else None
                parts.append(self.backbone(sub) if f is None else f)
        return _heads(parts, residents, groups), 0


def _heads(parts: Sequence[torch.Tensor], residents: Sequence[Resident], groups: Sequence[list[int]]) -> list:
    """Each task's head on its samples' features; ONE device-to-host copy for the whole batch."""
    outs = [F.linear(f.to(r.head_w.dtype), r.head_w, r.head_b).float().flatten() for f, r in zip(parts, residents)]
    flat = torch.cat(outs).cpu() if len(outs) > 1 else outs[0].cpu()
    logits: list = [None] * sum(len(g) for g in groups)
    pos = 0
    for g, r in zip(groups, residents):
        c = r.head_w.shape[0]
        block = flat[pos:pos + len(g) * c].view(len(g), c)
        pos += len(g) * c
        for j, s in enumerate(g):
            logits[s] = block[j]
    return logits
