"""The base's patchable weights and biases as views into a few flat buffers, and the whole-task patch.

Every patchable weight is re-homed as a view into one flat buffer per row length, so writing all of a
task's new rows into the base is one ``index_copy_`` per row length (the rows' positions in those
buffers are precomputed per task, :mod:`grft_serve.engine.packed`). Every patchable module also has a place
in ONE flat bias buffer: the base bias where there is one, zeros where the base has none. A task may
give a bias-free module a bias; that module gets its zero slice as ``bias`` while the task is patched
in and ``None`` again afterwards, so the base's own outputs never change. :meth:`FlatWeights.patched`
restores the pretrained values in a ``finally``.
"""
from __future__ import annotations

from contextlib import contextmanager
from typing import TYPE_CHECKING

import torch
from torch import nn

if TYPE_CHECKING:
    from .packed import Resident

__all__ = ["FlatWeights"]


class FlatWeights:
    """Flat weight and bias buffers of ``modules`` (converted to ``dtype`` on ``device`` already)."""

    def __init__(self, modules: dict[str, nn.Module], dtype: torch.dtype, device: torch.device):
        self.modules, self.dtype, self.device = modules, dtype, device
        self._build()

    def _build(self) -> None:
        """Re-home every patchable weight as a view into one flat buffer per row length, and every
        bias into one flat bias buffer (bias-free modules get a zero slice, attached only while a
        task that gives them a bias is patched in)."""
        by_len: dict[int, list[str]] = {}
        for name, m in self.modules.items():
            by_len.setdefault(m.weight[0].numel(), []).append(name)
        self.row_buffers: list[torch.Tensor] = []
        self.row_offset: dict[str, tuple[int, int]] = {}  # module -> (group id, first row)
        for gid, (n, names) in enumerate(sorted(by_len.items())):
            total = sum(self.modules[nm].weight.shape[0] for nm in names)
            buf = torch.empty(total, n, dtype=self.dtype, device=self.device)
            off = 0
            for nm in names:
                m = self.modules[nm]
                rows = m.weight.shape[0]
                buf[off:off + rows].copy_(m.weight.detach().reshape(rows, n))
                m.weight = nn.Parameter(buf[off:off + rows].view(m.weight.shape), requires_grad=False)
                self.row_offset[nm] = (gid, off)
                off += rows
            self.row_buffers.append(buf)
        total = sum(m.weight.shape[0] for m in self.modules.values())
        self.bias_buffer = torch.zeros(total, dtype=self.dtype, device=self.device)
        self.bias_offset: dict[str, int] = {}
        self.free_bias: dict[str, nn.Parameter] = {}  # bias-free modules' zero slices
        off = 0
        for nm, m in self.modules.items():
            n = m.weight.shape[0]
            view = nn.Parameter(self.bias_buffer[off:off + n], requires_grad=False)
            if m.bias is not None:
                view.data.copy_(m.bias.detach())
                m.bias = view
            else:
                self.free_bias[nm] = view
            self.bias_offset[nm] = off
            off += n
        self.row_group = {nm: gid for nm, (gid, _) in self.row_offset.items()}

    def base_bias(self, name: str) -> torch.Tensor | None:
        """The module's pretrained bias (a view into the bias buffer), or None where it has none."""
        return self.modules[name].bias

    @contextmanager
    def patched(self, r: "Resident"):
        """Write ``r``'s rows/columns/biases into the base; restore the pretrained values on exit."""
        saved: list = []
        attached: list[nn.Module] = []
        try:
            for gid, gidx, rows in r.row_groups:
                buf = self.row_buffers[gid]
                saved.append((buf, 0, gidx, buf.index_select(0, gidx)))
                buf.index_copy_(0, gidx, rows)
            for name, idx, vals in r.columns():
                w = self.modules[name].weight
                saved.append((w, 1, idx, w.index_select(1, idx)))
                w.index_copy_(1, idx, vals)
            if r.bias_patch is not None:
                bidx, bval = r.bias_patch
                saved.append((self.bias_buffer, 0, bidx, self.bias_buffer.index_select(0, bidx)))
                self.bias_buffer.index_copy_(0, bidx, bval)
                for name in r.layout.free_bias:
                    m = self.modules[name]
                    attached.append(m)
                    m.bias = self.free_bias[name]
            yield
        finally:
            for m in attached:
                m.bias = None
            for t, dim, idx, old in reversed(saved):
                t.index_copy_(dim, idx, old)
