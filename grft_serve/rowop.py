"""The GRFT row op — one piece of code for training and serving.

A task replaces rows ``idx`` (output features / output channels) of a weight ``W`` by ``R``, or
columns ``idx`` (input features / input channels) by ``C``, and may replace the bias vector.
Instead of writing into ``W``, the op corrects the frozen layer's output ``y``:

- row:    ``y[..., idx] = x Rᵀ + b[idx]``                     (conv: channel dim, same maths)
- column: ``y += x[..., idx] (C − W[:, idx])ᵀ``
- bias:   ``y += b_task − b_base``

``apply_delta`` does it for one task (autograd-friendly: ``grft_train`` makes ``R``/``C``/``b``
``nn.Parameter``s, so optimizer state exists only for the selected rows). ``apply_mixed`` does it for
a batch whose samples belong to different tasks in one pass: one ``bmm`` (or one grouped conv) and
one ``scatter_`` per layer whatever the number of tasks. :class:`RowOpHooks` installs both as forward
hooks on the patchable modules.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Sequence

import torch
import torch.nn.functional as F
from torch import nn

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
    sel_bias: torch.Tensor | None = None  # serving: bias of the selected rows (task's or base's)
    bias_delta: torch.Tensor | None = None  # serving: task bias − base bias

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


def _conv(module: nn.Conv2d, x, w, b, groups: int):
    x, pad = _conv_input(module, x)
    return F.conv2d(x, w, b, module.stride, pad, module.dilation, groups)


def _group_channels(module: nn.Conv2d, out_idx: torch.Tensor) -> torch.Tensor:
    """For grouped convs: input-channel indices feeding each selected output channel.
    ``out_idx`` [..., k] -> [..., k * cin_per_group]."""
    cin_g = module.weight.shape[1]
    out_g = module.weight.shape[0] // module.groups
    first = (out_idx // out_g) * cin_g
    ch = first.unsqueeze(-1) + torch.arange(cin_g, device=out_idx.device)
    return ch.flatten(-2)


def _set(y: torch.Tensor, dim: int, idx: torch.Tensor, src: torch.Tensor) -> torch.Tensor:
    src = src.to(y.dtype)  # autocast may compute the override in another dtype than y
    if torch.is_grad_enabled() and (y.requires_grad or src.requires_grad):
        return y.index_copy(dim, idx, src)
    return y.index_copy_(dim, idx, src)


def _add(y: torch.Tensor, d: torch.Tensor) -> torch.Tensor:
    d = d.to(y.dtype)
    if torch.is_grad_enabled() and (y.requires_grad or d.requires_grad):
        return y + d
    return y.add_(d)


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
            return _add(y, _conv(module, x.index_select(1, idx), delta, None, 1))
        return _add(y, F.linear(x.index_select(-1, idx), delta))
    b_sel = bias.index_select(0, idx) if bias is not None else None
    if not is_conv:
        return _set(y, y.dim() - 1, idx, F.linear(x, d.values, b_sel))
    if module.groups == 1:
        y_sel = _conv(module, x, d.values, b_sel, 1)
    else:
        y_sel = _conv(module, x.index_select(1, _group_channels(module, idx)), d.values, b_sel, d.k)
    return _set(y, 1, idx, y_sel)


# ---------------------------------------------------------------------------------------------
# mixed batch: per-sample deltas
# ---------------------------------------------------------------------------------------------
@dataclass
class MixedPlan:
    """Per-sample tensors for one module, gathered from the tasks present in a batch.

    ``row_idx``/``row_vals``/``row_bias`` [B, K, ...]; ``row_valid`` [B, K] or None (all valid);
    ``col_idx`` [B, Kc]; ``col_delta`` [B, out, Kc, ...]; ``bias_delta`` [B, out] or None.
    """

    row_idx: torch.Tensor | None = None
    row_vals: torch.Tensor | None = None
    row_bias: torch.Tensor | None = None
    row_valid: torch.Tensor | None = None
    col_idx: torch.Tensor | None = None
    col_delta: torch.Tensor | None = None
    bias_delta: torch.Tensor | None = None


def build_mixed_plan(module: nn.Module, task_deltas: Sequence[ModuleDelta | None],
                     sample_task: torch.Tensor) -> MixedPlan | None:
    """Stack the deltas of the T tasks in a batch (padded to a common k) and expand them per sample.

    ``task_deltas[t]`` is task t's delta for this module (None: the task leaves it alone);
    ``sample_task`` [B] maps each sample to its task slot t.
    """
    if all(d is None for d in task_deltas):
        return None
    W, base_b = module.weight, module.bias
    dev, dt = W.device, W.dtype
    out = W.shape[0]
    plan = MixedPlan()
    rows = [d if d is not None and d.mode == ROW and d.k > 0 else None for d in task_deltas]
    if any(r is not None for r in rows):
        K = max(r.k for r in rows if r is not None)
        idx_l, val_l, b_l, valid_l = [], [], [], []
        uniform = all(r is not None and r.k == K for r in rows)
        for r in rows:
            if uniform:  # the common case (same k per matrix for every task): no padding ops
                idx_l.append(r.indices)
                val_l.append(r.values)
                b_l.append(_sel_bias(r, base_b))
                continue
            if r is None:  # no rows here: write back the current output (mask), any index
                idx_l.append(torch.zeros(K, dtype=torch.long, device=dev))
                val_l.append(torch.zeros((K, *W.shape[1:]), dtype=dt, device=dev))
                b_l.append(torch.zeros(K, dtype=dt, device=dev))
                valid_l.append(torch.zeros(K, dtype=torch.bool, device=dev))
                continue
            pad = K - r.k  # pad by repeating the task's first row: same value written twice
            sel = torch.cat([torch.arange(r.k, device=dev), torch.zeros(pad, dtype=torch.long, device=dev)])
            idx_l.append(r.indices.index_select(0, sel))
            val_l.append(r.values.index_select(0, sel))
            b_l.append(_sel_bias(r, base_b).index_select(0, sel))
            valid_l.append(torch.ones(K, dtype=torch.bool, device=dev))
        plan.row_idx = torch.stack(idx_l).index_select(0, sample_task)
        plan.row_vals = torch.stack(val_l).index_select(0, sample_task)
        plan.row_bias = torch.stack(b_l).index_select(0, sample_task)
        if not uniform and any(r is None for r in rows):
            plan.row_valid = torch.stack(valid_l).index_select(0, sample_task)
    cols = [d if d is not None and d.mode == COLUMN and d.k > 0 else None for d in task_deltas]
    if any(c is not None for c in cols):
        K = max(c.k for c in cols if c is not None)
        idx_l, dl = [], []
        if all(c is not None and c.k == K for c in cols):
            plan.col_idx = torch.stack([c.indices for c in cols]).index_select(0, sample_task)
            plan.col_delta = torch.stack([_col_delta(c, W) for c in cols]).index_select(0, sample_task)
            cols = []
        for c in cols:
            shape = (out, K, *W.shape[2:])
            z = torch.zeros(shape, dtype=dt, device=dev)
            if c is None:
                idx_l.append(torch.zeros(K, dtype=torch.long, device=dev))
                dl.append(z)
                continue
            z[:, : c.k] = _col_delta(c, W)  # zero padding columns contribute exactly nothing
            idx_l.append(torch.cat([c.indices, torch.zeros(K - c.k, dtype=torch.long, device=dev)]))
            dl.append(z)
        if cols:
            plan.col_idx = torch.stack(idx_l).index_select(0, sample_task)
            plan.col_delta = torch.stack(dl).index_select(0, sample_task)
    if any(d is not None and d.bias is not None for d in task_deltas):
        zero = torch.zeros(out, dtype=dt, device=dev)
        bl = [_bias_delta(d, base_b) if d is not None and d.bias is not None else zero for d in task_deltas]
        plan.bias_delta = torch.stack(bl).index_select(0, sample_task)
    return plan


def _sel_bias(d: ModuleDelta, base_b: torch.Tensor | None) -> torch.Tensor:
    if d.sel_bias is not None:
        return d.sel_bias
    bias = d.bias if d.bias is not None else base_b
    if bias is None:
        return torch.zeros(d.k, dtype=d.values.dtype, device=d.values.device)
    return bias.index_select(0, d.indices)


def _col_delta(d: ModuleDelta, W: torch.Tensor) -> torch.Tensor:
    return d.col_delta if d.col_delta is not None else d.values - W.index_select(1, d.indices)


def _bias_delta(d: ModuleDelta, base_b: torch.Tensor | None) -> torch.Tensor:
    if d.bias_delta is not None:
        return d.bias_delta
    return d.bias - base_b if base_b is not None else d.bias


def apply_mixed(module: nn.Module, x: torch.Tensor, y: torch.Tensor, p: MixedPlan) -> torch.Tensor:
    """Per-sample version of :func:`apply_delta` (no autograd needed; mutates ``y`` in place)."""
    is_conv = isinstance(module, nn.Conv2d)
    B = x.shape[0]
    if p.bias_delta is not None:
        y.add_(p.bias_delta.view(B, -1, 1, 1) if is_conv else p.bias_delta.view(B, *([1] * (y.dim() - 2)), -1))
    if p.col_idx is not None:
        K = p.col_idx.shape[1]
        if is_conv:
            C, H, Wd = x.shape[1:]
            xc = x.gather(1, p.col_idx.view(B, K, 1, 1).expand(B, K, H, Wd))
            out = p.col_delta.shape[1]
            yd = _conv(module, xc.reshape(1, B * K, H, Wd), p.col_delta.reshape(B * out, K, *p.col_delta.shape[3:]),
                       None, B)
            y.add_(yd.view(B, out, *yd.shape[2:]))
        else:
            xf = x.reshape(B, -1, x.shape[-1])
            xc = xf.gather(2, p.col_idx.unsqueeze(1).expand(B, xf.shape[1], K))
            y.view(B, -1, y.shape[-1]).baddbmm_(xc, p.col_delta.transpose(1, 2))
    if p.row_idx is None:
        return y
    K = p.row_idx.shape[1]
    if is_conv:
        H, Wd = x.shape[2:]
        if module.groups == 1:
            C = x.shape[1]
            ysel = _conv(module, x.reshape(1, B * C, H, Wd), p.row_vals.reshape(B * K, *p.row_vals.shape[2:]),
                         p.row_bias.reshape(-1), B)
        else:
            ch = _group_channels(module, p.row_idx)  # [B, K*cin_g]
            xs = x.gather(1, ch.view(B, -1, 1, 1).expand(B, ch.shape[1], H, Wd))
            ysel = _conv(module, xs.reshape(1, -1, H, Wd), p.row_vals.reshape(B * K, *p.row_vals.shape[2:]),
                         p.row_bias.reshape(-1), B * K)
        ysel = ysel.view(B, K, *ysel.shape[2:])
        index = p.row_idx.view(B, K, 1, 1).expand_as(ysel)
        if p.row_valid is not None:
            ysel = torch.where(p.row_valid.view(B, K, 1, 1), ysel, y.gather(1, index))
        y.scatter_(1, index, ysel)
        return y
    xf = x.reshape(B, -1, x.shape[-1])
    yf = y.view(B, -1, y.shape[-1])
    ysel = torch.baddbmm(p.row_bias.unsqueeze(1), xf, p.row_vals.transpose(1, 2))  # [B, T, K]
    index = p.row_idx.unsqueeze(1).expand_as(ysel)
    if p.row_valid is not None:
        ysel = torch.where(p.row_valid.unsqueeze(1), ysel, yf.gather(2, index))
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
