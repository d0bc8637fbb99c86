"""GRFT fine-tuning: only the selected rows/columns (+ biases + a new head) are parameters.

loss = L_task + λ·Σ_{l∈R} ‖θ_l − θ_l,pre‖², R = the modules of the last L layers, the stem / patch
embedding and the head (θ_pre of the head = its initialisation; layers as in
:mod:`grft_train.layers`). L_task is the run objective's (:mod:`grft_train.objective`): CE of a new
head for classification, the answer-token cross-entropy for ``causal_lm`` (no head). One Adam
learning rate for every parameter (a separate head rate is optional), linear warm-up then cosine
decay, gradient accumulation, bf16 autocast on CUDA, validation every epoch with the best epoch
kept (classification: accuracy, then loss; causal_lm: answer loss). The frozen backbone is never
modified: the trained values only live in the task package.

A run has three stages: :func:`build_fit` (the trainable model, the regularised set, the optimizer
and schedule), :func:`train_loop` (epochs, validation, the best epoch's values restored) and
:func:`grft_train.fit_output.write_fit` (metrics, package, curves). :func:`run_fit` chains them.

Biases (``fit.bias``): ``all`` trains the bias of every patchable module the forward uses, as the
GRFT/GPS papers count their parameters — a module without a bias gets a zero-initialised one (after
a convolution followed by batch norm it is the same degree of freedom as the norm's shift; on
LLaMA's bias-free linears a new output offset); ``selected`` only those of modules with selected
rows/columns; ``none``. Norms stay frozen.

A step costs a forward plus a backward to the inputs of each layer: frozen weights get no weight
gradient and no optimizer state, and the row op writes the trained rows into each layer's output in
place. With nothing trainable in the backbone (an empty selection, ``bias: none``: a linear probe)
the frozen features are computed once and only the head trains.

Trainable-parameter percentage (``metrics.trainable_pct``) = (selected row/column values + tuned
biases + head parameters) / total backbone parameters × 100.
"""
from __future__ import annotations

import logging
import math
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

import numpy as np
import torch
from torch import nn

from grft_serve.core.backbones import Backbone
from grft_serve.core.rowop import COLUMN
from grft_serve.core.spec import iter_patchable

from .common import is_head, seed_everything
from .config import FitConfig
from .context import RunContext, used_modules
from .fit_output import TRAINABLE_DEF, make_package, plot_curves, write_fit
from .layers import regularised_modules
from .model import TaskModel
from .prepared import FeatureSet
from .select import Selection

log = logging.getLogger("grft_train.fit")

__all__ = ["FitError", "FitResult", "FitSetup", "TRAINABLE_DEF", "build_fit", "build_task_model", "check_selection",
           "make_package", "new_head", "plot_curves", "run_fit", "train_loop", "used_modules"]


class FitError(ValueError):
    """Training could not start (selection does not match the backbone, bad config, ...)."""


@dataclass
class FitResult:
    model: TaskModel
    package_path: Path | None  # None: the model cannot be packaged (a custom ``build_model``)
    metrics: dict[str, Any]
    labels: list[str]


# ---------------------------------------------------------------------------------------------
# model construction
# ---------------------------------------------------------------------------------------------
def check_selection(sel: Selection, spec, objective: str | None = None) -> None:
    """``sel`` can train a task on the base ``spec`` (same fingerprint, patchable modules, indices in
    range, computed for the same objective)."""
    if sel.mode == "sparse":
        raise FitError("a 'sparse' selection is the GPS element-wise baseline: it cannot be trained into a "
                       "task package (use mode row or column)")
    if sel.meta.get("base_fingerprint") != spec.fingerprint:
        raise FitError(f"selection was computed on base {sel.meta.get('base_model_id')} "
                       f"(fingerprint {sel.meta.get('base_fingerprint')}); this backbone is {spec.model_id} "
                       f"(fingerprint {spec.fingerprint})")
    got = sel.meta.get("objective", "classification")
    if objective is not None and got != objective:
        raise FitError(f"selection was computed for objective {got}; this run trains {objective} (select again "
                       "with the run's config)")
    for n, idx in sel.indices.items():
        ms = spec.modules.get(n)
        if ms is None:
            raise FitError(f"selected module {n!r} is not a patchable module of {spec.model_id}")
        if sel.mode == COLUMN and not ms.supports_columns():
            raise FitError(f"module {n!r} is a grouped conv: it cannot be column-patched")
        lim = ms.n_slices(sel.mode)
        if idx.numel() and (int(idx.max()) >= lim or int(idx.min()) < 0):
            raise FitError(f"selection index out of range for {n!r} ({lim} {sel.mode}s)")


def build_task_model(backbone: Backbone, sel: Selection, n_classes: int, cfg: FitConfig,
                     modules: list[str] | None = None) -> TaskModel:
    """Trainable model: selected rows/columns of ``sel``, biases per ``cfg.bias`` and a new head of
    ``n_classes`` outputs (none for ``n_classes`` 0: a generation task speaks through its base's
    ``lm_head``).

    ``modules``: the modules the forward uses (:func:`used_modules`), for ``bias: all``; without it
    every patchable non-head module gets one. A module without a bias of its own gets a zero one."""
    dev = next(backbone.parameters()).device
    if modules is None:
        modules = [n for n, _ in iter_patchable(backbone, backbone.exclude_from_patching()) if not is_head(n)]
    names = list(sel.indices)
    if cfg.bias == "all":
        names += [n for n in modules if n not in sel.indices]
    indices, values, biases = {}, {}, {}
    for n in names:
        mod = backbone.get_submodule(n)
        W = mod.weight.detach()
        i = sel.indices.get(n, torch.zeros(0, dtype=torch.int64)).to(W.device)
        indices[n] = i
        values[n] = (W.index_select(0, i) if sel.mode != COLUMN else W.index_select(1, i)).float()
        if cfg.bias == "none" or (cfg.bias == "selected" and mod.bias is None):
            biases[n] = None
        else:
            biases[n] = (mod.bias.detach().float() if mod.bias is not None
                         else torch.zeros(W.shape[0], dtype=torch.float32, device=W.device))
    head = new_head(backbone.feature_dim, n_classes, cfg).to(dev) if n_classes else None
    return TaskModel(backbone, sel.mode if sel.mode != "sparse" else "row", indices, values, biases, head,
                     trainable=True)


def new_head(feature_dim: int, n_classes: int, cfg: FitConfig) -> nn.Linear:
    """A task's classifier: zero, or N(0, 0.01²) weights (seeded by ``cfg.seed``), zero bias."""
    g = torch.Generator().manual_seed(cfg.seed)
    head = nn.Linear(feature_dim, n_classes)
    with torch.no_grad():
        if cfg.head_init == "zero":
            head.weight.zero_()
        else:
            head.weight.copy_(torch.randn(head.weight.shape, generator=g) * 0.01)
        head.bias.zero_()
    return head


# ---------------------------------------------------------------------------------------------
# build
# ---------------------------------------------------------------------------------------------
def _warmup_cosine(opt: torch.optim.Optimizer, warmup: int, total: int):
    """torch's schedulers: lr × (s+1)/warmup for the first ``warmup`` steps, then cosine to 0 at ``total``."""
    from torch.optim.lr_scheduler import CosineAnnealingLR, LinearLR, SequentialLR

    cos = CosineAnnealingLR(opt, T_max=max(1, total - warmup), eta_min=0.0)
    if warmup <= 0:
        return cos
    lin = LinearLR(opt, start_factor=1.0 / warmup, end_factor=1.0, total_iters=max(1, warmup - 1))
    return SequentialLR(opt, [lin, cos], milestones=[warmup])


@dataclass
class FitSetup:
    """Everything :func:`train_loop` needs: the model, its data, optimizer, schedule and L2 anchors."""

    model: TaskModel
    forward: Callable  # the model, or its head on frozen features (linear probe)
    data: dict[str, Any]  # split -> loop data (objective.data, or a FeatureSet)
    opt: torch.optim.Optimizer
    sched: Any
    total_steps: int
    n_batches: int
    reg: set[str]
    pre_vals: dict[str, torch.Tensor]
    pre_bias: dict[str, torch.Tensor]
    head0: tuple[torch.Tensor, torch.Tensor] | None
    counts: dict[str, int]
    head_only: bool
    prep_s: float
    timings: dict[str, float] = field(default_factory=dict)

    def l2(self, l2_head: bool, device: torch.device) -> torch.Tensor:
        """Σ_R ‖θ − θ_pre‖² (values and biases of the regularised modules, and the head)."""
        m = self.model
        r = torch.zeros((), device=device)
        for n in self.reg:
            r = r + (m.value(n) - self.pre_vals[n]).pow(2).sum()
            if n in self.pre_bias:
                r = r + (m.bias(n) - self.pre_bias[n]).pow(2).sum()
        if l2_head and self.head0 is not None:
            r = r + (m.head.weight - self.head0[0]).pow(2).sum() + (m.head.bias - self.head0[1]).pow(2).sum()
        return r


def build_fit(cfg: FitConfig, ctx: RunContext, sel: Selection, build_model=None) -> FitSetup:
    """The trainable model for ``sel`` (or ``build_model``'s), its optimizer, schedule and L2 anchors."""
    obj = ctx.objective
    prep_t = time.time()
    data = {s: obj.data(s, augment=cfg.augment and s == "train") for s in ("train", "val", "test")}
    if len(data["train"]) == 0:
        raise FitError("the train split is empty")
    used = ctx.used
    prep_s = time.time() - prep_t
    n_classes = len(obj.labels) if obj.kind == "classification" else 0
    model = (build_task_model(ctx.backbone, sel, n_classes, cfg, modules=used) if build_model is None
             else build_model(ctx.backbone, sel, n_classes, cfg))
    reg = set(regularised_modules(model.names, used, cfg.l2_last_layers, cfg.l2_embed))
    pre_vals = {n: model.value(n).detach().clone() for n in reg}
    pre_bias = {n: model.bias(n).detach().clone() for n in reg if model.bias(n) is not None}
    head0 = (model.head.weight.detach().clone(), model.head.bias.detach().clone()) if model.head is not None else None

    head_params = list(model.head.parameters()) if model.head is not None else []
    body_params = [p for n, p in model.named_parameters() if p.requires_grad and not n.startswith("head.")]
    groups = [{"params": body_params, "lr": cfg.lr}, {"params": head_params, "lr": cfg.head_lr or cfg.lr}]
    if not any(g["params"] for g in groups):
        raise FitError("nothing to train: the selection is empty and fit.bias is none (a generation task has no head)")
    opt = torch.optim.Adam([g for g in groups if g["params"]], weight_decay=cfg.weight_decay)

    n_body = sum(p.numel() for p in body_params)
    augmenting = cfg.augment and "timm_data_config" in ctx.preprocessing  # image tasks only
    head_only = n_body == 0 and model.head is not None and not augmenting
    forward = model.head if head_only else model
    if head_only:  # linear probe: the frozen backbone gives the same features every epoch
        feat_t = time.time()
        data = {s: FeatureSet.compute(d, ctx.backbone, ctx.device, cfg.batch_size, cfg.bf16) for s, d in data.items()}
        prep_s += time.time() - feat_t

    n_batches = math.ceil(len(data["train"]) / cfg.batch_size)
    steps_per_epoch = max(1, math.ceil(n_batches / cfg.grad_accum))
    total_steps = steps_per_epoch * cfg.epochs
    if cfg.max_steps is not None:
        total_steps = min(total_steps, cfg.max_steps)
    warmup = int(round(cfg.warmup_epochs * steps_per_epoch))
    sched = _warmup_cosine(opt, min(warmup, total_steps), total_steps)
    n_bias = sum(b.numel() for b in model.biases.values())
    counts = {"body": n_body, "bias": n_bias, "values": n_body - n_bias, "head": sum(p.numel() for p in head_params)}
    return FitSetup(model, forward, data, opt, sched, total_steps, n_batches, reg, pre_vals, pre_bias, head0, counts,
                    head_only, prep_s)


# ---------------------------------------------------------------------------------------------
# loop
# ---------------------------------------------------------------------------------------------
def train_loop(cfg: FitConfig, ctx: RunContext, st: FitSetup) -> tuple[list[dict], dict]:
    """Epochs of masked Adam steps; validation each ``eval_every`` epochs; the best epoch's values are
    put back into the model. Returns (history, best ``{"score", "epoch"}``)."""
    from tqdm.auto import tqdm

    obj, model, device = ctx.objective, st.model, ctx.device
    rng = np.random.default_rng(cfg.seed)
    history: list[dict] = []
    best: dict = {"score": None, "epoch": -1, "state": None}
    step, done = 0, False
    step_s = eval_s = step_cpu = 0.0
    for epoch in range(cfg.epochs):
        model.train()
        ep_loss, ep_ce, ep_hits, ep_n = 0.0, 0.0, 0, 0
        bar = tqdm(total=st.n_batches, desc=f"fit {cfg.task_id} epoch {epoch + 1}/{cfg.epochs}",
                   disable=None if cfg.progress else True, leave=False)
        st.opt.zero_grad(set_to_none=True)
        t_ep, c_ep = time.time(), time.process_time()
        for b, (batch, y) in enumerate(st.data["train"].batches(cfg.batch_size, shuffle=True, rng=rng)):
            batch, y = ctx.backbone.batch_to(batch, device), y.to(device)
            ce, n, hits = obj.batch_loss(st.forward, batch, y, cfg.bf16)
            loss = ce + st.l2(cfg.l2_head, device) * cfg.l2_lambda if cfg.l2_lambda > 0 else ce
            (loss / cfg.grad_accum).backward()
            ep_loss += float(loss.detach()) * n
            ep_ce += float(ce.detach()) * n
            ep_hits += hits
            ep_n += n
            if (b + 1) % cfg.grad_accum == 0 or b + 1 == st.n_batches:
                st.opt.step()
                st.sched.step()
                st.opt.zero_grad(set_to_none=True)
                step += 1
            bar.update(1)
            bar.set_postfix(loss=f"{ep_loss / max(ep_n, 1):.4f}", acc=f"{ep_hits / max(ep_n, 1):.3f}",
                            lr=f"{st.opt.param_groups[0]['lr']:.2e}")
            if cfg.max_steps is not None and step >= cfg.max_steps:
                done = True
                break
        bar.close()
        step_s += time.time() - t_ep
        step_cpu += time.process_time() - c_ep
        rec = {"epoch": epoch + 1, "step": step, "train_loss": ep_loss / max(ep_n, 1),
               "train_ce": ep_ce / max(ep_n, 1), "train_acc": ep_hits / max(ep_n, 1),
               "lr": st.opt.param_groups[0]["lr"]}
        last = done or epoch + 1 == cfg.epochs
        t_ev = time.time()
        if len(st.data["val"]) and ((epoch + 1) % cfg.eval_every == 0 or last):
            v = obj.evaluate(st.forward, st.data["val"], cfg.batch_size, cfg.bf16)
            rec.update(val_loss=v["loss"], val_acc=v["acc"])
            score = obj.score(v)
            if best["score"] is None or score > best["score"]:
                best = {"score": score, "epoch": epoch + 1, "state": _snapshot(model)}
        elif not len(st.data["val"]):
            best = {"score": None, "epoch": epoch + 1, "state": _snapshot(model)}
        eval_s += time.time() - t_ev
        history.append(rec)
        msg = (f"epoch {epoch + 1}: loss {rec['train_loss']:.4f} acc {rec['train_acc']:.3f}"
               + (f" | val loss {rec['val_loss']:.4f} acc {rec['val_acc']:.3f}" if "val_acc" in rec else ""))
        log.info(msg)
        if cfg.progress:
            tqdm.write(msg)
        if done:
            break
    if best["state"] is not None:
        _restore(model, best.pop("state"))
    log.info("kept epoch %d of %d%s", best["epoch"], len(history),
             f" (best val score {best['score'][0]:.4f})" if best["score"] is not None else " (no val split: the last)")
    st.timings.update(steps=step, step_s=step_s, step_cpu=step_cpu, eval_s=eval_s)
    return history, best


def _snapshot(model: TaskModel) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in model.named_parameters() if v.requires_grad}


def _restore(model: TaskModel, state: dict[str, torch.Tensor]) -> None:
    params = dict(model.named_parameters())
    with torch.no_grad():
        for k, v in state.items():
            params[k].copy_(v)


# ---------------------------------------------------------------------------------------------
# driver
# ---------------------------------------------------------------------------------------------
def run_fit(cfg: FitConfig, ctx: RunContext | None = None, *, backbone: Backbone | None = None, splits=None,
            selection: Selection | None = None, build_model=None) -> FitResult:
    """Train a task and write its package (+ metrics.json, curves.png) to ``cfg.out_dir``.

    Without ``ctx`` one is built from ``cfg`` (with ``backbone`` / ``splits`` if given). An empty
    selection with ``bias: none`` trains the head only (a linear probe): the frozen features are
    then computed once and the head trains on them. ``build_model(backbone, selection, n_classes,
    cfg) -> TaskModel`` replaces :func:`build_task_model` (the GPS, LoRA and full fine-tuning
    baselines of ``bench/accuracy.py``; ``n_classes`` is 0 for a generation task): the same loop
    trains it (every parameter with ``requires_grad``), the selection is not checked and no package
    is written (``package_path`` None)."""
    t0 = time.time()
    seed_everything(cfg.seed)
    sel = selection or Selection.load(cfg.selection)
    ctx = ctx or RunContext.build(cfg, backbone, splits)
    if build_model is None:
        check_selection(sel, ctx.spec, ctx.objective.name)
    if sel.meta.get("labels") and sel.meta["labels"] != ctx.labels:
        log.warning("selection was computed with labels %s; training with %s", sel.meta["labels"], ctx.labels)
    st = build_fit(cfg, ctx, sel, build_model)
    history, best = train_loop(cfg, ctx, st)
    pkg_path, metrics = write_fit(cfg, ctx, st, sel, history, best, t0, packaged=build_model is None)
    return FitResult(model=st.model, package_path=pkg_path, metrics=metrics, labels=ctx.labels)
