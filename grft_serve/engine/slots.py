"""Slot tables: the device-resident tasks' rows, columns and biases in preallocated per-module buffers.

For a batch whose samples belong to different tasks, every patchable module needs, per sample, the
task's selected rows (or columns, or bias). Instead of stacking them per batch, each module keeps
buffers with one *slot* per task (the design of multi-LoRA servers' stacked adapter weights):

- row mode: ``row_idx`` [S, K] (long), ``row_vals`` [S, K, *W.shape[1:]], ``row_bias`` [S, K] (the
  bias each selected row gets: the task's, else the base's, else 0), ``row_valid`` [S, K];
- column mode: ``col_idx`` [S, Kc], ``col_delta`` [S, out, Kc, ...] = ``C − W[:, idx]``;
- bias: ``bias_delta`` [S, out] = ``b_task − b_base`` (``b_task`` where the base has no bias).

Writing a task into a slot happens once, when the task first joins a mixed batch: which task gets
which slot is the :class:`~grft_serve.engine.assign.SlotAssigner`'s business (LRU over ``max_slots``
slots); this module only holds the buffers and writes / clears / grows them (the per-slot
create / set / reset of vLLM's ``vllm/lora/layers/base_linear.py``). A batch then carries only the
sample → slot index (:class:`~grft_serve.engine.plan.BatchPlan`), and each module does gather + bmm
+ scatter (:func:`grft_serve.core.rowop.apply_mixed`) with no Python per task.

A slot nothing was written to (or :meth:`SlotTables.clear` ed) is exactly the base: its rows are
invalid (the module's own output is written back), its column and bias deltas are zero.

Different k per module: a slot with ``0 < k < K`` repeats its first row in the padding positions (the
same value is written twice, exactly), a slot with no rows on a module is marked invalid there and
writes back the module's own output; padding columns have a zero delta and add exactly nothing. Per
batch, :func:`~grft_serve.engine.plan.module_plans` slices every table to the largest k among the
slots present and skips the mask and the bias add when no present slot needs them (host-side numpy
over [modules, slots]: ``k_row``, ``k_col``, ``has_bias``).
"""
from __future__ import annotations

from typing import Sequence

import numpy as np
import torch
from torch import nn

from ..core.rowop import ROW

__all__ = ["ModuleSlots", "SlotTables"]


class ModuleSlots:
    """The slot buffers of one patchable module (allocated when first needed, grown on demand)."""

    def __init__(self, module: nn.Module, capacity: int):
        self.module = module
        self.capacity = capacity
        W = module.weight
        self.dtype, self.device = W.dtype, W.device
        self.out, self.row_shape, self.col_rest = W.shape[0], tuple(W.shape[1:]), tuple(W.shape[2:])
        self.row_idx = self.row_vals = self.row_bias = self.row_valid = None
        self.col_idx = self.col_delta = None
        self.bias_delta = None

    # -- allocation -----------------------------------------------------------------------------
    def _zeros(self, *shape, dtype=None):
        return torch.zeros(shape, dtype=dtype or self.dtype, device=self.device)

    def ensure_rows(self, k: int) -> bool:
        """Room for ``k`` rows per slot; returns True when the buffers were reallocated."""
        K = 0 if self.row_idx is None else self.row_idx.shape[1]
        if k <= K:
            return False
        S = self.capacity
        new = (self._zeros(S, k, dtype=torch.long), self._zeros(S, k, *self.row_shape), self._zeros(S, k),
               self._zeros(S, k, dtype=torch.bool))
        if K:  # new padding positions repeat each slot's first row (or stay invalid): exact
            for n, o in zip(new, (self.row_idx, self.row_vals, self.row_bias, self.row_valid)):
                n[:, :K] = o
                n[:, K:] = o[:, :1]
        self.row_idx, self.row_vals, self.row_bias, self.row_valid = new
        return True

    def ensure_cols(self, k: int) -> bool:
        K = 0 if self.col_idx is None else self.col_idx.shape[1]
        if k <= K:
            return False
        S = self.capacity
        idx, delta = self._zeros(S, k, dtype=torch.long), self._zeros(S, self.out, k, *self.col_rest)
        if K:
            idx[:, :K] = self.col_idx
            delta[:, :, :K] = self.col_delta
        self.col_idx, self.col_delta = idx, delta
        return True

    def ensure_bias(self) -> bool:
        if self.bias_delta is not None:
            return False
        self.bias_delta = self._zeros(self.capacity, self.out)
        return True

    def grow(self, capacity: int) -> None:
        """More slots (existing slots keep their contents)."""
        for name in ("row_idx", "row_vals", "row_bias", "row_valid", "col_idx", "col_delta", "bias_delta"):
            t = getattr(self, name)
            if t is not None:
                n = torch.zeros((capacity, *t.shape[1:]), dtype=t.dtype, device=t.device)
                n[: t.shape[0]] = t
                setattr(self, name, n)
        self.capacity = capacity

    def nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in (self.row_idx, self.row_vals, self.row_bias,
                                                          self.row_valid, self.col_idx, self.col_delta,
                                                          self.bias_delta) if t is not None)

    # -- writes ---------------------------------------------------------------------------------
    def set_rows(self, S: torch.Tensor, idx: torch.Tensor, vals: torch.Tensor, bias: torch.Tensor | None) -> None:
        """Slots ``S`` [G] get rows ``idx`` [G, k] = ``vals`` [G, k, ...]; ``bias``: the tasks' full
        biases [G, out], or the base's [out], or None (zeros)."""
        K = self.row_idx.shape[1]
        k = idx.shape[1]
        if k < K:  # pad with each slot's first row (written twice, the same value)
            sel = _pad_index(k, K, idx.device)
            idx, vals = idx.index_select(1, sel), vals.index_select(1, sel)
        self.row_idx.index_copy_(0, S, idx)
        self.row_vals.index_copy_(0, S, vals.to(self.dtype))
        if bias is None:
            self.row_bias.index_fill_(0, S, 0)
        else:
            sel_b = bias[idx] if bias.dim() == 1 else bias.gather(1, idx)
            self.row_bias.index_copy_(0, S, sel_b.to(self.dtype))
        self.row_valid.index_fill_(0, S, True)

    def set_cols(self, S: torch.Tensor, idx: torch.Tensor, delta: torch.Tensor) -> None:
        """Slots ``S`` get columns ``idx`` [G, k] with ``delta`` [G, out, k, ...] = ``C − W[:, idx]``."""
        k = idx.shape[1]
        self.col_idx.index_fill_(0, S, 0)
        self.col_delta.index_fill_(0, S, 0)
        self.col_idx[S, :k] = idx
        self.col_delta[S, :, :k] = delta

    def reset(self, S: torch.Tensor, rows: bool, cols: bool, bias: bool) -> None:
        """Forget what slots ``S`` held (rows become invalid; columns and bias zero)."""
        if rows and self.row_valid is not None:
            self.row_valid.index_fill_(0, S, False)
        if cols and self.col_idx is not None:
            self.col_idx.index_fill_(0, S, 0)
            self.col_delta.index_fill_(0, S, 0)
        if bias and self.bias_delta is not None:
            self.bias_delta.index_fill_(0, S, 0)


_PAD_CACHE: dict[tuple[int, int, torch.device], torch.Tensor] = {}


def _pad_index(k: int, K: int, device: torch.device) -> torch.Tensor:
    """``[0, 1, …, k-1, 0, 0, …]`` of length K: a slot's rows with its first row as padding."""
    key = (k, K, device)
    t = _PAD_CACHE.get(key)
    if t is None:
        t = _PAD_CACHE[key] = torch.cat([torch.arange(k), torch.zeros(K - k, dtype=torch.long)]).to(device)
    return t


class SlotTables:
    """Slot buffers of every patchable module and the per-slot facts a batch plan reads.

    ``base_bias(name)`` returns the module's pretrained bias or None (the engine's unpatched view).
    ``generation`` bumps whenever a buffer is reallocated (captured graphs keyed by it go stale).
    """

    def __init__(self, modules: dict[str, nn.Module], base_bias, capacity: int = 8):
        self.names = list(modules)
        self.index = {n: i for i, n in enumerate(self.names)}
        self.capacity = max(1, int(capacity))
        self.tables = {n: ModuleSlots(m, self.capacity) for n, m in modules.items()}
        self._base_bias = base_bias
        M = len(self.names)
        self.k_row = np.zeros((M, self.capacity), dtype=np.int32)
        self.k_col = np.zeros((M, self.capacity), dtype=np.int32)
        self.has_bias = np.zeros((M, self.capacity), dtype=bool)
        self.head_w: torch.Tensor | None = None  # [S, C, D]: each slot's head, zero-padded to the most classes
        self.head_b: torch.Tensor | None = None  # [S, C]
        self.classes = np.zeros(self.capacity, dtype=np.int64)
        self.generation = 0

    def grow(self, capacity: int) -> None:
        """More slots (existing slots keep their contents)."""
        pad = capacity - self.capacity
        for t in self.tables.values():
            t.grow(capacity)
        self.k_row = np.pad(self.k_row, ((0, 0), (0, pad)))
        self.k_col = np.pad(self.k_col, ((0, 0), (0, pad)))
        self.has_bias = np.pad(self.has_bias, ((0, 0), (0, pad)))
        self.classes = np.pad(self.classes, (0, pad))
        if self.head_w is not None:
            self.head_w = torch.cat([self.head_w, self.head_w.new_zeros((pad, *self.head_w.shape[1:]))])
            self.head_b = torch.cat([self.head_b, self.head_b.new_zeros((pad, *self.head_b.shape[1:]))])
        self.capacity = capacity
        self.generation += 1

    def clear(self, slots: list[int], writes: dict[int, tuple[bool, bool, bool]] | None = None) -> None:
        """Forget what ``slots`` held, except the parts ``writes`` ({module index: (rows, cols, bias)})
        is about to overwrite anyway."""
        writes = writes or {}
        held = (self.k_row[:, slots] > 0).any(1) | (self.k_col[:, slots] > 0).any(1) | self.has_bias[:, slots].any(1)
        S = None
        for i in np.flatnonzero(held):
            w_rows, w_cols, w_bias = writes.get(int(i), (False, False, False))
            rows = not w_rows and bool((self.k_row[i, slots] > 0).any())
            cols = not w_cols and bool((self.k_col[i, slots] > 0).any())
            bias = not w_bias and bool(self.has_bias[i, slots].any())
            if rows or cols or bias:
                if S is None:
                    S = torch.tensor(slots, dtype=torch.long, device=self.tables[self.names[i]].device)
                self.tables[self.names[i]].reset(S, rows, cols, bias)
        self.k_row[:, slots] = 0
        self.k_col[:, slots] = 0
        self.has_bias[:, slots] = False

    def write(self, slots: list[int], rs: list) -> None:
        """Write resident tasks ``rs`` (all of one layout) into ``slots`` of every module: a few ops
        per module for the whole group (the tasks' buffers are stacked once; every tensor of the
        layout is then one strided view over the group), none per task."""
        lay = rs[0].layout
        bufs = rs[0].packed.buf.unsqueeze(0) if len(rs) == 1 else torch.stack([r.packed.buf for r in rs])
        S = torch.tensor(slots, dtype=torch.long, device=bufs.device)
        G = len(rs)
        with_bias = {n for n, *_ in lay.bias_modules}
        writes = {}  # module index -> (rows, cols, bias) this group writes
        for name, mode in lay.modes.items():
            k = lay.entries[f"{name}.indices"][1][0]
            writes[self.index[name]] = (mode == ROW and k > 0, mode != ROW and k > 0, name in with_bias)
        self.clear(slots, writes)
        rows = {gid: lay.view_many(bufs, f"g{gid}.rows") for gid, _ in lay.groups}
        bias_all = lay.view_many(bufs, "bias.values") if lay.bias_modules else None
        biases = {n: (st, ln) for n, st, ln in lay.bias_modules}
        for name, mode in lay.modes.items():
            i, t = self.index[name], self.tables[name]
            idx = lay.view_many(bufs, f"{name}.indices")  # [G, k]
            k = idx.shape[1]
            base_b = self._base_bias(name)
            b = biases.get(name)
            tb = None if b is None else bias_all[:, b[0]:b[0] + b[1]]  # [G, out]
            if k and mode == ROW:
                gid, start, _ = lay.row_slices[name]
                self.generation += t.ensure_rows(k)
                t.set_rows(S, idx, rows[gid][:, start:start + k].reshape(G, k, *t.row_shape),
                           tb if tb is not None else base_b)
                self.k_row[i, slots] = k
            elif k:
                self.generation += t.ensure_cols(k)
                W = t.module.weight
                cols = W.index_select(1, idx.reshape(-1)).view(W.shape[0], G, k, *W.shape[2:]).transpose(0, 1)
                vals = lay.view_many(bufs, f"{name}.values")  # [G, out, k, ...]
                t.set_cols(S, idx, (vals.float() - cols.float()).to(t.dtype))
                self.k_col[i, slots] = k
            if tb is not None:
                self.generation += t.ensure_bias()
                bd = tb.float() - base_b.float() if base_b is not None else tb
                t.bias_delta.index_copy_(0, S, bd.to(t.dtype))
                self.has_bias[i, slots] = True
        if lay.has_head:
            self._load_heads(S, slots, lay.view_many(bufs, "head.weight"), lay.view_many(bufs, "head.bias"))

    def _load_heads(self, S: torch.Tensor, slots: list[int], w: torch.Tensor, b: torch.Tensor) -> None:
        """Heads ``w`` [G, C, D] / ``b`` [G, C] into ``slots`` (zero-padded to the most classes)."""
        G, C, D = w.shape
        if self.head_w is None or C > self.head_w.shape[1]:
            old_w, old_b = self.head_w, self.head_b
            self.head_w = w.new_zeros((self.capacity, C, D))
            self.head_b = b.new_zeros((self.capacity, C))
            if old_w is not None:
                self.head_w[:, : old_w.shape[1]] = old_w
                self.head_b[:, : old_b.shape[1]] = old_b
            self.generation += 1
        Cmax = self.head_w.shape[1]
        if C < Cmax:
            w = torch.cat([w, w.new_zeros((G, Cmax - C, D))], 1)
            b = torch.cat([b, b.new_zeros((G, Cmax - C))], 1)
        self.head_w.index_copy_(0, S, w)
        self.head_b.index_copy_(0, S, b)
        self.classes[slots] = C

    def heads(self, feats: torch.Tensor, sample_slot: torch.Tensor, slots: Sequence[int]) -> list[torch.Tensor]:
        """Each sample's task head on its features: one gather + one ``bmm`` for the batch and ONE
        device-to-host copy; returns float32 CPU logits per sample (its task's classes only)."""
        w = self.head_w.index_select(0, sample_slot)  # [B, C, D]
        b = self.head_b.index_select(0, sample_slot)  # [B, C]
        out = torch.baddbmm(b.unsqueeze(1), feats.to(w.dtype).unsqueeze(1), w.transpose(1, 2))
        flat = out.squeeze(1).float().cpu()
        return [flat[i, : self.classes[s]] for i, s in enumerate(slots)]

    def nbytes(self) -> int:
        heads = 0 if self.head_w is None else (self.head_w.numel() + self.head_b.numel()) * self.head_w.element_size()
        return heads + sum(t.nbytes() for t in self.tables.values())
