"""``grft-train eval``: accuracy of a task package on a data split (generation packages:
:mod:`grft_train.geneval`, the task against its base).

The package is loaded with :func:`grft_serve.core.package.load_package` against the backbone's
:class:`~grft_serve.core.spec.BaseSpec` (fingerprint, shapes, indices all checked) and applied through
:class:`grft_serve.core.rowop.RowOpHooks` — the same row op the serving engine uses.
"""
from __future__ import annotations

import json
import time
from pathlib import Path

import numpy as np
import torch

from grft_serve.core.backbones import Backbone
from grft_serve.core.package import load_package

from .config import EvalConfig
from .context import RunContext
from .data import DataError, DataSplits, SampleSet
from .loader import Batches
from .model import TaskModel
from .prepared import evaluate_prepared

__all__ = ["load_task_model", "package_logits", "run_eval"]


def load_task_model(package: str | Path, backbone: Backbone, spec=None) -> TaskModel:
    """Backbone + package deltas (via RowOpHooks) + package head. Inputs are prepared by passing
    ``model.meta.preprocessing`` to ``backbone.preprocess`` on each call (the backbone is unchanged)."""
    pkg = load_package(package, base=spec or backbone.describe())
    model = TaskModel.from_package(backbone, pkg)
    model.meta = pkg.meta
    return model.eval()


def _remap(ds: SampleSet, data_labels: list[str], pkg_labels: list[str]) -> SampleSet:
    if data_labels == pkg_labels:
        return ds
    missing = [n for n in data_labels if n not in pkg_labels]
    if missing:
        raise DataError(f"data labels {missing} are unknown to the package (labels {pkg_labels})")
    m = {i: pkg_labels.index(n) for i, n in enumerate(data_labels)}
    return SampleSet(ds.source, ds.positions, [m[t] for t in ds.targets], pkg_labels, ds.workers)


def run_eval(cfg: EvalConfig, ctx: RunContext | None = None, *, backbone: Backbone | None = None,
             splits: DataSplits | None = None) -> dict:
    """The report of ``cfg.package`` on ``cfg.split``. Without ``ctx`` one is built from ``cfg``."""
    if not cfg.package:
        raise ValueError("eval needs a package path")
    t0 = time.time()
    ctx = ctx or RunContext.build(cfg, backbone, splits)
    model = load_task_model(cfg.package, ctx.backbone, ctx.spec)
    try:
        if model.meta.kind == "generation":
            from .geneval import run_generation_eval

            report = {"package": str(cfg.package), "task_id": model.meta.task_id, "split": cfg.split,
                      **run_generation_eval(cfg, ctx, model)}
        else:
            report = _classification_report(cfg, ctx, model)
    finally:
        model.close()
    report.update(base_model_id=model.meta.base_model_id, seconds=round(time.time() - t0, 2))
    if cfg.out:
        Path(cfg.out).parent.mkdir(parents=True, exist_ok=True)
        Path(cfg.out).write_text(json.dumps(report, indent=2))
    return report


def _classification_report(cfg: EvalConfig, ctx: RunContext, model: TaskModel) -> dict:
    ds = _remap(ctx.splits.split(cfg.split), ctx.splits.labels, list(model.meta.labels))
    data = Batches(ds, ctx.backbone, preprocessing=model.meta.preprocessing)
    res = evaluate_prepared(model, data, ctx.device, cfg.batch_size, return_logits=True)
    logits = res.pop("logits")
    y = np.asarray(ds.targets)
    pred = logits.argmax(1).numpy() if len(logits) else np.zeros(0, dtype=np.int64)
    per_class = {}
    for c, name in enumerate(model.meta.labels):
        m = y == c
        if m.any():
            per_class[name] = float((pred[m] == c).mean())
    return {"package": str(cfg.package), "task_id": model.meta.task_id, "split": cfg.split,
            "accuracy": res["acc"], "loss": res["loss"], "n": res["n"], "per_class_accuracy": per_class}


@torch.no_grad()
def package_logits(package: str | Path, backbone: Backbone, raws: list) -> torch.Tensor:
    """Logits of a package on raw inputs (for tests and quick checks)."""
    model = load_task_model(package, backbone)
    try:
        dev = next(backbone.parameters()).device
        return model(backbone.batch_to(backbone.preprocess(raws, model.meta.preprocessing), dev)).float().cpu()
    finally:
        model.close()
