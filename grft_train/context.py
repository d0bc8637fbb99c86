"""The run context: what select, fit, eval and sweep share, built once per run.

A :class:`RunContext` holds the device, the frozen backbone, its :class:`~grft_serve.core.spec.BaseSpec`
(``describe()`` hashes every weight: done once here, never per command step), the data splits, the
task's preprocessing, the :class:`~grft_train.objective.Objective` (classification or causal LM) and
the backbone's parameter count. ``run_select`` / ``run_fit`` / ``run_eval`` take one (``sweep`` and
``bench/accuracy.py`` build one and pass it to every run); without one they build their own from
their config. The backbone inside is never modified: tasks only live in the hooks and packages.
"""
from __future__ import annotations

import logging
from dataclasses import dataclass, field
from typing import Any

import torch

from grft_serve.core.backbones import Backbone
from grft_serve.core.spec import BaseSpec, iter_patchable

from .causal import CausalLMObjective
from .common import apply_threads, build_backbone, count_params, is_head, load_data, resolve_device, task_preprocessing
from .data import DataSplits
from .gendata import load_examples
from .objective import ClassificationObjective, Objective, resolve_objective
from .summary import generation_summary

__all__ = ["RunContext", "load_run_data", "used_modules"]

log = logging.getLogger("grft_train")
OBJECTIVES: dict[str, type[Objective]] = {"classification": ClassificationObjective, "causal_lm": CausalLMObjective}


def load_run_data(cfg, backbone: Backbone | None = None, summary: bool = True) -> DataSplits:
    """The run's splits: generation examples for ``objective: causal_lm`` (explicit, or ``auto`` on a
    causal LM), labelled samples otherwise; the dataset summary is logged."""
    if resolve_objective(cfg, backbone) != "causal_lm":
        return load_data(cfg, backbone, summary)
    splits = load_examples(cfg.data)
    if summary:
        log.info("dataset\n%s", generation_summary(splits, backbone, task_preprocessing(backbone, cfg)
                                                    if backbone is not None else None))
    return splits


@torch.no_grad()
def used_modules(backbone: Backbone, batch) -> list[str]:
    """Patchable modules (heads excluded) that a forward of ``batch`` runs, in definition order.

    Modules the forward never reaches (an unused BERT pooler) get no bias: a parameter there would
    be counted as trainable and stored without ever changing an output."""
    mods = [(n, m) for n, m in iter_patchable(backbone, backbone.exclude_from_patching()) if not is_head(n)]
    ran: set[str] = set()
    handles = [m.register_forward_hook(lambda mod, i, o, n=n: ran.add(n)) for n, m in mods]
    try:
        backbone(batch)
    finally:
        for h in handles:
            h.remove()
    return [n for n, _ in mods if n in ran]


@dataclass
class RunContext:
    """Device, backbone, spec, splits, preprocessing and objective of one run (see the module docstring)."""

    device: torch.device
    backbone: Backbone
    spec: BaseSpec
    splits: DataSplits
    preprocessing: dict
    objective: Objective
    total_params: int
    _used: list[str] | None = field(default=None, repr=False)

    @classmethod
    def build(cls, cfg: Any, backbone: Backbone | None = None, splits: DataSplits | None = None,
              summary: bool = True) -> "RunContext":
        """From a select/fit/eval config: the backbone and splits are built unless given."""
        apply_threads(cfg)
        device = resolve_device(cfg.device)
        if backbone is None:
            backbone = build_backbone(cfg, device)
        name = resolve_objective(cfg, backbone)
        if splits is None:
            splits = load_run_data(cfg, backbone, summary)
        prep = task_preprocessing(backbone, cfg)
        objective = OBJECTIVES[name](backbone, splits, prep, cfg)
        return cls(device, backbone, backbone.describe(), splits, prep, objective, count_params(backbone))

    @property
    def used(self) -> list[str]:
        """The patchable modules a forward of this task's data runs (computed once)."""
        if self._used is None:
            self._used = used_modules(self.backbone, self.objective.probe())
        return self._used

    @property
    def labels(self) -> list[str]:
        return self.objective.labels
