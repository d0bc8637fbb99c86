"""Splits ready for training loops: frozen features, augmentation, and evaluation.

Batches of a split come from :class:`grft_train.loader.Batches` (streamed through DataLoader
workers, nothing preprocessed up front); :class:`FeatureSet` holds a
split's frozen backbone features, computed once, for head-only training (a linear probe);
:func:`evaluate_prepared` gives loss and accuracy of a model on either.
"""
from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from grft_serve.core.backbones import Backbone

from .common import autocast_ctx
from .loader import Batches

__all__ = ["FeatureSet", "evaluate_prepared", "train_augment"]


def train_augment(preprocessing: dict):
    """Training augmentation at the input size and normalisation of an image task's preprocessing."""
    from torchvision import transforms as T

    dc = preprocessing["timm_data_config"]
    size = (int(dc["input_size"][-2]), int(dc["input_size"][-1]))
    return T.Compose([T.RandomResizedCrop(size, scale=(0.5, 1.0), antialias=True), T.RandomHorizontalFlip(),
                      T.ToTensor(), T.Normalize(dc["mean"], dc["std"])])


class FeatureSet:
    """Frozen backbone features of a split, computed once (the linear probe trains its head on them)."""

    def __init__(self, x: torch.Tensor, y: torch.Tensor):
        self.x, self.y = x, y

    @classmethod
    @torch.no_grad()
    def compute(cls, data: Batches, backbone: Backbone, device: torch.device, bs: int, bf16: bool) -> "FeatureSet":
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
def evaluate_prepared(model: nn.Module, data: "Batches | FeatureSet", device: torch.device, bs: int,
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
