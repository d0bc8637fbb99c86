"""Synthetic task packages for the engine benchmark (row values do not change the timings)."""
from __future__ import annotations

import torch

from grft_serve.core.package import TaskPackage
from grft_serve.core.rowop import ModuleDelta
from grft_serve.engine import Engine
from grft_serve.testing import random_package

__all__ = ["make_packages", "variant"]


def variant(first: TaskPackage, engine: Engine, task_id: str, g: torch.Generator) -> TaskPackage:
    """A package with ``first``'s structure (modules, mode, k, head shape), fresh random rows/values."""
    deltas = {}
    for name, d in first.deltas.items():
        n_rows = engine.spec.modules[name].n_slices(d.mode)
        idx = torch.randperm(n_rows, generator=g)[: d.k].sort().values
        vals = d.values + 0.01 * d.values.std() * torch.randn(d.values.shape, generator=g)
        deltas[name] = ModuleDelta(d.mode, idx, vals, d.bias)
    n_labels = first.head_weight.shape[0]
    meta = first.meta.model_copy(update={"task_id": task_id, "labels": [f"{task_id}-c{j}" for j in range(n_labels)]})
    hw = torch.randn(first.head_weight.shape, generator=g) / first.head_weight.shape[1] ** 0.5
    hb = torch.randn(first.head_bias.shape, generator=g) * 0.1
    return TaskPackage(meta, deltas, hw, hb)


def make_packages(engine: Engine, n: int, k: int, n_labels: int = 10, seed: int = 0,
                  prefix: str = "t") -> list[TaskPackage]:
    """``n`` task packages ``<prefix>0..`` with ``k`` random rows per patchable module.

    The first comes from :func:`grft_serve.testing.random_package`; the others are :func:`variant`s
    of it (random_package reads every full weight, which takes seconds per task on a 1B model)."""
    first = random_package(engine.backbone, f"{prefix}0", k=k, n_labels=n_labels, seed=seed,
                           fingerprint=engine.spec.fingerprint)
    return [first] + [variant(first, engine, f"{prefix}{i}", torch.Generator().manual_seed(seed + 1000 + i))
                      for i in range(1, n)]
