"""Splits ready for training loops: preprocessed batches, frozen features, and evaluation.

:class:`Prepared` preprocesses an image split once (unless it is augmented on the fly) and batches
text raw (tokenised per batch, padded to the batch's longest input); :class:`FeatureSet` holds a
split's frozen backbone features, computed once, for head-only training (a linear probe);
:func:`evaluate_prepared` gives loss and accuracy of a model on either.
"""
from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from grft_serve.backbones import Backbone

from .common import autocast_ctx
from .data import SampleSet

__all__ = ["FeatureSet", "Prepared", "evaluate_prepared", "train_augment"]


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


def train_augment(backbone: Backbone):
    from torchvision import transforms as T

    dc = backbone.data_config
    size = (int(dc["input_size"][-2]), int(dc["input_size"][-1]))
    return T.Compose([T.RandomResizedCrop(size, scale=(0.5, 1.0), antialias=True), T.RandomHorizontalFlip(),
                      T.ToTensor(), T.Normalize(dc["mean"], dc["std"])])


class FeatureSet:
    """Frozen backbone features of a split, computed once (the linear probe trains its head on them)."""

    def __init__(self, x: torch.Tensor, y: torch.Tensor):
        self.x, self.y = x, y

    @classmethod
    @torch.no_grad()
    def compute(cls, data: Prepared, backbone: Backbone, device: torch.device, bs: int, bf16: bool) -> "FeatureSet":
        parts = []
        for batch, _ in data.batches(bs):
            with autocast_ctx(device, bf16):
                parts.append(backbone(backbone.batch_to(batch, device)).float())
        x = torch.cat(parts) if parts else torch.zeros(0, backbone.feature_dim, device=device)
        return cls(x, data.y)

    def __len__(self) -> int:
        return len(self.y)

    def batches(self, bs: int, shuffle: bool = False, rng: np.random.Generator | None = None):
        order = rng.permutation(len(self)) if shuffle else np.arange(len(self))
        for s in range(0, len(order), bs):
            idx = torch.as_tensor(order[s:s + bs])
            yield self.x[idx.to(self.x.device)], self.y[idx]


@torch.no_grad()
def evaluate_prepared(model: nn.Module, data: "Prepared | FeatureSet", device: torch.device, bs: int,
                      bf16: bool = True, return_logits: bool = False):
    """Loss and accuracy of ``model`` (a :class:`TaskModel`, or a head on a :class:`FeatureSet`)."""
    model.eval()
    tot_loss, correct, n = 0.0, 0, 0
    all_logits = []
    for batch, y in data.batches(bs):
        batch = Backbone.batch_to(batch, device)
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
