"""GRFT fine-tuning: only the selected rows/columns (+ biases + a new head) are parameters.

loss = CE + λ·Σ_{regularised} ‖θ − θ_pre‖², regularised = modules of the last L blocks, the
patch/stem embedding and the head (θ_pre of the head = its initialisation). Adam, linear warm-up then
cosine decay, gradient accumulation, bf16 autocast on CUDA, validation every epoch with the best
epoch kept. The frozen backbone is never modified: the trained values only live in the task package.

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

from grft_serve.backbones import Backbone
from grft_serve.package import PackageMeta, TaskPackage, save_package
from grft_serve.rowop import COLUMN, ModuleDelta

from .common import (apply_threads, autocast_ctx, build_backbone, count_params, is_embed, load_data, module_block,
                     resolve_device, seed_everything)
from .config import FitConfig
from .data import DataSplits, SampleSet
from .model import TaskModel
from .select import Selection

log = logging.getLogger("grft_train.fit")
TRAINABLE_DEF = ("(selected row/column values + tuned biases + head parameters) / total backbone "
                 "parameters x 100")


class FitError(ValueError):
    """Training could not start (selection does not match the backbone, bad config, ...)."""


@dataclass
class FitResult:
    model: TaskModel
    package_path: Path | None  # None: the model cannot be packaged (a custom ``build_model``)
    metrics: dict[str, Any]
    labels: list[str]


# ---------------------------------------------------------------------------------------------
# data preparation
# ---------------------------------------------------------------------------------------------
class Prepared:
    """A split ready for batching: image tensors preprocessed once (unless augmenting), text raw."""

    def __init__(self, ds: SampleSet, backbone: Backbone, augment_tf=None, chunk: int = 256):
        self.ds = ds
        self.backbone = backbone
        self.y = torch.tensor(ds.targets, dtype=torch.long)
        self.augment_tf = augment_tf
        self.x = None
        if backbone.kind == "image" and augment_tf is None and len(ds):
            parts = []
            for s in range(0, len(ds), chunk):
                parts.append(backbone.preprocess([ds[i][0] for i in range(s, min(s + chunk, len(ds)))]))
            self.x = torch.cat(parts)

    def __len__(self) -> int:
        return len(self.ds)

    def batches(self, bs: int, shuffle: bool = False, rng: np.random.Generator | None = None):
        order = rng.permutation(len(self)) if shuffle else np.arange(len(self))
        for s in range(0, len(order), bs):
            idx = order[s:s + bs]
            y = self.y[idx]
            if self.x is not None:
                yield self.x[torch.as_tensor(idx)], y
            elif self.augment_tf is not None:
                yield torch.stack([self.augment_tf(self.ds[int(i)][0]) for i in idx]), y
            else:
                yield self.backbone.preprocess([self.ds[int(i)][0] for i in idx]), y


def _train_augment(backbone: Backbone):
    from torchvision import transforms as T

    dc = backbone.data_config
    size = (int(dc["input_size"][-2]), int(dc["input_size"][-1]))
    return T.Compose([T.RandomResizedCrop(size, scale=(0.5, 1.0), antialias=True), T.RandomHorizontalFlip(),
                      T.ToTensor(), T.Normalize(dc["mean"], dc["std"])])


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


def regularised_modules(names: list[str], all_names: list[str], last_layers: int, embed: bool) -> list[str]:
    blocks = sorted({b for b in (module_block(n) for n in all_names) if b is not None})
    if last_layers < 0:
        keep_blocks = set(blocks)
    else:
        keep_blocks = set(blocks[len(blocks) - last_layers:]) if last_layers > 0 else set()
    out = []
    for n in names:
        b = module_block(n)
        if (b is not None and b in keep_blocks) or (embed and is_embed(n)) or (last_layers < 0 and b is None
                                                                                 and not is_embed(n)):
            out.append(n)
    return out


def build_task_model(backbone: Backbone, sel: Selection, n_classes: int, cfg: FitConfig) -> TaskModel:
    dev = next(backbone.parameters()).device
    values, biases = {}, {}
    for n, idx in sel.indices.items():
        mod = backbone.get_submodule(n)
        W = mod.weight.detach()
        i = idx.to(W.device)
        values[n] = (W.index_select(0, i) if sel.mode != COLUMN else W.index_select(1, i)).float()
        biases[n] = mod.bias.detach().float() if (cfg.tune_bias and mod.bias is not None) else None
    g = torch.Generator().manual_seed(cfg.seed)
    head = nn.Linear(backbone.feature_dim, n_classes)
    with torch.no_grad():
        if cfg.head_init == "zero":
            head.weight.zero_()
        else:
            head.weight.copy_(torch.randn(head.weight.shape, generator=g) * 0.01)
        head.bias.zero_()
    return TaskModel(backbone, sel.mode, dict(sel.indices), values, biases, head.to(dev), trainable=True)


# ---------------------------------------------------------------------------------------------
# loops
# ---------------------------------------------------------------------------------------------
@torch.no_grad()
def evaluate_prepared(model: TaskModel, data: Prepared, device: torch.device, bs: int, bf16: bool = True,
                      return_logits: bool = False):
    model.eval()
    tot_loss, correct, n = 0.0, 0, 0
    all_logits = []
    for batch, y in data.batches(bs):
        batch = model.backbone.batch_to(batch, device)
        y = y.to(device)
        with autocast_ctx(device, bf16):
            logits = model(batch)
        logits = logits.float()
        tot_loss += float(F.cross_entropy(logits, y, reduction="sum"))
        correct += int((logits.argmax(1) == y).sum())
        n += len(y)
        if return_logits:
            all_logits.append(logits.cpu())
    res = {"loss": tot_loss / max(n, 1), "acc": correct / max(n, 1), "n": n}
    if return_logits:
        res["logits"] = torch.cat(all_logits) if all_logits else torch.zeros(0)
    return res


def _lr_lambda(warmup: int, total: int):
    def f(step: int) -> float:
        if warmup > 0 and step < warmup:
            return (step + 1) / warmup
        prog = (step - warmup) / max(1, total - warmup)
        return 0.5 * (1.0 + math.cos(math.pi * min(1.0, prog)))
    return f


def run_fit(cfg: FitConfig, backbone: Backbone | None = None, splits: DataSplits | None = None,
            selection: Selection | None = None, build_model=None) -> FitResult:
    """Train a task and write its package (+ metrics.json, curves.png) to ``cfg.out_dir``.

    An empty selection trains the head only (a linear probe). ``build_model(backbone, selection,
    n_classes, cfg) -> TaskModel`` replaces :func:`build_task_model` (e.g. the GPS sparse baseline in
    ``bench/accuracy.py``): the same loop trains it, the selection is not checked and no package is
    written (``package_path`` None)."""
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

    model = (build_model or build_task_model)(backbone, sel, len(splits.labels), cfg)
    reg = set(regularised_modules(model.names, list(spec.modules), cfg.l2_last_layers, cfg.l2_embed))
    pre_vals = {n: model.value(n).detach().clone() for n in reg}
    pre_bias = {n: model.bias(n).detach().clone() for n in reg if model.bias(n) is not None}
    head_w0, head_b0 = model.head.weight.detach().clone(), model.head.bias.detach().clone()

    head_params = list(model.head.parameters())
    row_params = list(model.values.values()) + list(model.biases.values())
    groups = [{"params": row_params, "lr": cfg.lr}, {"params": head_params, "lr": cfg.head_lr or cfg.lr}]
    opt = torch.optim.Adam([g for g in groups if g["params"]], weight_decay=cfg.weight_decay)

    aug = _train_augment(backbone) if (cfg.augment and backbone.kind == "image") else None
    prep_t = time.time()
    train = Prepared(splits.train, backbone, aug)
    val = Prepared(splits.val, backbone)
    test = Prepared(splits.test, backbone)
    prep_s = time.time() - prep_t
    if len(train) == 0:
        raise FitError("the train split is empty")

    n_batches = math.ceil(len(train) / cfg.batch_size)
    steps_per_epoch = max(1, math.ceil(n_batches / cfg.grad_accum))
    total_steps = steps_per_epoch * cfg.epochs
    if cfg.max_steps is not None:
        total_steps = min(total_steps, cfg.max_steps)
    warmup = int(round(cfg.warmup_epochs * steps_per_epoch))
    sched = torch.optim.lr_scheduler.LambdaLR(opt, _lr_lambda(min(warmup, total_steps), total_steps))

    n_values = sum(v.numel() for v in model.values.values())
    n_bias = sum(b.numel() for b in model.biases.values())
    n_head = sum(p.numel() for p in head_params)
    total_backbone = count_params(backbone)
    trainable = n_values + n_bias + n_head

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
    for epoch in range(cfg.epochs):
        model.train()
        ep_loss, ep_ce, ep_correct, ep_n = 0.0, 0.0, 0, 0
        bar = tqdm(total=n_batches, desc=f"fit {cfg.task_id} epoch {epoch + 1}/{cfg.epochs}",
                   disable=not cfg.progress, leave=False)
        opt.zero_grad(set_to_none=True)
        for b, (batch, y) in enumerate(train.batches(cfg.batch_size, shuffle=True, rng=rng)):
            batch = backbone.batch_to(batch, device)
            y = y.to(device)
            with autocast_ctx(device, cfg.bf16):
                logits = model(batch)
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
        rec = {"epoch": epoch + 1, "step": step, "train_loss": ep_loss / max(ep_n, 1),
               "train_ce": ep_ce / max(ep_n, 1), "train_acc": ep_correct / max(ep_n, 1),
               "lr": opt.param_groups[0]["lr"]}
        last = done or epoch + 1 == cfg.epochs
        if len(val) and ((epoch + 1) % cfg.eval_every == 0 or last):
            v = evaluate_prepared(model, val, device, cfg.batch_size, cfg.bf16)
            rec.update(val_loss=v["loss"], val_acc=v["acc"])
            score = (v["acc"], -v["loss"])
            if best["score"] is None or score > best["score"]:
                best = {"score": score, "epoch": epoch + 1, "state": _snapshot(model)}
        elif not len(val):
            best = {"score": None, "epoch": epoch + 1, "state": _snapshot(model)}
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
    test_res = evaluate_prepared(model, test, device, cfg.batch_size, cfg.bf16) if len(test) else {}
    val_res = evaluate_prepared(model, val, device, cfg.batch_size, cfg.bf16) if len(val) else {}

    metrics = {
        "test_acc": test_res.get("acc"), "test_loss": test_res.get("loss"), "n_test": test_res.get("n", 0),
        "val_acc": val_res.get("acc"), "best_epoch": best["epoch"], "steps": step,
        "trainable_params": trainable, "trainable_values": n_values, "trainable_biases": n_bias,
        "head_params": n_head, "backbone_params": total_backbone,
        "trainable_pct": 100.0 * trainable / total_backbone,
        "trainable_pct_definition": TRAINABLE_DEF,
        "n_train": len(train), "n_val": len(val), "train_seconds": round(time.time() - t0, 2),
        "preprocess_seconds": round(prep_s, 2), "device": str(device),
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
    ks = {n: int(d.indices.numel()) for n, d in deltas.items()}
    k_meta: int | dict[str, int] = (ks[next(iter(ks))] if len(set(ks.values())) == 1 else ks) if ks else 0
    pkg_metrics = {k: v for k, v in metrics.items() if k not in ("history", "regularised_modules")}
    meta = PackageMeta(task_id=cfg.task_id, base_model_id=spec.model_id, base_fingerprint=spec.fingerprint,
                       mode=sel.mode, k=k_meta, labels=list(labels),
                       preprocessing=backbone.preprocessing_meta(), metrics=pkg_metrics,
                       training_config=cfg.model_dump(mode="json"),
                       trainable_pct_definition=TRAINABLE_DEF,
                       selection={kk: sel.meta.get(kk) for kk in ("budget", "subsets", "chosen_subset",
                                                                  "selected_fraction")})
    return TaskPackage(meta=meta, deltas=deltas, head_weight=model.head.weight.detach().float().cpu(),
                       head_bias=model.head.bias.detach().float().cpu())


def plot_curves(history: list[dict], path: Path, title: str = "") -> Path:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

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
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path
