"""GRFT parameter selection: gradients of the task's loss on the pretrained weights -> top-k rows/columns.

For every eligible patchable module (``nn.Linear``/``nn.Conv2d`` of the backbone, heads excluded,
optionally without the patch/stem embedding) the gradients of the run objective's selection loss
(SCL for classification, the answer-token cross-entropy for ``causal_lm``: :mod:`grft_train.objective`)
are accumulated over N batches (no zeroing between batches, as GPS does); their squares are summed
per row (over every dim but 0) or per column (over every dim but 1). The top-k rows/columns of each
matrix are kept; ``budget`` turns a global fraction of backbone parameters into a per-matrix k.
``sparse`` keeps GPS's top-k entries of each row instead (a baseline: such a selection cannot be packaged).

The selection file is safetensors: ``<module>.indices`` (int64, sorted; sparse: ``[out, k]``),
``<module>.scores`` (float32 per row/column) and ``__metadata__["grft_selection"]`` (JSON).
"""
from __future__ import annotations

import json
import logging
import math
import re
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from grft_serve.core.backbones import Backbone
from grft_serve.core.package import atomic_write
from grft_serve.core.spec import iter_patchable, slice_count, slice_numel

from .common import is_embed, is_head, seed_everything
from .config import SelectConfig
from .context import RunContext
from .heatmap import heatmap
from .layers import describe_regularised

log = logging.getLogger("grft_train.select")
META_KEY = "grft_selection"

__all__ = ["SelectionError", "Selection", "eligible_modules", "slice_scores", "topk_indices", "sparse_indices",
           "budget_to_k", "subset_losses", "accumulate_grads", "select_from_grads", "Gradients", "selection_grads",
           "build_selection", "run_select", "save_selection", "regularised_summary"]


class SelectionError(ValueError):
    """A selection could not be computed, read, or used with this backbone."""


@dataclass
class Selection:
    mode: str  # row | column | sparse
    indices: dict[str, torch.Tensor]  # module -> int64 [k] sorted (sparse: [out, k] sorted per row)
    scores: dict[str, torch.Tensor] = field(default_factory=dict)
    meta: dict[str, Any] = field(default_factory=dict)

    @property
    def k(self) -> dict[str, int]:
        return {n: int(i.shape[-1]) for n, i in self.indices.items()}

    def save(self, path: str | Path) -> Path:
        from safetensors.torch import save

        tensors = {}
        for n, idx in self.indices.items():
            tensors[f"{n}.indices"] = idx.to(torch.int64).contiguous().cpu()
            if n in self.scores:
                tensors[f"{n}.scores"] = self.scores[n].float().contiguous().cpu()
        meta = dict(self.meta, mode=self.mode, k=_k_summary(self.k))
        return atomic_write(path, save(tensors, metadata={META_KEY: json.dumps(meta)}))

    @classmethod
    def load(cls, path: str | Path) -> "Selection":
        from safetensors import safe_open

        p = Path(path)
        if not p.is_file():
            raise SelectionError(f"selection file not found: {p} (run `grft-train select` first)")
        try:
            with safe_open(str(p), framework="pt") as f:
                raw = (f.metadata() or {}).get(META_KEY)
                tensors = {k: f.get_tensor(k) for k in f.keys()}
        except Exception as e:  # noqa: BLE001
            raise SelectionError(f"{p} is not a selection file: {e}") from None
        if raw is None:
            raise SelectionError(f"{p} has no {META_KEY!r} metadata (not written by `grft-train select`)")
        meta = json.loads(raw)
        idx, scores = {}, {}
        for k, t in tensors.items():
            mod, _, kind = k.rpartition(".")
            if kind == "indices":
                idx[mod] = t.to(torch.int64)
            elif kind == "scores":
                scores[mod] = t
        return cls(mode=meta["mode"], indices=idx, scores=scores, meta=meta)


def _k_summary(k: dict[str, int]) -> int | dict[str, int]:
    vals = set(k.values())
    return vals.pop() if len(vals) == 1 else dict(k)


# ---------------------------------------------------------------------------------------------
# eligibility, scores, top-k, budgets
# ---------------------------------------------------------------------------------------------
def eligible_modules(backbone: Backbone, include_patch_embed: bool = True, include: list[str] = (),
                     exclude: list[str] = (), mode: str = "row") -> list[tuple[str, nn.Module]]:
    """Patchable modules GRFT may select in (names as in ``backbone.describe()``)."""
    inc = [re.compile(p) for p in include]
    exc = [re.compile(p) for p in exclude]
    out = []
    for name, mod in iter_patchable(backbone, backbone.exclude_from_patching()):
        if is_head(name):
            continue
        if not include_patch_embed and is_embed(name):
            continue
        if inc and not any(p.search(name) for p in inc):
            continue
        if any(p.search(name) for p in exc):
            continue
        if mode == "column" and getattr(mod, "groups", 1) != 1:
            continue  # column patching of a grouped conv would mix channel groups: row mode only
        out.append((name, mod))
    if not out:
        raise SelectionError("no eligible patchable module (check include/exclude patterns)")
    return out


def slice_scores(grad: torch.Tensor, mode: str) -> torch.Tensor:
    """Sum of squared gradients per row (dim 0) or per column (dim 1)."""
    g2 = grad.float().pow(2)
    if mode == "column":
        return g2.transpose(0, 1).reshape(g2.shape[1], -1).sum(1)
    return g2.reshape(g2.shape[0], -1).sum(1)


def topk_indices(scores: torch.Tensor, k: int) -> torch.Tensor:
    """Indices of the k largest scores, sorted ascending (ties: lower index first)."""
    k = max(0, min(int(k), scores.numel()))
    if k == 0:
        return torch.zeros(0, dtype=torch.int64)
    # stable descending order so equal scores resolve deterministically
    order = torch.sort(scores.detach().cpu().double(), descending=True, stable=True).indices
    return torch.sort(order[:k]).values.to(torch.int64)


def sparse_indices(grad: torch.Tensor, k: int) -> torch.Tensor:
    """GPS: per row, the k entries (flattened over dims 1..) with the largest squared gradient."""
    g2 = grad.float().pow(2).reshape(grad.shape[0], -1).cpu()
    k = min(k, g2.shape[1])
    return torch.sort(torch.topk(g2, k, dim=1).indices, dim=1).values.to(torch.int64)


def budget_to_k(shapes: dict[str, tuple[int, ...]], mode: str, total_params: int, budget: float,
                scores: dict[str, torch.Tensor] | None = None) -> dict[str, int]:
    """Turn a parameter budget (fraction of ``total_params``) into a per-matrix k.

    The largest uniform k whose selected values fit the budget; if even k=1 everywhere does not fit,
    single rows/columns go to the matrices with the highest best-slice score per parameter until the
    budget is used (matrices left out get k=0).
    """
    allowed = budget * total_params

    def cost(k):
        return sum(min(k, slice_count(s, mode)) * slice_numel(s, mode) for s in shapes.values())

    kmax = max(slice_count(s, mode) for s in shapes.values())
    lo, hi = 0, kmax
    while lo < hi:  # largest k with cost(k) <= allowed
        mid = (lo + hi + 1) // 2
        if cost(mid) <= allowed:
            lo = mid
        else:
            hi = mid - 1
    if lo >= 1:
        return {n: min(lo, slice_count(s, mode)) for n, s in shapes.items()}
    order = sorted(shapes, key=lambda n: -(float(scores[n].max()) / slice_numel(shapes[n], mode) if scores else 0.0))
    out, used = {n: 0 for n in shapes}, 0
    for n in order:
        c = slice_numel(shapes[n], mode)
        if used + c <= allowed:
            out[n] = 1
            used += c
    return out


# ---------------------------------------------------------------------------------------------
# gradients
# ---------------------------------------------------------------------------------------------
def subset_losses(ctx: RunContext, subsets: list, cfg: SelectConfig) -> list[float]:
    """Mean selection loss of each subset (no gradients), with the same random seed for each."""
    out = []
    for s in subsets:
        torch.manual_seed(cfg.seed)
        tot, n = 0.0, 0
        with torch.no_grad():
            for b, item in enumerate(ctx.objective.grad_batches(s, cfg.batch_size, np.random.default_rng(cfg.seed))):
                if cfg.num_batches is not None and b >= cfg.num_batches:
                    break
                loss, m = ctx.objective.grad_loss(item, ctx.device, cfg)
                tot += float(loss) * m
                n += m
        out.append(tot / max(n, 1))
    return out


def accumulate_grads(ctx: RunContext, modules: list[tuple[str, nn.Module]], ds, cfg: SelectConfig
                     ) -> tuple[dict[str, torch.Tensor], dict]:
    """Gradients of the objective's selection loss w.r.t. the weights of ``modules``, accumulated
    over the batches of ``ds`` (one full pass unless ``cfg.num_batches`` caps it), streamed: each
    batch's graph is freed by its backward, so memory holds one batch's activations plus one
    gradient per weight. Weights are only marked ``requires_grad`` for the duration; they are never
    written."""
    weights = [m.weight for _, m in modules]
    for w in weights:
        w.grad = None
        w.requires_grad_(True)
    losses = []
    seen = 0
    rng = np.random.default_rng(cfg.seed)
    torch.manual_seed(cfg.seed)
    try:
        from tqdm.auto import tqdm

        n_batches = math.ceil(len(ds) / cfg.batch_size)
        if cfg.num_batches is not None:
            n_batches = min(n_batches, cfg.num_batches)
        bar = tqdm(total=n_batches, desc=f"select ({ctx.objective.name} grads)", disable=None if cfg.progress else True,
                   leave=False)
        for b, item in enumerate(ctx.objective.grad_batches(ds, cfg.batch_size, rng)):
            if b >= n_batches:
                break
            loss, m = ctx.objective.grad_loss(item, ctx.device, cfg)
            if loss.requires_grad:
                loss.backward()  # adds into .grad and frees this batch's graph: one batch alive at a time
            losses.append(float(loss.detach()))
            seen += m
            bar.update(1)
            bar.set_postfix(loss=f"{losses[-1]:.3f}")
        bar.close()
        grads = {}
        for (name, _), w in zip(modules, weights):
            grads[name] = (w.grad.detach().float().cpu() if w.grad is not None
                           else torch.zeros(w.shape, dtype=torch.float32))
    finally:
        for w in weights:
            w.grad = None
            w.requires_grad_(False)
    return grads, {**ctx.objective.grad_info(), "losses": losses, "batches": len(losses), "samples": seen}


# ---------------------------------------------------------------------------------------------
# driver
# ---------------------------------------------------------------------------------------------
def select_from_grads(grads: dict[str, torch.Tensor], mode: str, k: int, budget: float | None,
                      total_params: int) -> tuple[dict[str, torch.Tensor], dict[str, torch.Tensor]]:
    if mode == "sparse":
        return {n: sparse_indices(g, k) for n, g in grads.items()}, {}
    scores = {n: slice_scores(g, mode) for n, g in grads.items()}
    if budget is not None:
        ks = budget_to_k({n: tuple(g.shape) for n, g in grads.items()}, mode, total_params, budget, scores)
    else:
        ks = {n: k for n in grads}
    idx = {n: topk_indices(scores[n], ks[n]) for n in grads}
    return idx, scores


@dataclass
class Gradients:
    """One pass of selection gradients (every mode and k can be selected from it)."""

    grads: dict[str, torch.Tensor]  # module -> accumulated gradient (modules with a nonzero one)
    meta: dict[str, Any]  # eligible/zero-grad modules, subset losses, loss info, seconds


def selection_grads(cfg: SelectConfig, ctx: RunContext) -> Gradients:
    """Accumulate the objective's selection gradients for every module eligible in ``cfg.mode``
    (``row`` covers every mode: a column selection drops the grouped convs from it)."""
    t0 = time.time()
    modules = eligible_modules(ctx.backbone, cfg.include_patch_embed, cfg.include, cfg.exclude, cfg.mode)
    subsets = ctx.objective.subsets(ctx.splits.train, cfg.subsets, cfg.seed)
    losses = None
    chosen = 0
    if len(subsets) > 1:
        losses = subset_losses(ctx, subsets, cfg)
        chosen = int(np.argmin(losses))
        log.info("subset losses %s -> subset %d", losses, chosen)
    grads, ginfo = accumulate_grads(ctx, modules, subsets[chosen], cfg)
    unused = [n for n, g in grads.items() if not bool(g.abs().sum() > 0)]
    if len(unused) == len(grads):
        raise SelectionError("every selection gradient is zero: the selection data gave no signal")
    if unused:  # modules the forward never runs (e.g. an unused pooler): nothing to learn there
        log.info("skipping %d modules with zero gradient: %s", len(unused), unused[:5])
        grads = {n: g for n, g in grads.items() if n not in unused}
    meta = {"eligible_modules": [n for n, _ in modules], "zero_grad_modules": unused, "subsets": cfg.subsets,
            "subset_losses": losses, "chosen_subset": chosen, "subset_size": len(subsets[chosen]), "grads": ginfo,
            "objective": ctx.objective.name, "grad_seconds": round(time.time() - t0, 2)}
    return Gradients(grads, meta)


def build_selection(g: Gradients, ctx: RunContext, cfg: SelectConfig) -> Selection:
    """Top-k (or budgeted) rows/columns/entries of ``g`` for ``cfg.mode``/``cfg.k``/``cfg.budget``."""
    spec = ctx.spec
    grads = g.grads
    eligible = g.meta["eligible_modules"]
    if cfg.mode == "column":
        grads = {n: t for n, t in grads.items() if spec.modules[n].supports_columns()}
        eligible = [n for n in eligible if spec.modules[n].supports_columns()]
    total = ctx.total_params
    idx, scores = select_from_grads(grads, cfg.mode, cfg.k, cfg.budget, total)
    idx = {n: i for n, i in idx.items() if i.shape[-1] > 0}
    selected = sum(int(i.numel()) * (1 if cfg.mode == "sparse" else spec.modules[n].slice_numel(cfg.mode))
                   for n, i in idx.items())
    meta = dict(g.meta, **{
        "format": "grft-selection/1",
        "base_model_id": spec.model_id,
        "base_fingerprint": spec.fingerprint,
        "labels": ctx.labels,
        "modules": list(idx),
        "eligible_modules": eligible,
        "budget": cfg.budget,
        "selected_values": selected,
        "backbone_params": total,
        "selected_fraction": selected / total,
        "preprocessing": ctx.preprocessing,
        "config": cfg.model_dump(mode="json"),
        "packageable": cfg.mode != "sparse",
    })
    return Selection(cfg.mode, idx, scores, meta)


def run_select(cfg: SelectConfig, ctx: RunContext | None = None, *, backbone: Backbone | None = None,
               splits=None) -> Selection:
    """Compute and save a selection (``cfg.out``); returns it. Without ``ctx`` one is built from
    ``cfg`` (with ``backbone`` / ``splits`` if given)."""
    t0 = time.time()
    seed_everything(cfg.seed)
    ctx = ctx or RunContext.build(cfg, backbone, splits)
    sel = build_selection(selection_grads(cfg, ctx), ctx, cfg)
    sel.meta["seconds"] = round(time.time() - t0, 2)
    save_selection(sel, cfg.out, ctx.spec, cfg.heatmap)
    return sel


def save_selection(sel: Selection, out: str | Path, spec, with_heatmap: bool = True) -> Path:
    """Write ``sel`` (and its heat-map PNG beside it)."""
    out = Path(out)
    sel.save(out)
    if with_heatmap:
        try:
            heatmap(sel, spec, out.with_suffix("").with_suffix(".png") if out.suffix else out.with_suffix(".png"))
        except Exception as e:  # noqa: BLE001 - the plot is a convenience
            log.warning("heat-map failed: %s", e)
    return out


def regularised_summary(sel: Selection, last_layers: int, embed: bool = True, head: bool = True) -> dict:
    """GRFT's regularised set R (see :mod:`grft_train.layers`) over the modules the selection saw run."""
    unused = set(sel.meta.get("zero_grad_modules") or [])
    used = [n for n in (sel.meta.get("eligible_modules") or list(sel.indices)) if n not in unused]
    return describe_regularised(used, last_layers, embed, head)

