"""The ``timm`` backbone family: any timm model with its classifier removed (pooled features).

Loading never touches the network: weights come from a local file
(``pretrained_cfg_overlay=dict(file=...)``) or a checkpoint; ``weights: random`` asks for a
randomly initialised model on purpose. Inputs are resized/normalised by timm's eval transform for
the data config a task was trained with (``preprocessing["timm_data_config"]``).
"""
from __future__ import annotations

import json
import math
import os
from pathlib import Path
from typing import Any

import torch
from torch import nn

from .base import Backbone, BackboneError
from .registry import BackboneConfig, register_backbone

__all__ = ["RANDOM_WEIGHTS", "TimmBackbone"]


RANDOM_WEIGHTS = "random"


class TimmBackbone(Backbone):
    """A timm model with its classifier removed (``num_classes=0``): forward returns pooled features.

    Weights come from a local ``weights`` file or a ``checkpoint``; a randomly initialised model
    (tests, benchmarks) must be asked for with ``weights="random"`` — it is never a silent default."""

    kind = "image"

    def __init__(self, name: str, weights: str | os.PathLike | None = None,
                 checkpoint_path: str | os.PathLike | None = None, model_kwargs: dict | None = None,
                 model: nn.Module | None = None):
        super().__init__()
        import timm

        kwargs = dict(model_kwargs or {})
        if model is None:
            if weights is None and checkpoint_path is None:
                raise BackboneError(
                    f"timm backbone {name!r} has no weights: set `weights:` to a local weights file (or "
                    f"`checkpoint:`), or write `weights: {RANDOM_WEIGHTS}` to use a randomly initialised model")
            if str(weights) == RANDOM_WEIGHTS:
                weights = None
            elif weights is not None and not Path(weights).is_file():
                raise BackboneError(f"timm weights file not found: {weights}")
            if checkpoint_path is not None and not Path(checkpoint_path).is_file():
                raise BackboneError(f"timm checkpoint not found: {checkpoint_path}")
            try:
                if weights is not None:
                    model = timm.create_model(
                        name, pretrained=True, num_classes=0,
                        pretrained_cfg_overlay=dict(file=str(weights), custom_load=False), **kwargs)
                else:
                    model = timm.create_model(name, pretrained=False, num_classes=0,
                                              checkpoint_path=str(checkpoint_path or ""), **kwargs)
            except RuntimeError as e:  # unknown model names raise RuntimeError in timm
                raise BackboneError(f"cannot build timm model {name!r}: {e}") from e
        self.net = model
        self.name = name
        self.model_id = f"timm/{name}"
        self.feature_dim = int(model.num_features)
        self.data_config = timm.data.resolve_data_config({}, model=model)
        pe = getattr(model, "patch_embed", None)  # fixed-size ViTs built with a custom img_size
        if pe is not None and getattr(pe, "img_size", None) and not getattr(pe, "dynamic_img_size", False):
            self.data_config["input_size"] = (3, *pe.img_size)
        self._eval_tf = None
        self._task_tfs: dict[str, Any] = {}

    def forward(self, batch):
        return self.net(batch)

    def eval_transform(self, data_config: dict | None = None):
        import timm.data

        if data_config is not None:
            key = json.dumps(data_config, sort_keys=True, default=str)
            if key not in self._task_tfs:
                cfg = {k: tuple(v) if isinstance(v, list) else v for k, v in data_config.items()}
                self._task_tfs[key] = timm.data.create_transform(**cfg, is_training=False)
            return self._task_tfs[key]
        if self._eval_tf is None:
            self._eval_tf = timm.data.create_transform(**self.data_config, is_training=False)
        return self._eval_tf

    def preprocess(self, raw, preprocessing: dict | None = None):
        """Images → one batch. ``raw`` is iterated once, one image at a time: a lazy iterable that
        decodes each image when asked holds one full-size image at a time (the serving replica's)."""
        from PIL import Image

        tf = self.eval_transform((preprocessing or {}).get("timm_data_config"))
        out = []
        for r in raw:
            if isinstance(r, torch.Tensor):
                out.append(r)
                continue
            if not isinstance(r, Image.Image):
                raise TypeError(f"expected a PIL image or a tensor, got {type(r).__name__}")
            out.append(tf(r.convert("RGB")))
        return torch.stack(out)

    def min_decode_side(self, preprocessing: dict | None = None) -> int | None:
        """timm's eval transform resizes to ``floor(input_size / crop_pct)`` (the shortest side, or each
        side for ``squash``) before cropping: a decoded image needs no more than the larger of the two."""
        import timm.data

        dc = (preprocessing or {}).get("timm_data_config") or self.data_config
        crop = dc.get("crop_pct") or timm.data.DEFAULT_CROP_PCT
        return max(math.floor(int(x) / crop) for x in tuple(dc["input_size"])[-2:])

    def preprocessing_meta(self, input_size: int | None = None) -> dict:
        """The model's data config, or a square ``input_size`` one (resize, never crop: small images
        such as 28 px Fashion-MNIST are upscaled whole). The backbone itself is not changed: tasks
        pass what this returns to :meth:`preprocess` on every call."""
        dc = dict(self.data_config)
        if input_size is not None:
            dc.update(input_size=(3, int(input_size), int(input_size)), crop_pct=1.0)
        return {"kind": "image", "timm_data_config": {k: (list(v) if isinstance(v, tuple) else v)
                                                       for k, v in dc.items()}}


@register_backbone("timm")
def _create_timm(cfg: BackboneConfig) -> TimmBackbone:
    if not cfg.name:
        raise BackboneError("backbone type 'timm' needs a model name")
    return TimmBackbone(cfg.name, weights=cfg.weights, checkpoint_path=cfg.checkpoint,
                        model_kwargs=cfg.model_kwargs)
