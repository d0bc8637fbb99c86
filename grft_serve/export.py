"""Merge one task into a standalone model, and export it to ONNX.

For deployments that serve a single task without the engine (an edge box, another runtime): the
task's rows/columns/biases are written into a copy of the base and its head is attached, so the
result is an ordinary model whose logits equal the engine's for that task. ``export_onnx`` writes it
atomically and checks it with onnxruntime against PyTorch before returning.
"""
from __future__ import annotations

import copy
import os
import tempfile
from pathlib import Path
from typing import Any

import torch
from torch import nn

from .backbones import Backbone
from .package import TaskPackage, load_package
from .rowop import ROW


class MergedTask(nn.Module):
    """``head(backbone_with_task_weights(batch))``: one task, no hooks, no engine."""

    def __init__(self, backbone: Backbone, pkg: TaskPackage):
        super().__init__()
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
        self.head = nn.Linear(pkg.head_weight.shape[1], pkg.head_weight.shape[0])
        with torch.no_grad():
            self.head.weight.copy_(pkg.head_weight.float())
            self.head.bias.copy_(pkg.head_bias.float())
        self.head.requires_grad_(False)
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


def export_onnx(backbone: Backbone, package: str | os.PathLike | bytes, out: str | os.PathLike,
                opset: int = 18, atol: float = 1e-4) -> dict:
    """Export ``package`` merged into ``backbone`` to ``out`` (ONNX, dynamic batch and sequence axes).

    The file is checked with onnxruntime on an example batch before it is moved into place; returns
    ``{"path", "inputs", "max_abs_diff", "labels"}``. Raises ``RuntimeError`` if outputs differ by more
    than ``atol``.
    """
    import onnxruntime as ort

    pkg = package if isinstance(package, TaskPackage) else load_package(package, base=backbone.describe())
    merged = merge_task(backbone, pkg).cpu().float()
    ex = _example(backbone, pkg)
    module: nn.Module = _TextEntry(merged) if backbone.kind == "text" else merged
    names = list(ex)
    batch = torch.export.Dim("batch")
    tokens = torch.export.Dim("tokens")
    shapes = tuple({0: batch, 1: tokens} if backbone.kind == "text" else {0: batch} for _ in names)
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{out.name}.", suffix=".tmp", dir=out.parent)
    os.close(fd)
    try:
        with torch.no_grad():
            torch.onnx.export(module, tuple(ex.values()), tmp, dynamo=True, input_names=names,
                              output_names=["logits"], dynamic_shapes=shapes, opset_version=opset,
                              external_data=False)
            want = module(*ex.values()).numpy()
        sess = ort.InferenceSession(tmp, providers=["CPUExecutionProvider"])
        got = sess.run(None, {n: t.numpy() for n, t in ex.items()})[0]
        diff = float(abs(got - want).max())
        if diff > atol:
            raise RuntimeError(f"ONNX output differs from PyTorch by {diff:.3g} (> {atol})")
        os.replace(tmp, out)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return {"path": str(out), "inputs": names, "max_abs_diff": diff, "labels": merged.labels}
