"""Helpers to build synthetic task packages and reference outputs (tests and benchmarks).

``random_package`` picks random rows/columns of every patchable module and perturbs them, like a
trained task would; ``reference_forward`` applies a package the slow, obvious way (a deep copy of the
model with the weights edited in place) to check the engine's two paths against.
"""
from __future__ import annotations

import torch
from torch import nn

from .core.backbones import Backbone
from .core.package import PackageMeta, TaskPackage
from .core.rowop import COLUMN, ROW, ModuleDelta
from .core.spec import iter_patchable

__all__ = ["random_package", "reference_forward"]


def random_package(backbone: Backbone, task_id: str, *, mode: str = ROW, k: int = 2, n_labels: int = 3,
                   tune_bias: bool = False, seed: int = 0, scale: float = 0.5, fingerprint: str | None = None,
                   modules: list[str] | None = None, dtype: torch.dtype = torch.float32,
                   preprocessing: dict | None = None) -> TaskPackage:
    """A package for ``backbone`` with ``k`` random rows (or columns) per patchable module, recording
    ``preprocessing`` (default: the backbone's own, ``backbone.preprocessing_meta()``)."""
    g = torch.Generator().manual_seed(seed)
    spec = backbone.describe(fingerprint=fingerprint)
    mods = dict(iter_patchable(backbone, backbone.exclude_from_patching()))
    deltas = {}
    for name, s in spec.modules.items():
        if modules is not None and name not in modules:
            continue
        if mode == COLUMN and not s.supports_columns():
            continue
        w = mods[name].weight.detach().float().cpu()
        n = s.n_slices(mode)
        kk = min(k, n)
        idx = torch.randperm(n, generator=g)[:kk].sort().values
        base = w.index_select(0 if mode == ROW else 1, idx)
        vals = base + scale * base.std().clamp(min=1e-3) * torch.randn(base.shape, generator=g)
        bias = None
        if tune_bias and s.has_bias:
            b = mods[name].bias.detach().float().cpu()
            bias = b + 0.1 * torch.randn(b.shape, generator=g)
        deltas[name] = ModuleDelta(mode, idx, vals.to(dtype), None if bias is None else bias.to(dtype))
    meta = PackageMeta(task_id=task_id, base_model_id=spec.model_id, base_fingerprint=spec.fingerprint,
                       mode=mode, k=k, labels=[f"{task_id}-c{i}" for i in range(n_labels)],
                       preprocessing=backbone.preprocessing_meta() if preprocessing is None else preprocessing)
    hw = torch.randn((n_labels, spec.feature_dim), generator=g) / spec.feature_dim ** 0.5
    hb = torch.randn((n_labels,), generator=g) * 0.1
    return TaskPackage(meta, deltas, hw.to(dtype), hb.to(dtype))


@torch.no_grad()
def reference_forward(backbone: nn.Module, pkg: TaskPackage, batch) -> torch.Tensor:
    """Logits of ``pkg`` computed on a copy of ``backbone`` with the weights edited directly."""
    from .export import MergedTask

    return MergedTask(backbone, pkg)(batch)
