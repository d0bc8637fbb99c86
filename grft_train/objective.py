"""The training objective of a run: what select scores rows by, what fit minimises, what a package is.

GRFT's selection theorem (the rows/columns with the largest sum of squared gradients give the
largest first-order decrease of the loss) holds for any loss, so select, fit and eval run one loop
each and ask the run's :class:`Objective` for the parts that depend on the task:

============================  ====================================  =====================================
                              ``classification``                    ``causal_lm`` (:mod:`grft_train.causal`)
============================  ====================================  =====================================
selection loss                SCL of two views per input            cross-entropy of the answer tokens
                              (:mod:`grft_train.scl`)               (prompt tokens carry no loss)
training loss                 CE of a new head                      the same answer-token CE (no head:
                                                                    the base's own ``lm_head``)
model choice on val           (accuracy, −loss)                     −loss
package                       ``kind: classification``, labels,     ``kind: generation``, prompt format
                              head                                  and answer defaults, no head
============================  ====================================  =====================================

Everything else — eligible modules, top-k, the row op, biases, L2 to pretrained, Adam with warm-up
and cosine decay — is shared. ``objective: auto`` picks ``causal_lm`` for a causal-LM backbone
(its ``task_kind`` is ``generation``) and ``classification`` otherwise.
"""
from __future__ import annotations

from typing import Any, Iterator

import numpy as np
import torch
import torch.nn.functional as F

from grft_serve.core.backbones import Backbone

from .common import autocast_ctx, iter_batches
from .data import DataSplits, SampleSet
from .loader import Batches
from .prepared import evaluate_prepared, train_augment
from .scl import SCLViews, supcon_loss
from .sources import DataError

__all__ = ["ClassificationObjective", "Objective", "ObjectiveError", "resolve_objective", "stratified_subsets",
           "target_device"]


class ObjectiveError(DataError):
    """The objective does not fit the backbone or the data (e.g. causal_lm on an image backbone)."""


def resolve_objective(cfg, backbone: Backbone | None) -> str:
    """``classification`` or ``causal_lm`` for ``cfg.objective`` (``auto`` follows the backbone)."""
    want = getattr(cfg, "objective", "auto")
    kind = getattr(backbone, "task_kind", "classification") if backbone is not None else None
    if want == "auto":
        return "causal_lm" if kind == "generation" else "classification"
    if backbone is not None and want == "causal_lm" and kind != "generation":
        raise ObjectiveError(f"objective causal_lm needs a causal-LM backbone (type causal_lm, or zoo smollm2_lm); "
                             f"{backbone.model_id} is a {kind} backbone")
    if backbone is not None and want == "classification" and kind == "generation":
        raise ObjectiveError(f"{backbone.model_id} is a causal LM (generation tasks): use objective causal_lm, or "
                             "its classification body (e.g. zoo smollm2)")
    return want


class Objective:
    """The task-dependent parts of select / fit / eval (see the module docstring)."""

    name = "objective"
    kind = "classification"  # the package kind it writes

    def __init__(self, backbone: Backbone, splits: DataSplits, preprocessing: dict, cfg):
        """``cfg``: the run's config (its shared keys: ``generation`` for causal_lm)."""
        self.backbone, self.splits, self.preprocessing = backbone, splits, preprocessing

    @property
    def labels(self) -> list[str]:
        return list(self.splits.labels)

    # -- fit / eval -------------------------------------------------------------------------
    def data(self, split: str, augment: bool = False):
        """A split ready for the loop: ``len()`` and ``batches(bs, shuffle, rng)`` of (model batch, target)."""
        raise NotImplementedError

    def probe(self) -> Any:
        """One model batch (on the backbone's device) for :func:`grft_train.fit.used_modules`."""
        raise NotImplementedError

    def batch_loss(self, model, batch, target, bf16: bool = False) -> tuple[torch.Tensor, int, int]:
        """(mean loss, items it averages over, items predicted right) of one batch (``bf16``: autocast
        on CUDA)."""
        raise NotImplementedError

    def evaluate(self, model, data, batch_size: int, bf16: bool = False) -> dict:
        """``{"loss", "acc", "n", ...}`` of ``model`` on a split's data."""
        raise NotImplementedError

    def score(self, res: dict) -> tuple:
        """How a validation result ranks (higher is better)."""
        return (res["acc"], -res["loss"])

    # -- select -----------------------------------------------------------------------------
    def grad_batches(self, ds, batch_size: int, rng: np.random.Generator) -> Iterator:
        raise NotImplementedError

    def grad_loss(self, item, device: torch.device, cfg) -> tuple[torch.Tensor, int]:
        """(selection loss with a graph to the frozen weights, samples) of one selection batch
        (``cfg``: the select config)."""
        raise NotImplementedError

    def subsets(self, ds, n: int, seed: int) -> list:
        """``n`` disjoint subsets of ``ds`` (random; classification stratifies by class)."""
        if n <= 1:
            return [ds]
        order = np.random.default_rng(seed + 7919).permutation(len(ds))
        parts = [sorted(int(i) for i in p) for p in np.array_split(order, n)]
        if any(not p for p in parts):
            raise DataError(f"cannot split {len(ds)} training samples into {n} non-empty subsets")
        return [ds.subset(p) for p in parts]

    def grad_info(self) -> dict:
        return {"objective": self.name}

    # -- package ----------------------------------------------------------------------------
    def package_fields(self) -> dict:
        """``PackageMeta`` fields the objective decides (kind, labels, generation)."""
        return {"kind": self.kind, "labels": self.labels}

    def final_metrics(self, model, split: str, batch_size: int) -> dict:
        """Extra metrics of the kept model on a split (beyond loss/accuracy)."""
        return {}


class ClassificationObjective(Objective):
    """SCL selection, CE of a new head (the GRFT paper's setting)."""

    name = "classification"

    def __init__(self, backbone, splits, preprocessing, cfg):
        super().__init__(backbone, splits, preprocessing, cfg)
        if splits.kind == "generation":
            raise ObjectiveError("prompt/completion data trains a generation task: use a causal-LM backbone "
                                 "(objective causal_lm)")
        self._views: SCLViews | None = None

    @property
    def views(self) -> SCLViews:
        if self._views is None:  # one per run: every subset loss and gradient pass shares it
            self._views = SCLViews(self.backbone, preprocessing=self.preprocessing)
        return self._views

    def data(self, split: str, augment: bool = False) -> Batches:
        aug = train_augment(self.preprocessing) if augment and "timm_data_config" in self.preprocessing else None
        return Batches(self.splits.split(split), self.backbone, aug, preprocessing=self.preprocessing)

    def probe(self):
        bb = self.backbone
        dev = next(bb.parameters()).device
        return bb.batch_to(bb.preprocess([self.splits.train[0][0]], self.preprocessing), dev)

    def batch_loss(self, model, batch, target, bf16=False):
        with autocast_ctx(target.device, bf16):
            logits = model(batch)
        return F.cross_entropy(logits.float(), target), len(target), int((logits.argmax(1) == target).sum())

    def evaluate(self, model, data, batch_size, bf16=False):
        return evaluate_prepared(model, data, target_device(self.backbone), batch_size, bf16)

    def grad_batches(self, ds: SampleSet, batch_size, rng):
        return iter_batches(ds, batch_size, shuffle=True, generator=rng)

    def grad_loss(self, item, device, cfg):
        raws, y = item
        return supcon_loss(self.views.features(raws, device), y.to(device), cfg.temperature), len(raws)

    def subsets(self, ds: SampleSet, n, seed):
        return stratified_subsets(ds, n, seed)

    def grad_info(self):
        return {"objective": self.name, "loss": "scl", "views": self.views.method}


def stratified_subsets(ds: SampleSet, n: int, seed: int) -> list[SampleSet]:
    """``ds`` split into n disjoint, class-stratified subsets (deterministic for ``seed``)."""
    if n <= 1:
        return [ds]
    rng = np.random.default_rng(seed + 7919)
    t = np.asarray(ds.targets)
    parts: list[list[int]] = [[] for _ in range(n)]
    for c in np.unique(t):
        idx = np.flatnonzero(t == c)
        idx = idx[rng.permutation(len(idx))]
        for j, chunk in enumerate(np.array_split(idx, n)):
            parts[(j + int(c)) % n].extend(int(i) for i in chunk)
    if any(len(p) == 0 for p in parts):
        raise DataError(f"cannot split {len(ds)} training samples into {n} non-empty subsets")
    return [ds.subset(sorted(p)) for p in parts]


def target_device(backbone: Backbone) -> torch.device:
    p = next(backbone.parameters(), None)
    return p.device if p is not None else torch.device("cpu")
