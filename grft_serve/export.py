"""Merge one task into a standalone model, and export it to ONNX.

For deployments that serve a single task without the engine (an edge box, another runtime): the
task's rows/columns/biases are written into a copy of the base and its head is attached, so the
result is an ordinary model whose logits equal the engine's for that task. ``export_onnx`` checks it
with onnxruntime against PyTorch, records the task's labels, preprocessing and version in the ONNX
``metadata_props``, and publishes the file atomically (mode 0666 less the umask).
"""
from __future__ import annotations

import copy
import json
import os
import tempfile
from pathlib import Path
from typing import Any

import torch
from torch import nn

from .core.atomic import atomic_write
from .core.backbones import Backbone
from .core.package import TaskPackage, load_package
from .core.rowop import ROW
from .store import content_version

__all__ = ["MergedTask", "merge_task", "export_onnx", "onnx_metadata"]


class MergedTask(nn.Module):
    """``head(backbone_with_task_weights(batch))``: one task, no hooks, no engine."""

    def __init__(self, backbone: Backbone, pkg: TaskPackage):
        super().__init__()
        if pkg.meta.kind != "classification":
            raise ValueError(f"task {pkg.meta.task_id!r} is a {pkg.meta.kind} task: merging and ONNX export cover "
                             "classification tasks (a generation task is served by the OpenAI-compatible routes "
                             "and run locally with `grft-train generate`)")
        bb = copy.deepcopy(backbone).eval()
        mods = dict(bb.named_modules())
        with torch.no_grad():
            for name, d in pkg.deltas.items():
                w = mods[name].weight
                vals = d.values.to(device=w.device, dtype=w.dtype)
                idx = d.indices.to(w.device)
                w.index_copy_(0 if d.mode == ROW else 1, idx, vals)
                if d.bias is not None and mods[name].bias is None:  # a task bias on a bias-free module
                    mods[name].bias = nn.Parameter(d.bias.to(device=w.device, dtype=w.dtype), requires_grad=False)
                elif d.bias is not None:
                    mods[name].bias.copy_(d.bias.to(mods[name].bias))
        self.backbone = bb.requires_grad_(False)
        self.head = pkg.head()
        self.labels = list(pkg.meta.labels)

    def forward(self, batch: Any) -> torch.Tensor:
        return self.head(self.backbone(batch).float())


class _TextEntry(nn.Module):
    """Positional-argument entry point for ONNX (dict batches cannot be traced as inputs)."""

    def __init__(self, merged: MergedTask):
        super().__init__()
        self.merged = merged

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        return self.merged({"input_ids": input_ids, "attention_mask": attention_mask})


def merge_task(backbone: Backbone, package: str | os.PathLike | bytes | TaskPackage) -> MergedTask:
    """Validate ``package`` against ``backbone`` and return the merged single-task model."""
    pkg = package if isinstance(package, TaskPackage) else load_package(package, base=backbone.describe())
    return MergedTask(backbone, pkg).eval()


def _example(backbone: Backbone, pkg: TaskPackage) -> dict[str, torch.Tensor]:
    if backbone.kind == "text":
        enc = backbone.preprocess(["An example input.", "A second, somewhat longer example input text."],
                                  pkg.meta.preprocessing)
        return {"input_ids": enc["input_ids"], "attention_mask": enc["attention_mask"]}
    if backbone.kind == "image":
        size = (pkg.meta.preprocessing.get("timm_data_config") or backbone.data_config)["input_size"]
        return {"pixel_values": torch.randn(2, *size, generator=torch.Generator().manual_seed(0))}
    raise ValueError(f"ONNX export supports image and text backbones, not {backbone.kind!r}")


def onnx_metadata(pkg: TaskPackage, version: str | None) -> dict[str, str]:
    """``metadata_props`` of an exported task: what a runtime needs to feed it and read its output."""
    m = pkg.meta
    props = {"grft.task_id": m.task_id, "grft.labels": json.dumps(list(m.labels)),
             "grft.preprocessing": json.dumps(m.preprocessing), "grft.base_model_id": m.base_model_id,
             "grft.base_fingerprint": m.base_fingerprint, "grft.mode": m.mode,
             "grft.package_format_version": str(m.format_version)}
    if version is not None:
        props["grft.task_version"] = version
    return props


def export_onnx(backbone: Backbone, package: str | os.PathLike | bytes, out: str | os.PathLike,
                opset: int = 18, atol: float = 1e-4) -> dict:
    """Export ``package`` merged into ``backbone`` to ``out`` (ONNX, dynamic batch and sequence axes).

    The model's ``metadata_props`` carry the task's labels, preprocessing and version (the store's
    content version, :func:`grft_serve.store.content_version`). The file is checked with onnxruntime
    on an example batch, then published atomically with the default file mode (umask honoured);
    returns ``{"path", "inputs", "max_abs_diff", "labels", "metadata"}``. Raises ``RuntimeError`` if
    outputs differ by more than ``atol``.
    """
    import onnx
    import onnxruntime as ort

    version = None
    if not isinstance(package, TaskPackage):
        data = package if isinstance(package, bytes) else Path(package).read_bytes()
        version = content_version(data)
        pkg = load_package(data, base=backbone.describe())
    else:
        pkg = package
    merged = merge_task(backbone, pkg).cpu().float()
    ex = _example(backbone, pkg)
    module: nn.Module = _TextEntry(merged) if backbone.kind == "text" else merged
    names = list(ex)
    batch = torch.export.Dim("batch")
    tokens = torch.export.Dim("tokens")
    shapes = tuple({0: batch, 1: tokens} if backbone.kind == "text" else {0: batch} for _ in names)
    props = onnx_metadata(pkg, version)
    with tempfile.TemporaryDirectory(prefix="grft-onnx-") as tmpdir:
        tmp = str(Path(tmpdir) / "model.onnx")
        with torch.no_grad():
            torch.onnx.export(module, tuple(ex.values()), tmp, dynamo=True, input_names=names,
                              output_names=["logits"], dynamic_shapes=shapes, opset_version=opset,
                              external_data=False)
            want = module(*ex.values()).numpy()
        model = onnx.load(tmp)
        onnx.helper.set_model_props(model, props)
        blob = model.SerializeToString()
        sess = ort.InferenceSession(blob, providers=["CPUExecutionProvider"])
        got = sess.run(None, {n: t.numpy() for n, t in ex.items()})[0]
    diff = float(abs(got - want).max())
    if diff > atol:
        raise RuntimeError(f"ONNX output differs from PyTorch by {diff:.3g} (> {atol})")
    atomic_write(out, blob)
    return {"path": str(out), "inputs": names, "max_abs_diff": diff, "labels": merged.labels, "metadata": props}
