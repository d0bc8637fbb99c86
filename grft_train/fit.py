"""GRFT fine-tuning: only the selected rows/columns (+ biases + a new head) are parameters.

loss = CE + λ·Σ_{l∈R} ‖θ_l − θ_l,pre‖², R = the modules of the last L layers, the stem / patch
embedding and the head (θ_pre of the head = its initialisation; layers as in
:mod:`grft_train.layers`). One Adam learning rate for every parameter (a separate head rate is
optional), linear warm-up then cosine decay, gradient accumulation, bf16 autocast on CUDA,
validation every epoch with the best epoch kept. The frozen backbone is never modified: the
trained values only live in the task package.

Biases (``fit.bias``): ``all`` trains the bias of every patchable module the forward uses, as the
GRFT/GPS papers count their parameters — a module without a bias gets a zero-initialised one (after
a convolution followed by batch norm it is the same degree of freedom as the norm's shift);
``selected`` only those of modules with selected rows/columns; ``none``. Norms stay frozen.

A step costs a forward plus a backward to the inputs of each layer: frozen weights get no weight
gradient and no optimizer state, and the row op writes the trained rows into each layer's output in
place. With nothing trainable in the backbone (an empty selection, ``bias: none``: a linear probe)
the frozen features are computed once and only the head trains.

Trainable-parameter percentage (``metrics.trainable_pct``) = (selected row/column values + tuned
biases + head parameters) / total backbone parameters × 100.
"""
from __future__ import annotations

import json
import logging
import math
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from grft_serve.core.backbones import Backbone
from grft_serve.core.package import PackageMeta, TaskPackage, save_package
from grft_serve.core.spec import iter_patchable
from grft_serve.core.rowop import COLUMN, ModuleDelta

from .common import (apply_threads, autocast_ctx, build_backbone, count_params, is_head, load_data, resolve_device,
                     seed_everything, task_preprocessing)
from .config import FitConfig
from .data import DataSplits
from .layers import describe_regularised, regularised_modules
from .model import TaskModel
from .plots import pyplot, save_figure
from .loader import Batches as Prepared
from .prepared import FeatureSet, evaluate_prepared, train_augment
from .select import Selection

log = logging.getLogger("grft_train.fit")
TRAINABLE_DEF = ("(selected row/column values + tuned biases + head parameters) / total backbone "
                 "parameters x 100")

__all__ = ["FitError", "FitResult", "check_selection", "used_modules", "build_task_model", "run_fit",
           "make_package", "plot_curves"]


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
def check_selection(sel: Selection, backbone: Backbone, spec=None) -> None:
    spec = spec or backbone.describe()
    if sel.mode == "sparse":
        raise FitError("a 'sparse' selection is the GPS element-wise baseline: it cannot be trained into a "
                       "task package (use mode row or column)")
    if sel.meta.get("base_fingerprint") != spec.fingerprint:
        raise FitError(f"selection was computed on base {sel.meta.get('base_model_id')} "
                       f"(fingerprint {sel.meta.get('base_fingerprint')}); this backbone is {spec.model_id} "
                       f"(fingerprint {spec.fingerprint})")
    for n, idx in sel.indices.items():
        ms = spec.modules.get(n)
        if ms is None:
            raise FitError(f"selected module {n!r} is not a patchable module of {spec.model_id}")
        if sel.mode == COLUMN and not ms.supports_columns():
            raise FitError(f"module {n!r} is a grouped conv: it cannot be column-patched")
        lim = ms.n_slices(sel.mode)
        if idx.numel() and (int(idx.max()) >= lim or int(idx.min()) < 0):
            raise FitError(f"selection index out of range for {n!r} ({lim} {sel.mode}s)")


@torch.no_grad()
def used_modules(backbone: Backbone, batch) -> list[str]:
    """Patchable modules (heads excluded) that a forward of ``batch`` runs, in definition order.

    Modules the forward never reaches (an unused BERT pooler, a causal-LM head) get no bias: a
    parameter there would be counted as trainable and stored without ever changing an output."""
    mods = [(n, m) for n, m in iter_patchable(backbone, backbone.exclude_from_patching()) if not is_head(n)]
    ran: set[str] = set()
    handles = [m.register_forward_hook(lambda mod, i, o, n=n: ran.add(n)) for n, m in mods]
    try:
        backbone(batch)
    finally:
        for h in handles:
            h.remove()
    return [n for n, _ in mods if n in ran]


def build_task_model(backbone: Backbone, sel: Selection, n_classes: int, cfg: FitConfig,
                     modules: list[str] | None = None) -> TaskModel:
    """Trainable model: selected rows/columns of ``sel``, biases per ``cfg.bias`` and a new head.

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
    g = torch.Generator().manual_seed(cfg.seed)
    head = nn.Linear(backbone.feature_dim, n_classes)
    with torch.no_grad():
        if cfg.head_init == "zero":
            head.weight.zero_()
        else:
            head.weight.copy_(torch.randn(head.weight.shape, generator=g) * 0.01)
        head.bias.zero_()
    return TaskModel(backbone, sel.mode if sel.mode != "sparse" else "row", indices, values, biases,
                     head.to(dev), trainable=True)


# ---------------------------------------------------------------------------------------------
# loops
# ---------------------------------------------------------------------------------------------
def _warmup_cosine(opt: torch.optim.Optimizer, warmup: int, total: int):
    """torch's schedulers: lr × (s+1)/warmup for the first ``warmup`` steps, then cosine to 0 at ``total``."""
    from torch.optim.lr_scheduler import CosineAnnealingLR, LinearLR, SequentialLR

    cos = CosineAnnealingLR(opt, T_max=max(1, total - warmup), eta_min=0.0)
    if warmup <= 0:
        return cos
    lin = LinearLR(opt, start_factor=1.0 / warmup, end_factor=1.0, total_iters=max(1, warmup - 1))
    return SequentialLR(opt, [lin, cos], milestones=[warmup])


def run_fit(cfg: FitConfig, backbone: Backbone | None = None, splits: DataSplits | None = None,
            selection: Selection | None = None, build_model=None) -> FitResult:
    """Train a task and write its package (+ metrics.json, curves.png) to ``cfg.out_dir``.

    An empty selection with ``bias: none`` trains the head only (a linear probe): the frozen
    features are then computed once and the head trains on them. ``build_model(backbone, selection,
    n_classes, cfg) -> TaskModel`` replaces :func:`build_task_model` (the GPS, LoRA and full
    fine-tuning baselines of ``bench/accuracy.py``): the same loop trains it (every parameter with
    ``requires_grad``), the selection is not checked and no package is written (``package_path`` None)."""
    from tqdm.auto import tqdm

    t0 = time.time()
    seed_everything(cfg.seed)
    apply_threads(cfg)
    device = resolve_device(cfg.device)
    sel = selection or Selection.load(cfg.selection)
    if backbone is None:
        backbone = build_backbone(cfg, device)
    if splits is None:
        splits = load_data(cfg, backbone)
    spec = backbone.describe()
    if build_model is None:
        check_selection(sel, backbone, spec)
    if sel.meta.get("labels") and sel.meta["labels"] != splits.labels:
        log.warning("selection was computed with labels %s; training with %s", sel.meta["labels"], splits.labels)

    prep = task_preprocessing(backbone, cfg)
    aug = train_augment(prep) if (cfg.augment and "timm_data_config" in prep) else None
    prep_t = time.time()
    train = Prepared(splits.train, backbone, aug, preprocessing=prep)
    val = Prepared(splits.val, backbone, preprocessing=prep)
    test = Prepared(splits.test, backbone, preprocessing=prep)
    if len(train) == 0:
        raise FitError("the train split is empty")
    probe = backbone.batch_to(backbone.preprocess([splits.train[0][0]], prep), device)
    used = used_modules(backbone, probe)
    prep_s = time.time() - prep_t

    if build_model is None:
        model = build_task_model(backbone, sel, len(splits.labels), cfg, modules=used)
    else:
        model = build_model(backbone, sel, len(splits.labels), cfg)
    reg = set(regularised_modules(model.names, used, cfg.l2_last_layers, cfg.l2_embed))
    pre_vals = {n: model.value(n).detach().clone() for n in reg}
    pre_bias = {n: model.bias(n).detach().clone() for n in reg if model.bias(n) is not None}
    head_w0, head_b0 = model.head.weight.detach().clone(), model.head.bias.detach().clone()

    head_params = list(model.head.parameters())
    body_params = [p for n, p in model.named_parameters() if p.requires_grad and not n.startswith("head.")]
    groups = [{"params": body_params, "lr": cfg.lr}, {"params": head_params, "lr": cfg.head_lr or cfg.lr}]
    opt = torch.optim.Adam([g for g in groups if g["params"]], weight_decay=cfg.weight_decay)

    n_body = sum(p.numel() for p in body_params)
    head_only = n_body == 0 and aug is None
    forward = model.head if head_only else model
    if head_only:  # linear probe: the frozen backbone gives the same features every epoch
        feat_t = time.time()
        train, val, test = (FeatureSet.compute(d, backbone, device, cfg.batch_size, cfg.bf16) for d in (train, val, test))
        prep_s += time.time() - feat_t

    n_batches = math.ceil(len(train) / cfg.batch_size)
    steps_per_epoch = max(1, math.ceil(n_batches / cfg.grad_accum))
    total_steps = steps_per_epoch * cfg.epochs
    if cfg.max_steps is not None:
        total_steps = min(total_steps, cfg.max_steps)
    warmup = int(round(cfg.warmup_epochs * steps_per_epoch))
    sched = _warmup_cosine(opt, min(warmup, total_steps), total_steps)

    n_bias = sum(b.numel() for b in model.biases.values())
    n_values = n_body - n_bias
    n_head = sum(p.numel() for p in head_params)
    total_backbone = count_params(backbone)
    trainable = n_body + n_head

    def l2_term() -> torch.Tensor:
        r = torch.zeros((), device=device)
        for n in reg:
            r = r + (model.value(n) - pre_vals[n]).pow(2).sum()
            if n in pre_bias:
                r = r + (model.bias(n) - pre_bias[n]).pow(2).sum()
        if cfg.l2_head:
            r = r + (model.head.weight - head_w0).pow(2).sum() + (model.head.bias - head_b0).pow(2).sum()
        return r

    rng = np.random.default_rng(cfg.seed)
    history: list[dict] = []
    best = {"score": None, "epoch": -1, "state": None}
    step = 0
    done = False
    step_s = eval_s = step_cpu = 0.0
    for epoch in range(cfg.epochs):
        model.train()
        ep_loss, ep_ce, ep_correct, ep_n = 0.0, 0.0, 0, 0
        bar = tqdm(total=n_batches, desc=f"fit {cfg.task_id} epoch {epoch + 1}/{cfg.epochs}",
                   disable=None if cfg.progress else True, leave=False)
        opt.zero_grad(set_to_none=True)
        t_ep, c_ep = time.time(), time.process_time()
        for b, (batch, y) in enumerate(train.batches(cfg.batch_size, shuffle=True, rng=rng)):
            batch = backbone.batch_to(batch, device)
            y = y.to(device)
            with autocast_ctx(device, cfg.bf16):
                logits = forward(batch)
            ce = F.cross_entropy(logits.float(), y)
            reg_loss = l2_term() * cfg.l2_lambda if cfg.l2_lambda > 0 else torch.zeros((), device=device)
            loss = ce + reg_loss
            (loss / cfg.grad_accum).backward()
            ep_loss += float(loss.detach()) * len(y)
            ep_ce += float(ce.detach()) * len(y)
            ep_correct += int((logits.argmax(1) == y).sum())
            ep_n += len(y)
            if (b + 1) % cfg.grad_accum == 0 or b + 1 == n_batches:
                opt.step()
                sched.step()
                opt.zero_grad(set_to_none=True)
                step += 1
            bar.update(1)
            bar.set_postfix(loss=f"{ep_loss / ep_n:.4f}", acc=f"{ep_correct / ep_n:.3f}",
                            lr=f"{opt.param_groups[0]['lr']:.2e}")
            if cfg.max_steps is not None and step >= cfg.max_steps:
                done = True
                break
        bar.close()
        step_s += time.time() - t_ep
        step_cpu += time.process_time() - c_ep
        rec = {"epoch": epoch + 1, "step": step, "train_loss": ep_loss / max(ep_n, 1),
               "train_ce": ep_ce / max(ep_n, 1), "train_acc": ep_correct / max(ep_n, 1),
               "lr": opt.param_groups[0]["lr"]}
        last = done or epoch + 1 == cfg.epochs
        t_ev = time.time()
        if len(val) and ((epoch + 1) % cfg.eval_every == 0 or last):
            v = evaluate_prepared(forward, val, device, cfg.batch_size, cfg.bf16)
            rec.update(val_loss=v["loss"], val_acc=v["acc"])
            score = (v["acc"], -v["loss"])
            if best["score"] is None or score > best["score"]:
                best = {"score": score, "epoch": epoch + 1, "state": _snapshot(model)}
        elif not len(val):
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
        _restore(model, best["state"])
    log.info("kept epoch %d of %d%s", best["epoch"], len(history),
             f" (best val acc {best['score'][0]:.3f})" if best["score"] is not None else " (no val split: the last)")
    t_ev = time.time()
    test_res = evaluate_prepared(forward, test, device, cfg.batch_size, cfg.bf16) if len(test) else {}
    val_res = evaluate_prepared(forward, val, device, cfg.batch_size, cfg.bf16) if len(val) else {}
    eval_s += time.time() - t_ev

    metrics = {
        "test_acc": test_res.get("acc"), "test_loss": test_res.get("loss"), "n_test": test_res.get("n", 0),
        "val_acc": val_res.get("acc"), "best_epoch": best["epoch"], "steps": step,
        "trainable_params": trainable, "trainable_values": n_values, "trainable_biases": n_bias,
        "head_params": n_head, "backbone_params": total_backbone,
        "trainable_pct": 100.0 * trainable / total_backbone,
        "trainable_pct_definition": TRAINABLE_DEF, "bias": cfg.bias,
        "n_train": len(train), "n_val": len(val), "train_seconds": round(time.time() - t0, 2),
        "step_seconds": round(step_s, 2), "step_cpu_seconds": round(step_cpu, 2), "eval_seconds": round(eval_s, 2),
        "preprocess_seconds": round(prep_s, 2), "device": str(device), "head_only": head_only,
        "regularised": describe_regularised(used, cfg.l2_last_layers, cfg.l2_embed, cfg.l2_head),
        "regularised_modules": sorted(reg), "history": history,
    }
    out_dir = Path(cfg.out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    pkg_path = None
    if build_model is None:
        pkg_path = Path(cfg.package) if cfg.package else out_dir / f"{cfg.task_id}.grft.safetensors"
        pkg = make_package(model, sel, spec, backbone, splits.labels, cfg, metrics)
        save_package(pkg, pkg_path)
    metrics["package"] = str(pkg_path) if pkg_path else None
    (out_dir / "metrics.json").write_text(json.dumps(metrics, indent=2))
    try:
        plot_curves(history, out_dir / "curves.png", cfg.task_id)
    except Exception as e:  # noqa: BLE001 - plots are a convenience
        log.warning("curve plot failed: %s", e)
    return FitResult(model=model, package_path=pkg_path, metrics=metrics, labels=splits.labels)


def _snapshot(model: TaskModel) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in model.named_parameters() if v.requires_grad}


def _restore(model: TaskModel, state: dict[str, torch.Tensor]) -> None:
    params = dict(model.named_parameters())
    with torch.no_grad():
        for k, v in state.items():
            params[k].copy_(v)


def make_package(model: TaskModel, sel: Selection, spec, backbone: Backbone, labels: list[str],
                 cfg: FitConfig, metrics: dict) -> TaskPackage:
    deltas = {}
    for n in model.names:
        b = model.bias(n)
        deltas[n] = ModuleDelta(mode=sel.mode, indices=model.indices(n).detach().cpu(),
                                values=model.value(n).detach().float().cpu(),
                                bias=b.detach().float().cpu() if b is not None else None)
    ks = {n: int(d.indices.numel()) for n, d in deltas.items() if d.indices.numel()}  # bias-only: k=0
    k_meta: int | dict[str, int] = (ks[next(iter(ks))] if len(set(ks.values())) == 1 else ks) if ks else 0
    pkg_metrics = {k: v for k, v in metrics.items() if k not in ("history", "regularised_modules")}
    meta = PackageMeta(task_id=cfg.task_id, base_model_id=spec.model_id, base_fingerprint=spec.fingerprint,
                       mode=sel.mode, k=k_meta, labels=list(labels),
                       preprocessing=task_preprocessing(backbone, cfg), metrics=pkg_metrics,
                       training_config=cfg.model_dump(mode="json"),
                       trainable_pct_definition=TRAINABLE_DEF,
                       selection={kk: sel.meta.get(kk) for kk in ("budget", "subsets", "chosen_subset",
                                                                  "selected_fraction")})
    return TaskPackage(meta=meta, deltas=deltas, head_weight=model.head.weight.detach().float().cpu(),
                       head_bias=model.head.bias.detach().float().cpu())


def plot_curves(history: list[dict], path: Path, title: str = "") -> Path:
    plt = pyplot()

    ep = [h["epoch"] for h in history]
    fig, (a1, a2) = plt.subplots(1, 2, figsize=(9, 3.4))
    a1.plot(ep, [h["train_loss"] for h in history], "o-", label="train")
    if any("val_loss" in h for h in history):
        a1.plot([h["epoch"] for h in history if "val_loss" in h], [h["val_loss"] for h in history if "val_loss" in h],
                "o-", label="val")
    a1.set_xlabel("epoch"), a1.set_ylabel("loss"), a1.legend()
    a2.plot(ep, [h["train_acc"] for h in history], "o-", label="train")
    if any("val_acc" in h for h in history):
        a2.plot([h["epoch"] for h in history if "val_acc" in h], [h["val_acc"] for h in history if "val_acc" in h],
                "o-", label="val")
    a2.set_xlabel("epoch"), a2.set_ylabel("accuracy"), a2.legend()
    fig.suptitle(f"GRFT {title}")
    return save_figure(fig, path)
