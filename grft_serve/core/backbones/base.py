"""Backbone base classes: a frozen pretrained feature extractor plus the preprocessing that feeds it.

A :class:`Backbone` maps a *batch* (an image tensor, or a dict of token tensors) to pooled features
``[B, D]`` (``D = feature_dim``). Task heads (``D -> classes``) live in task packages, not in the
backbone. The same classes are used by ``grft_train`` (selection, fitting) and ``grft_serve``
(engine), so a package trained on a backbone serves on the identical module tree.
"""
from __future__ import annotations

from typing import Any, Sequence

import torch
from torch import nn

from ..spec import BaseSpec, describe_base

__all__ = ["Backbone", "BackboneError", "ModuleBackbone"]


class BackboneError(ValueError):
    """A backbone could not be built from its configuration (missing file, unknown name, ...)."""


class Backbone(nn.Module):
    """Base class. Subclasses set ``kind``, ``model_id``, ``feature_dim`` and implement the methods."""

    kind: str = "tensor"  # "image" | "text" | "tensor": what its inputs are
    task_kind: str = "classification"  # "classification" | "generation": what its task packages are
    model_id: str = "module"
    feature_dim: int = 0

    # -- batches -------------------------------------------------------------------------------
    def preprocess(self, raw: Sequence[Any], preprocessing: dict | None = None) -> Any:
        """Turn raw inputs (PIL images, strings, tensors) into a batch for :meth:`forward`.

        ``preprocessing`` is a task package's ``preprocessing`` metadata: inputs are prepared exactly
        as they were in training (e.g. the input resolution a task was trained at)."""
        return torch.stack([torch.as_tensor(r) for r in raw])

    def min_decode_side(self, preprocessing: dict | None = None) -> int | None:
        """The shortest side a decoded image needs for :meth:`preprocess` under ``preprocessing``, so a
        decoder may reduce a larger one to it (JPEG draft); None: no reduction (non-image backbones)."""
        return None

    def check_preprocessing(self, preprocessing: dict) -> str | None:
        """Why a task trained with ``preprocessing`` cannot be served on this backbone (None: it can)."""
        kind = (preprocessing or {}).get("kind")
        if kind is not None and kind != self.kind:
            return f"task expects {kind} inputs; backbone {self.model_id} takes {self.kind} inputs"
        return None

    @staticmethod
    def batch_len(batch: Any) -> int:
        if isinstance(batch, dict):
            return next(iter(batch.values())).shape[0]
        return batch.shape[0]

    @staticmethod
    def batch_to(batch: Any, device, dtype=None) -> Any:
        def mv(t: torch.Tensor):
            if dtype is not None and t.is_floating_point():
                return t.to(device=device, dtype=dtype, non_blocking=True)
            return t.to(device=device, non_blocking=True)
        if isinstance(batch, dict):
            return {k: mv(v) for k, v in batch.items()}
        return mv(batch)

    @staticmethod
    def batch_select(batch: Any, index: torch.Tensor) -> Any:
        if isinstance(batch, dict):
            return {k: v.index_select(0, index.to(v.device)) for k, v in batch.items()}
        return batch.index_select(0, index.to(batch.device))

    # -- description ---------------------------------------------------------------------------
    def exclude_from_patching(self) -> tuple[str, ...]:
        """Module names (prefixes) never selected nor patched (e.g. an unused LM head)."""
        return ()

    def preprocessing_meta(self, input_size: int | None = None) -> dict:
        """What a task trained on this backbone records as its ``preprocessing`` (and passes to
        :meth:`preprocess`). ``input_size`` (a square resolution) only means something to image
        backbones with a data config; others ignore it."""
        return {"kind": self.kind}

    def describe(self, fingerprint: str | None = None) -> BaseSpec:
        return describe_base(self, self.model_id, self.feature_dim, self.exclude_from_patching(),
                             fingerprint=fingerprint, task_kind=self.task_kind)


class ModuleBackbone(Backbone):
    """Any ``nn.Module`` mapping a tensor batch to ``[B, D]`` features (e.g. an MLP of nn.Linear)."""

    def __init__(self, module: nn.Module, model_id: str, feature_dim: int):
        super().__init__()
        self.net = module
        self.model_id = model_id
        self.feature_dim = feature_dim

    def forward(self, batch):
        return self.net(batch)

