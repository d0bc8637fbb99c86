"""Baselines trained by the GRFT loop (:func:`grft_train.fit.run_fit`) in ``bench/accuracy.py``.

- GPS (Zhang et al., 2024): the top-k entries of every row by squared SCL gradient, trained as a
  masked weight (:class:`SparsePatch`), plus the same biases as GRFT;
- LoRA (Hu et al., 2021) through PEFT's ``inject_adapter_in_model`` on a copy of the backbone:
  ``W + (α/r)·B A`` on every Linear and every non-grouped Conv2d whose LoRA branch has the base's
  output shape (timm's dynamically padded ``Conv2dSame`` with a kernel or stride above 1 is left out);
- full fine-tuning: every parameter of a copy of the backbone (norms and embeddings included).

Each builder has ``run_fit``'s ``build_model(backbone, selection, n_classes, cfg)`` signature and
returns a :class:`~grft_train.model.TaskModel` whose trainable parameters are exactly the method's.
The frozen backbone passed in is never modified (LoRA and full fine-tuning train a deep copy).
"""
from __future__ import annotations

import copy
import math
import types
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from grft_serve.core.backbones import Backbone
from grft_serve.core.rowop import conv_with
from grft_train.config import FitConfig
from grft_train.fit import new_head
from grft_train.model import TaskModel
from grft_train.select import Selection

__all__ = ["SparsePatch", "SparseTaskModel", "full_ft_builder", "gps_builder", "lora_builder", "lora_count",
           "lora_rank_for", "lora_targets", "sparse_k", "timed_fit"]


def timed_fit(cfg: FitConfig, ctx, selection: Selection, builder=None) -> tuple[dict, float, dict]:
    """``run_fit`` of one method on a shared run context: (metrics, wall seconds, peak memory)."""
    import time

    from bench.rss import PeakMemory
    from grft_train.fit import run_fit

    with PeakMemory(ctx.device) as pm:
        t0 = time.time()
        res = run_fit(cfg, ctx, selection=selection, build_model=builder)
        fit_s = time.time() - t0
    res.model.close()
    return res.metrics, fit_s, pm.result()


def _head(backbone: Backbone, n_classes: int, cfg: FitConfig) -> nn.Linear | None:
    """The head GRFT would get (same seed, same initialisation); None for a generation task."""
    if not n_classes:
        return None
    return new_head(backbone.feature_dim, n_classes, cfg).to(next(backbone.parameters()).device)


class _Plain(TaskModel):
    """A TaskModel without deltas: the backbone's own (copied) parameters carry the training."""

    def __init__(self, backbone: Backbone, head: nn.Linear):
        super().__init__(backbone, "row", {}, {}, {}, head, trainable=True)


# ---------------------------------------------------------------------------------------------
# GPS
# ---------------------------------------------------------------------------------------------
class SparsePatch:
    """Same interface as :class:`grft_serve.core.rowop.RowOpHooks` (``active``, ``remove``) for GPS deltas.

    While a delta is active, a module runs with ``W'`` = ``W`` whose entries ``indices[o, j]`` of row
    ``o`` (flattened over the input dims) are replaced by ``values[o, j]``; autograd then gives the
    masked gradient of GPS. The module's ``forward`` is overridden on the instance (so the frozen
    output is not computed twice) and restored by :meth:`remove`; ``W`` itself is never written.
    """

    def __init__(self, modules: dict[str, nn.Module]):
        self.modules = modules
        self.active: dict[str, Any] = {}
        for name, mod in modules.items():
            if "forward" in vars(mod):
                raise RuntimeError(f"module {name!r} already has an instance forward")
            mod.forward = types.MethodType(self._make_forward(name, type(mod).forward), mod)

    def _make_forward(self, name: str, plain):
        def forward(module, x):
            d = self.active.get(name)
            if d is None:
                return plain(module, x)
            w = module.weight
            if d.indices.numel():
                w = w.flatten(1).scatter(1, d.indices, d.values.to(w.dtype)).view_as(w)
            b = d.bias if d.bias is not None else module.bias
            if isinstance(module, nn.Conv2d):
                return conv_with(module, x, w, b, module.groups)
            return F.linear(x, w, b)
        return forward

    def remove(self) -> None:
        for mod in self.modules.values():
            vars(mod).pop("forward", None)
        self.modules, self.active = {}, {}


class SparseTaskModel(TaskModel):
    """:class:`TaskModel` whose deltas are GPS entries: ``indices``/``values`` ``[out, k]`` per module."""

    def __init__(self, backbone: Backbone, indices, values, biases, head: nn.Linear):
        super().__init__(backbone, "sparse", indices, values, biases, head, trainable=True)
        self.hooks.remove()
        self.hooks = SparsePatch({n: backbone.get_submodule(n) for n in self.names})


def gps_builder(modules: list[str] | None = None):
    """``build_model`` for a ``sparse`` selection; ``modules`` (the ones the forward uses) get a
    bias each under ``bias: all`` exactly as GRFT's (zero-initialised where the base has none)."""

    def build(backbone: Backbone, sel: Selection, n_classes: int, cfg: FitConfig) -> SparseTaskModel:
        head = _head(backbone, n_classes, cfg)
        names = list(sel.indices) + ([n for n in (modules or []) if n not in sel.indices] if cfg.bias == "all" else [])
        indices, values, biases = {}, {}, {}
        for n in names:
            mod = backbone.get_submodule(n)
            W = mod.weight.detach()
            idx = sel.indices.get(n, torch.zeros((W.shape[0], 0), dtype=torch.int64)).to(W.device)
            indices[n] = idx
            values[n] = W.flatten(1).gather(1, idx).float()
            if cfg.bias == "none" or (cfg.bias == "selected" and mod.bias is None):
                biases[n] = None
            else:
                biases[n] = (mod.bias.detach().float() if mod.bias is not None
                             else torch.zeros(W.shape[0], device=W.device))
        return SparseTaskModel(backbone, indices, values, biases, head)
    return build


def sparse_k(shapes: dict[str, tuple[int, ...]], allowed: float) -> int:
    """Largest uniform entries-per-row k whose values fit ``allowed`` (at least 1)."""
    def cost(k: int) -> int:
        return sum(s[0] * min(k, max(1, math.prod(s[1:]))) for s in shapes.values())

    kmax = max(math.prod(s[1:]) for s in shapes.values())
    k = 1
    while k < kmax and cost(k + 1) <= allowed:
        k += 1
    return k


# ---------------------------------------------------------------------------------------------
# LoRA (PEFT)
# ---------------------------------------------------------------------------------------------
def lora_targets(backbone: Backbone, names: list[str]) -> list[str]:
    """The modules of ``names`` LoRA can adapt with an output of the base's shape."""
    out = []
    for n in names:
        m = backbone.get_submodule(n)
        if isinstance(m, nn.Conv2d):
            if m.groups != 1:
                continue
            if type(m).__name__ == "Conv2dSame" and (max(m.kernel_size) > 1 or max(m.stride) > 1):
                continue
        out.append(n)
    return out


def _lora_per_rank(m: nn.Module) -> int:
    w = m.weight
    return int(math.prod(w.shape[1:]) + w.shape[0])  # A: r x (in·kh·kw), B: out x r


def lora_count(backbone: Backbone, targets: list[str], rank: int) -> int:
    return rank * sum(_lora_per_rank(backbone.get_submodule(n)) for n in targets)


def lora_rank_for(backbone: Backbone, targets: list[str], budget: int) -> int:
    """The rank whose LoRA parameter count is closest to ``budget`` (at least 1)."""
    per = sum(_lora_per_rank(backbone.get_submodule(n)) for n in targets)
    return max(1, round(budget / per))


def lora_builder(targets: list[str], rank: int, alpha: float | None = None):
    """``build_model``: PEFT LoRA of ``rank`` on ``targets`` of a deep copy of the backbone + head."""

    def build(backbone: Backbone, sel: Selection, n_classes: int, cfg: FitConfig) -> TaskModel:
        from peft import LoraConfig, inject_adapter_in_model

        head = _head(backbone, n_classes, cfg)
        bb = copy.deepcopy(backbone).requires_grad_(False)
        rel = [n.removeprefix("net.") for n in targets]
        inject_adapter_in_model(LoraConfig(r=rank, lora_alpha=alpha or rank, lora_dropout=0.0, bias="none",
                                           target_modules=rel), bb.net)
        for n, p in bb.named_parameters():
            p.requires_grad_("lora_" in n)
        return _Plain(bb.eval(), head)
    return build


# ---------------------------------------------------------------------------------------------
# full fine-tuning
# ---------------------------------------------------------------------------------------------
def full_ft_builder(backbone: Backbone, sel: Selection, n_classes: int, cfg: FitConfig) -> TaskModel:
    """Every backbone parameter trainable (on a deep copy), the same head as GRFT."""
    head = _head(backbone, n_classes, cfg)
    return _Plain(copy.deepcopy(backbone).requires_grad_(True).eval(), head)
