"""The GRFT row op — one piece of code for training and serving.

A task replaces rows ``idx`` (output features / output channels) of a weight ``W`` by ``R``, or
columns ``idx`` (input features / input channels) by ``C``, and may replace the bias vector.
Instead of writing into ``W``, the op corrects the frozen layer's output ``y``:

- row:    ``y[..., idx] = x Rᵀ + b[idx]``                     (conv: channel dim, same maths)
- column: ``y += x[..., idx] (C − W[:, idx])ᵀ``
- bias:   ``y += b_task − b_base``

``apply_delta`` does it for one task (autograd-friendly: ``grft_train`` makes ``R``/``C``/``b``
``nn.Parameter``s, so optimizer state exists only for the selected rows). ``apply_mixed`` does it for
a batch whose samples belong to different tasks in one pass, reading each sample's task from
per-module slot tables (:mod:`grft_serve.engine.slots`): one gather, one ``bmm`` (or one grouped conv) and
one ``scatter_`` per layer whatever the number of tasks. :class:`RowOpHooks` installs both as forward
hooks on the patchable modules.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import torch
import torch.nn.functional as F
from torch import nn

__all__ = ["COLUMN", "ROW", "MixedPlan", "ModuleDelta", "RowOpHooks", "apply_delta", "apply_mixed", "conv_with"]

ROW, COLUMN = "row", "column"


@dataclass
class ModuleDelta:
    """One task's change to one module. ``values``: row mode ``[k, *W.shape[1:]]`` (the new rows);
    column mode ``[W.shape[0], k, *W.shape[2:]]`` (the new columns). ``bias``: full new bias or None.
    ``col_delta`` (serving only): precomputed ``C − W[:, idx]`` in the serving dtype."""

    mode: str
    indices: torch.Tensor
    values: torch.Tensor
    bias: torch.Tensor | None = None
    col_delta: torch.Tensor | None = None

    @property
    def k(self) -> int:
        return int(self.indices.numel())


# ---------------------------------------------------------------------------------------------
# conv helpers (nn.Conv2d, and timm's Conv2dSame which pads dynamically inside forward)
# ---------------------------------------------------------------------------------------------
def _conv_input(module: nn.Conv2d, x: torch.Tensor) -> tuple[torch.Tensor, object]:
    """Return (input padded the way the module pads it, padding to pass to conv2d)."""
    if type(module).__name__ == "Conv2dSame":
        from timm.layers import pad_same

        return pad_same(x, module.weight.shape[-2:], module.stride, module.dilation), 0
    if module.padding_mode != "zeros":
        return F.pad(x, module._reversed_padding_repeated_twice, mode=module.padding_mode), 0
    return x, module.padding


def conv_with(module: nn.Conv2d, x, w, b, groups: int):
    """``module``'s convolution (its stride, padding incl. TF-"same", dilation) with weight ``w``,
    bias ``b`` and ``groups`` instead of its own."""
    x, pad = _conv_input(module, x)
    return F.conv2d(x, w, b, module.stride, pad, module.dilation, groups)


def _pointwise(module: nn.Conv2d) -> bool:
    """A 1x1, stride-1, ungrouped, unpadded conv: per pixel a matmul, so per-sample rows or columns
    are one ``bmm`` over ``[B, C, H*W]`` instead of a conv with B groups."""
    return (tuple(module.weight.shape[-2:]) == (1, 1) and tuple(module.stride) == (1, 1) and module.groups == 1
            and (module.padding in ("same", "valid") or tuple(module.padding) == (0, 0)))


def _group_channels(module: nn.Conv2d, out_idx: torch.Tensor) -> torch.Tensor:
    """For grouped convs: input-channel indices feeding each selected output channel.
    ``out_idx`` [..., k] -> [..., k * cin_per_group]."""
    cin_g = module.weight.shape[1]
    out_g = module.weight.shape[0] // module.groups
    first = (out_idx // out_g) * cin_g
    ch = first.unsqueeze(-1) + torch.arange(cin_g, device=out_idx.device)
    return ch.flatten(-2)


def _set(y: torch.Tensor, dim: int, idx: torch.Tensor, src: torch.Tensor) -> torch.Tensor:
    """``y[..., idx, ...] = src`` along ``dim``, in place, also under autograd.

    ``y`` is a frozen layer's fresh output that no autograd node has saved (linear and conv keep
    their inputs, not their outputs), so writing into it is safe: autograd records the in-place
    ``index_copy_`` and its backward hands ``src`` the gradient of the written slices and the
    frozen output the gradient with those slices zeroed. No copy of the whole output is made in
    the forward (an out-of-place ``index_copy`` would copy it once per patched layer and step)."""
    return y.index_copy_(dim, idx, src.to(y.dtype))  # autocast may compute src in another dtype


def _tracked_view(y: torch.Tensor) -> bool:
    """Whether an in-place write into ``y`` would make autograd copy gradients: ``y`` is a view
    (``F.linear`` on 3-D inputs returns one of its 2-D ``addmm`` result) in a graph, so autograd
    would route its backward through ``CopySlices``, which clones the gradient at every such write."""
    return torch.is_grad_enabled() and y._is_view()


def _add(y: torch.Tensor, d: torch.Tensor) -> torch.Tensor:
    """``y + d``: in place, except on a view under autograd (:func:`_tracked_view`), where the
    out-of-place add costs the same memory pass and leaves a fresh tensor for the row op to write."""
    d = d.to(y.dtype)
    return y + d if _tracked_view(y) else y.add_(d)


# ---------------------------------------------------------------------------------------------
# single task
# ---------------------------------------------------------------------------------------------
def apply_delta(module: nn.Module, x: torch.Tensor, y: torch.Tensor, d: ModuleDelta) -> torch.Tensor:
    """Output of ``module`` patched with ``d``, computed from the frozen output ``y`` and input ``x``."""
    is_conv = isinstance(module, nn.Conv2d)
    base_b = module.bias
    if d.bias is not None:
        bd = d.bias - base_b if base_b is not None else d.bias
        y = _add(y, bd.view(-1, 1, 1) if is_conv else bd)
    bias = d.bias if d.bias is not None else base_b
    if d.k == 0:
        return y
    idx = d.indices
    if d.mode == COLUMN:
        delta = d.col_delta if d.col_delta is not None else d.values - module.weight.index_select(1, idx)
        if is_conv:
            return _add(y, conv_with(module, x.index_select(1, idx), delta, None, 1))
        return _add(y, F.linear(x.index_select(-1, idx), delta))
    if torch.is_grad_enabled() and d.values.requires_grad:
        return _add_rows(module, x, y, d)
    b_sel = bias.index_select(0, idx) if bias is not None else None
    if not is_conv:
        return _set(y, y.dim() - 1, idx, F.linear(x, d.values, b_sel))
    if module.groups == 1:
        y_sel = conv_with(module, x, d.values, b_sel, 1)
    else:
        y_sel = conv_with(module, x.index_select(1, _group_channels(module, idx)), d.values, b_sel, d.k)
    return _set(y, 1, idx, y_sel)


def _add_rows(module: nn.Module, x: torch.Tensor, y: torch.Tensor, d: ModuleDelta) -> torch.Tensor:
    """Training form of the row op: ``y[..., idx] += x (R − W[idx])ᵀ``, in place.

    The same function of ``R`` as writing ``x Rᵀ + b[idx]`` into the selected outputs (``y``
    already holds ``x W[idx]ᵀ`` plus the task's bias there), but its backward needs no copy at all:
    the frozen output's gradient passes through unchanged (the write is in place unless ``y`` is a
    tracked view, see :func:`_tracked_view`) and ``R`` receives the selected slices of it, so the
    input gradient is ``g W + g[idx] (R − W[idx])`` — the patched layer's. Results match
    the override form up to float rounding; inference and serving use the override form, which is
    bit-exact against merged weights."""
    idx = d.indices
    diff = d.values - module.weight.index_select(0, idx).to(d.values.dtype)
    if not isinstance(module, nn.Conv2d):
        src = F.linear(x, diff).to(y.dtype)
        if _tracked_view(y):  # see _tracked_view: one forward copy instead of gradient clones
            return torch.index_add(y, y.dim() - 1, idx, src)
        return y.index_add_(y.dim() - 1, idx, src)
    if module.groups == 1:
        y_sel = conv_with(module, x, diff, None, 1)
    else:
        y_sel = conv_with(module, x.index_select(1, _group_channels(module, idx)), diff, None, d.k)
    return y.index_add_(1, idx, y_sel.to(y.dtype))


# ---------------------------------------------------------------------------------------------
# mixed batch: per-sample deltas from slot tables
# ---------------------------------------------------------------------------------------------
@dataclass
class MixedPlan:
    """One module's part of a mixed batch: its slot tables (:class:`grft_serve.engine.slots.ModuleSlots`),
    the sample → slot index ``sample_slot`` [B], and how much of the tables this batch needs:
    ``k_row``/``k_col`` (0: none), ``mask`` (some present slot has no rows here), ``bias``.

    ``gathered``: None, or a dict in which :func:`apply_mixed` keeps what it gathered from the tables
    for this plan, so that applying the SAME plan again (a decode loop's next step over the same
    sequences) skips the gathers — the same values, so the same results bit for bit. Whoever sets it
    must drop the plan once a present slot is rewritten."""

    tables: object
    sample_slot: torch.Tensor
    k_row: int = 0
    k_col: int = 0
    mask: bool = False
    bias: bool = False
    gathered: dict | None = None


def _gathered(p: MixedPlan, part: str, gather: Callable[[], object]):
    """``gather()`` — the tables' values of each sample's slot — or what it gave when ``p`` was
    applied before (kept in ``p.gathered`` when that is a dict)."""
    kept = p.gathered
    if kept is None:
        return gather()
    got = kept.get(part)
    if got is None:
        got = kept[part] = gather()
    return got


def apply_mixed(module: nn.Module, x: torch.Tensor, y: torch.Tensor, p: MixedPlan) -> torch.Tensor:
    """Per-sample version of :func:`apply_delta` (no autograd; mutates ``y`` in place): gather each
    sample's slot from the tables (or reuse the gathers kept in ``p.gathered``), one ``bmm`` (or one
    grouped conv), one ``scatter_``.

    Packed token batches (a decode step's ``x [1, N, H]`` holding N tokens of many sequences) carry
    one slot per TOKEN: with ``len(sample_slot) == N != x.shape[0]`` every token is its own sample."""
    is_conv = isinstance(module, nn.Conv2d)
    t, s = p.tables, p.sample_slot
    if not is_conv and s.shape[0] != x.shape[0]:
        n = s.shape[0]
        apply_mixed(module, x.reshape(n, 1, x.shape[-1]), y.view(n, 1, y.shape[-1]), p)
        return y
    B = x.shape[0]
    if p.bias:
        bd = _gathered(p, "bias", lambda: t.bias_delta.index_select(0, s))
        y.add_(bd.view(B, -1, 1, 1) if is_conv else bd.view(B, *([1] * (y.dim() - 2)), -1))
    if p.k_col:
        K = p.k_col
        col_idx, col_delta = _gathered(p, "cols", lambda: (
            t.col_idx[:, :K].index_select(0, s),  # [B, K]
            t.col_delta[:, :, :K].index_select(0, s)))  # [B, out, K, ...]
        if is_conv:
            H, Wd = x.shape[2:]
            xc = x.gather(1, col_idx.view(B, K, 1, 1).expand(B, K, H, Wd))
            out = col_delta.shape[1]
            if _pointwise(module):
                yd = torch.bmm(col_delta.view(B, out, K), xc.view(B, K, H * Wd))
            else:
                yd = conv_with(module, xc.reshape(1, B * K, H, Wd), col_delta.reshape(B * out, K, *col_delta.shape[3:]),
                           None, B)
            y.add_(yd.view(B, out, *y.shape[2:]))
        else:
            xf = x.reshape(B, -1, x.shape[-1])
            xc = xf.gather(2, col_idx.unsqueeze(1).expand(B, xf.shape[1], K))
            y.view(B, -1, y.shape[-1]).baddbmm_(xc, col_delta.transpose(1, 2))
    if not p.k_row:
        return y
    K = p.k_row
    row_idx, row_vals, row_bias, valid = _gathered(p, "rows", lambda: (
        t.row_idx[:, :K].index_select(0, s),  # [B, K]
        t.row_vals[:, :K].index_select(0, s),  # [B, K, *W.shape[1:]]
        t.row_bias[:, :K].index_select(0, s),  # [B, K]
        t.row_valid[:, :K].index_select(0, s) if p.mask else None))
    if is_conv:
        H, Wd = x.shape[2:]
        if _pointwise(module):  # a 1x1 conv is a matmul over pixels: one bmm, not B conv groups
            C = x.shape[1]
            ysel = torch.baddbmm(row_bias.unsqueeze(2), row_vals.view(B, K, C), x.reshape(B, C, H * Wd))
            ysel = ysel.view(B, K, H, Wd)
        elif module.groups == 1:
            C = x.shape[1]
            ysel = conv_with(module, x.reshape(1, B * C, H, Wd), row_vals.reshape(B * K, *row_vals.shape[2:]),
                         row_bias.reshape(-1), B)
        else:
            ch = _group_channels(module, row_idx)  # [B, K*cin_g]
            xs = x.gather(1, ch.view(B, -1, 1, 1).expand(B, ch.shape[1], H, Wd))
            ysel = conv_with(module, xs.reshape(1, -1, H, Wd), row_vals.reshape(B * K, *row_vals.shape[2:]),
                         row_bias.reshape(-1), B * K)
        ysel = ysel.view(B, K, *ysel.shape[2:])
        index = row_idx.view(B, K, 1, 1).expand_as(ysel)
        if valid is not None:
            ysel = torch.where(valid.view(B, K, 1, 1), ysel, y.gather(1, index))
        y.scatter_(1, index, ysel)
        return y
    xf = x.reshape(B, -1, x.shape[-1])
    yf = y.view(B, -1, y.shape[-1])
    ysel = torch.baddbmm(row_bias.unsqueeze(1), xf, row_vals.transpose(1, 2))  # [B, T, K]
    index = row_idx.unsqueeze(1).expand_as(ysel)
    if valid is not None:
        ysel = torch.where(valid.unsqueeze(1), ysel, yf.gather(2, index))
    yf.scatter_(2, index, ysel)
    return y


# ---------------------------------------------------------------------------------------------
# hooks
# ---------------------------------------------------------------------------------------------
class RowOpHooks:
    """Forward hooks on the patchable modules that apply whatever is *active* for each module.

    ``active[name]`` is a :class:`ModuleDelta` (one task) or a :class:`MixedPlan` (mixed batch).
    With nothing active a hook returns at once, so the frozen model runs unchanged.
    """

    def __init__(self, modules: dict[str, nn.Module]):
        self.modules = modules
        self.active: dict[str, ModuleDelta | MixedPlan] = {}
        self._handles = [m.register_forward_hook(self._make_hook(n)) for n, m in modules.items()]

    def _make_hook(self, name: str) -> Callable:
        def hook(module, inputs, output):
            a = self.active.get(name)
            if a is None:
                return None
            if isinstance(a, MixedPlan):
                return apply_mixed(module, inputs[0], output, a)
            return apply_delta(module, inputs[0], output, a)
        return hook

    def remove(self) -> None:
        for h in self._handles:
            h.remove()
        self._handles = []
        self.active = {}
