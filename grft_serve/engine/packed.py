"""One contiguous buffer per task, laid out by a layout shared between tasks of the same structure.

A task is stored as ONE ``uint8`` buffer so that moving it between tiers is a single copy:

- ``<module>.indices``  int64 [k] per patched module;
- ``g<G>.idx`` int64 [Σk] and ``g<G>.rows`` [Σk, n]: the new rows of every row-patched module whose
  rows have length ``n`` (group ``G`` of the engine's flat weight buffers), with ``g<G>.idx`` the
  rows' positions in that flat buffer — a whole-task patch is one ``index_copy_`` per group;
- ``<module>.values`` [out, k, ...]: the new columns of a column-patched module;
- ``bias.values``: the task's new biases of every module it gives a bias, concatenated in the order
  of the engine's flat bias buffer (the positions are layout facts, kept once per layout);
- ``head.weight`` / ``head.bias``.

Everything else the serving paths need (``C − W[:, idx]``, the selected rows' bias, ``b_task − b_base``)
is derived from these and the base when a task is written into a slot table (:mod:`grft_serve.engine.slots`),
so the host tier holds about the package's own bytes. Tasks with the same modules, modes, k and
dtypes share one :class:`Layout` object: per task the host tier keeps a buffer and a reference.
"""
from __future__ import annotations

import itertools
from dataclasses import dataclass
from typing import Iterator

import torch

from ..core.rowop import COLUMN, ROW
from .flat import FlatWeights

__all__ = ["Layout", "Packed", "Packer", "Resident", "structure_key"]

_ALIGN = 64
_GEN = itertools.count(1)


def _nbytes(dtype: torch.dtype, shape: tuple[int, ...]) -> int:
    n = dtype.itemsize
    for s in shape:
        n *= s
    return n


def structure_key(pkg, dtype: torch.dtype, row_group: dict[str, int]) -> tuple:
    """What determines a task's layout: per module (name, mode, k, has bias), head shape, dtype."""
    mods = tuple(sorted((n, d.mode, d.k, d.bias is not None, row_group.get(n, -1)) for n, d in pkg.deltas.items()))
    head = None if pkg.head_weight is None else tuple(pkg.head_weight.shape)  # None: a generation task
    return mods, head, dtype


class Layout:
    """Offsets of every tensor of one task structure in its buffer (shared by all such tasks).

    ``shapes`` maps module name -> weight shape; ``bias_offset`` the module's first position in the
    engine's flat bias buffer (every patchable module has one, zeros where the base has no bias).
    """

    def __init__(self, key: tuple, shapes: dict[str, tuple[int, ...]], bias_offset: dict[str, int]):
        mods, head_shape, dtype = key
        self.dtype = dtype
        self.modes = {n: mode for n, mode, *_ in mods}
        self.entries: dict[str, tuple[torch.dtype, tuple[int, ...], int]] = {}
        self.row_slices: dict[str, tuple[int, int, int]] = {}  # module -> (group, first row, k)
        self.bias_modules: list[tuple[str, int, int]] = []  # (module, start in bias.values, length)
        self.free_bias: list[str] = []  # bias modules whose base has no bias (set by the engine)
        off = 0

        def add(name, dt, shape):
            nonlocal off
            self.entries[name] = (dt, tuple(shape), off)
            off += -(-_nbytes(dt, tuple(shape)) // _ALIGN) * _ALIGN

        groups: dict[int, int] = {}
        group_n: dict[int, int] = {}
        bias_len = 0
        bias_pos: list[torch.Tensor] = []
        for name, mode, k, has_bias, gid in mods:
            shape = shapes[name]
            add(f"{name}.indices", torch.int64, (k,))
            if mode == ROW:
                start = groups.get(gid, 0)
                self.row_slices[name] = (gid, start, k)
                groups[gid] = start + k
                group_n[gid] = _nbytes(torch.uint8, shape[1:])
            else:
                add(f"{name}.values", dtype, (shape[0], k, *shape[2:]))
            if has_bias:
                self.bias_modules.append((name, bias_len, shape[0]))
                bias_pos.append(torch.arange(bias_offset[name], bias_offset[name] + shape[0]))
                bias_len += shape[0]
        self.groups = sorted(groups.items())  # (group id, total rows)
        for gid, total in self.groups:
            add(f"g{gid}.idx", torch.int64, (total,))
            add(f"g{gid}.rows", dtype, (total, group_n[gid]))
        if bias_len:
            add("bias.values", dtype, (bias_len,))
        self.has_head = head_shape is not None
        if self.has_head:
            add("head.weight", dtype, head_shape)
            add("head.bias", dtype, head_shape[:1])
        self.nbytes = max(off, _ALIGN)
        self._bias_idx_cpu = torch.cat(bias_pos) if bias_pos else None
        self._bias_idx: dict[torch.device, torch.Tensor] = {}

    def bias_index(self, device: torch.device) -> torch.Tensor | None:
        """Positions of ``bias.values`` in the engine's flat bias buffer (one tensor per layout)."""
        if self._bias_idx_cpu is None:
            return None
        t = self._bias_idx.get(device)
        if t is None:
            t = self._bias_idx[device] = self._bias_idx_cpu.to(device)
        return t

    def view(self, buf: torch.Tensor, name: str) -> torch.Tensor:
        dt, shape, o = self.entries[name]
        return buf[o:o + _nbytes(dt, shape)].view(dt).view(shape)

    def view_many(self, bufs: torch.Tensor, name: str) -> torch.Tensor:
        """``name`` of every task in ``bufs`` [G, nbytes] (buffers of this layout, stacked): [G, *shape]."""
        dt, shape, o = self.entries[name]
        return bufs[:, o:o + _nbytes(dt, shape)].view(dt).view(bufs.shape[0], *shape)


@dataclass
class Packed:
    """A task on the host: its buffer and its (shared) layout."""

    buf: torch.Tensor
    layout: Layout

    @property
    def nbytes(self) -> int:
        return self.buf.numel()

    @classmethod
    def pack(cls, pkg, layout: Layout, row_offset: dict[str, tuple[int, int]], pin: bool) -> "Packed":
        buf = torch.empty(layout.nbytes, dtype=torch.uint8, pin_memory=pin)
        v = lambda n: layout.view(buf, n)  # noqa: E731
        dt = layout.dtype
        for name, d in pkg.deltas.items():
            v(f"{name}.indices").copy_(d.indices)
            if d.mode == ROW:
                gid, start, k = layout.row_slices[name]
                v(f"g{gid}.idx")[start:start + k].copy_(d.indices + row_offset[name][1])
                rows = v(f"g{gid}.rows")
                rows[start:start + k].copy_(d.values.reshape(k, rows.shape[1]).to(dt))
            else:
                v(f"{name}.values").copy_(d.values.to(dt))
        if layout.bias_modules:
            bv = v("bias.values")
            for name, s, n in layout.bias_modules:
                bv[s:s + n].copy_(pkg.deltas[name].bias.to(dt))
        if layout.has_head:
            v("head.weight").copy_(pkg.head_weight.to(dt))
            v("head.bias").copy_(pkg.head_bias.to(dt))
        return cls(buf, layout)


class Packer:
    """Packs validated packages for one engine's base (its flat buffers fix row groups and bias
    positions); one :class:`Layout` per task structure, shared by every task of that structure.
    ``pin``: page-locked host buffers (for fast, asynchronous uploads to a CUDA device)."""

    def __init__(self, flat: FlatWeights, pin: bool = False):
        self.flat, self.pin = flat, pin
        self._layouts: dict[tuple, Layout] = {}

    def __call__(self, pkg) -> Packed:
        flat = self.flat
        key = structure_key(pkg, flat.dtype, flat.row_group)
        layout = self._layouts.get(key)
        if layout is None:
            shapes = {n: tuple(flat.modules[n].weight.shape) for n in pkg.deltas}
            layout = self._layouts[key] = Layout(key, shapes, flat.bias_offset)
            layout.free_bias = [n for n, *_ in layout.bias_modules if n in flat.free_bias]
        return Packed.pack(pkg, layout, flat.row_offset, pin=self.pin)


class Resident:
    """A task on the engine's device: its buffer (one copy of the host buffer, or the host buffer
    itself on CPU) and the few views the patch path and the heads use (column views are made on
    demand, :meth:`columns`), so a resident task costs a handful of tensor objects."""

    def __init__(self, packed: Packed, device: torch.device):
        self.packed = packed if packed.buf.device == device else \
            Packed(packed.buf.to(device, non_blocking=True, copy=True), packed.layout)
        lay, buf = self.packed.layout, self.packed.buf
        self.layout = lay
        self.gen = next(_GEN)  # identifies this upload (slot tables reload when it changes)
        self.row_groups = [(gid, lay.view(buf, f"g{gid}.idx"), lay.view(buf, f"g{gid}.rows")) for gid, _ in lay.groups]
        self.bias_patch = (lay.bias_index(device), lay.view(buf, "bias.values")) if lay.bias_modules else None
        self.head_w = lay.view(buf, "head.weight") if lay.has_head else None
        self.head_b = lay.view(buf, "head.bias") if lay.has_head else None

    @property
    def nbytes(self) -> int:
        return self.packed.nbytes

    def columns(self) -> Iterator[tuple[str, torch.Tensor, torch.Tensor]]:
        """``(module, indices, new columns)`` of the column-patched modules."""
        lay, buf = self.layout, self.packed.buf
        for name, mode in lay.modes.items():
            if mode == COLUMN:
                yield name, lay.view(buf, f"{name}.indices"), lay.view(buf, f"{name}.values")
