"""``grft-train eval``: accuracy of a task package on a data split.

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

from .common import apply_threads, build_backbone, load_data, resolve_device
from .config import EvalConfig
from .data import DataError, DataSplits, SampleSet
from .loader import Batches
from .prepared import evaluate_prepared
from .model import TaskModel

__all__ = ["load_task_model", "package_logits", "run_eval"]


def load_task_model(package: str | Path, backbone: Backbone) -> TaskModel:
    """Backbone + package deltas (via RowOpHooks) + package head. Inputs are prepared by passing
    ``model.meta.preprocessing`` to ``backbone.preprocess`` on each call (the backbone is unchanged)."""
    pkg = load_package(package, base=backbone.describe())
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


def run_eval(cfg: EvalConfig, backbone: Backbone | None = None, splits: DataSplits | None = None) -> dict:
    if not cfg.package:
        raise ValueError("eval needs a package path")
    t0 = time.time()
    apply_threads(cfg)
    device = resolve_device(cfg.device)
    if backbone is None:
        backbone = build_backbone(cfg, device)
    model = load_task_model(cfg.package, backbone)
    try:
        if splits is None:
            splits = load_data(cfg, backbone)
        ds = _remap(splits.split(cfg.split), splits.labels, list(model.meta.labels))
        data = Batches(ds, backbone, preprocessing=model.meta.preprocessing)
        res = evaluate_prepared(model, data, device, cfg.batch_size, return_logits=True)
    finally:
        model.close()
    logits = res.pop("logits")
    y = np.asarray(ds.targets)
    pred = logits.argmax(1).numpy() if len(logits) else np.zeros(0, dtype=np.int64)
    per_class = {}
    for c, name in enumerate(model.meta.labels):
        m = y == c
        if m.any():
            per_class[name] = float((pred[m] == c).mean())
    report = {"package": str(cfg.package), "task_id": model.meta.task_id, "split": cfg.split,
              "accuracy": res["acc"], "loss": res["loss"], "n": res["n"], "per_class_accuracy": per_class,
              "base_model_id": model.meta.base_model_id, "seconds": round(time.time() - t0, 2)}
    if cfg.out:
        Path(cfg.out).parent.mkdir(parents=True, exist_ok=True)
        Path(cfg.out).write_text(json.dumps(report, indent=2))
    return report


@torch.no_grad()
def package_logits(package: str | Path, backbone: Backbone, raws: list) -> torch.Tensor:
    """Logits of a package on raw inputs (for tests and quick checks)."""
    model = load_task_model(package, backbone)
    try:
        dev = next(backbone.parameters()).device
        return model(backbone.batch_to(backbone.preprocess(raws, model.meta.preprocessing), dev)).float().cpu()
    finally:
        model.close()
