"""Backbones: a frozen pretrained feature extractor plus the preprocessing that feeds it.

A :class:`Backbone` maps a *batch* (an image tensor, or a dict of token tensors) to pooled features
``[B, D]``. Task heads (``D -> classes``) live in task packages, not in the backbone. The same
classes are used by ``grft_train`` (selection, fitting) and ``grft_serve`` (engine), so a package
trained on a backbone serves on the identical module tree.

Loading never touches the network: timm weights come from a local file
(``pretrained_cfg_overlay=dict(file=...)``), transformers weights from a local directory.
"""
from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any, Literal, Sequence

import torch
from pydantic import BaseModel, ConfigDict
from torch import nn

from .base import BaseSpec, describe_base


class BackboneError(ValueError):
    """A backbone could not be built from its configuration (missing file, unknown name, ...)."""


class Backbone(nn.Module):
    """Base class. Subclasses set ``kind``, ``model_id``, ``feature_dim`` and implement the methods."""

    kind: str = "tensor"  # "image" | "text" | "tensor"
    model_id: str = "module"
    feature_dim: int = 0

    # -- batches -------------------------------------------------------------------------------
    def preprocess(self, raw: Sequence[Any], preprocessing: dict | None = None) -> Any:
        """Turn raw inputs (PIL images, strings, tensors) into a batch for :meth:`forward`.

        ``preprocessing`` is a task package's ``preprocessing`` metadata: inputs are prepared exactly
        as they were in training (e.g. the input resolution a task was trained at)."""
        return torch.stack([torch.as_tensor(r) for r in raw])

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

    def preprocessing_meta(self) -> dict:
        return {"kind": self.kind}

    def describe(self, fingerprint: str | None = None) -> BaseSpec:
        return describe_base(self, self.model_id, self.feature_dim, self.exclude_from_patching(),
                             fingerprint=fingerprint)


class ModuleBackbone(Backbone):
    """Any ``nn.Module`` mapping a tensor batch to ``[B, D]`` features (e.g. an MLP of nn.Linear)."""

    def __init__(self, module: nn.Module, model_id: str, feature_dim: int):
        super().__init__()
        self.net = module
        self.model_id = model_id
        self.feature_dim = feature_dim

    def forward(self, batch):
        return self.net(batch)


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

    def set_input_size(self, size: int | None) -> None:
        """Use a square ``size`` input instead of the model's default (resize, never crop: small
        images such as 28 px Fashion-MNIST are upscaled whole). Recorded by ``preprocessing_meta``."""
        if size is None:
            return
        self.data_config = {**self.data_config, "input_size": (3, int(size), int(size)), "crop_pct": 1.0}
        self._eval_tf = None

    def use_preprocessing(self, preprocessing: dict | None) -> None:
        """Make the default transform the one a task package was trained with."""
        dc = (preprocessing or {}).get("timm_data_config")
        if dc:
            self.data_config = {k: tuple(v) if isinstance(v, list) else v for k, v in dc.items()}
            self._eval_tf = None

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

    def preprocessing_meta(self) -> dict:
        cfg = {k: (list(v) if isinstance(v, tuple) else v) for k, v in self.data_config.items()}
        return {"kind": "image", "timm_data_config": cfg}


class HFTextBackbone(Backbone):
    """A transformers encoder/decoder body (BERT, LLaMA, ...) with mean or last-token pooling."""

    kind = "text"

    def __init__(self, path: str | os.PathLike | None, pooling: Literal["mean", "last"] = "mean",
                 max_length: int = 128, model_id: str | None = None, model: nn.Module | None = None,
                 tokenizer: Any = None, torch_dtype: torch.dtype = torch.float32):
        super().__init__()
        from transformers import AutoModel, AutoTokenizer

        if model is None:
            if not Path(path).is_dir():
                raise BackboneError(f"transformers model directory not found: {path}")
            model = AutoModel.from_pretrained(str(path), dtype=torch_dtype)
        if tokenizer is None and path is not None:
            tokenizer = AutoTokenizer.from_pretrained(str(path))
        if tokenizer is not None:
            if tokenizer.pad_token is None:  # LLaMA tokenizers ship without a pad token
                tokenizer.pad_token = tokenizer.eos_token
            tokenizer.padding_side = "right"
        self.net = model
        self.tokenizer = tokenizer
        self.pooling = pooling
        self.max_length = max_length
        self.model_id = model_id or f"hf/{Path(str(path)).name if path else type(model).__name__}"
        self.feature_dim = int(model.config.hidden_size)

    def exclude_from_patching(self) -> tuple[str, ...]:
        # A causal-LM head would never run in a classification forward; bodies have none.
        return tuple(n for n in ("net.lm_head",) if _has_module(self, n))

    def check_preprocessing(self, preprocessing: dict) -> str | None:
        why = super().check_preprocessing(preprocessing)
        pooling = (preprocessing or {}).get("pooling")
        if why is None and pooling is not None and pooling != self.pooling:
            why = f"task was trained with {pooling} pooling; backbone {self.model_id} pools by {self.pooling}"
        return why

    def preprocess(self, raw, preprocessing: dict | None = None):
        if self.tokenizer is None:
            raise BackboneError(f"backbone {self.model_id} has no tokenizer; pass token batches")
        texts = []
        for r in raw:
            if not isinstance(r, str):
                raise TypeError(f"expected a string, got {type(r).__name__}")
            texts.append(r)
        max_length = int((preprocessing or {}).get("max_length") or self.max_length)
        enc = self.tokenizer(texts, padding=True, truncation=True, max_length=max_length,
                             return_tensors="pt")
        return {"input_ids": enc["input_ids"], "attention_mask": enc["attention_mask"]}

    def count_tokens(self, text: str) -> int:
        return len(self.tokenizer(text, truncation=False)["input_ids"])

    def forward(self, batch):
        mask = batch["attention_mask"]
        hidden = self.net(input_ids=batch["input_ids"], attention_mask=mask).last_hidden_state
        if self.pooling == "last":
            last = mask.sum(dim=1).clamp(min=1) - 1
            return hidden[torch.arange(hidden.shape[0], device=hidden.device), last]
        m = mask.unsqueeze(-1).to(hidden.dtype)
        return (hidden * m).sum(1) / m.sum(1).clamp(min=1e-6)

    def preprocessing_meta(self) -> dict:
        return {"kind": "text", "pooling": self.pooling, "max_length": self.max_length}


def _has_module(root: nn.Module, dotted: str) -> bool:
    try:
        root.get_submodule(dotted)
        return True
    except AttributeError:
        return False


class BackboneConfig(BaseModel):
    """How to build a backbone. ``type``:

    - ``timm``: ``name`` (any timm model) and ``weights`` (a local file; ``random`` for a randomly
      initialised model, on purpose) or ``checkpoint``;
    - ``hf``: ``path`` (local transformers directory), ``pooling`` (mean|last), ``max_length``;
    - ``zoo``: ``name`` of a real pretrained backbone that ships offline in a package
      (``efficientnet_lite0``, ``minilm``, ``smollm2``), see :mod:`grft_serve.zoo`.
    """

    model_config = ConfigDict(extra="forbid")

    type: Literal["timm", "hf", "zoo"] = "timm"
    name: str | None = None
    weights: str | None = None
    checkpoint: str | None = None
    path: str | None = None
    pooling: Literal["mean", "last"] = "mean"
    max_length: int = 128
    model_kwargs: dict = {}


def load_backbone(cfg: BackboneConfig | dict) -> Backbone:
    """Build a backbone from a :class:`BackboneConfig` (or a dict of its fields)."""
    if isinstance(cfg, dict):
        cfg = BackboneConfig(**cfg)
    if cfg.type == "timm":
        if not cfg.name:
            raise BackboneError("backbone type 'timm' needs a model name")
        return TimmBackbone(cfg.name, weights=cfg.weights, checkpoint_path=cfg.checkpoint,
                            model_kwargs=cfg.model_kwargs)
    if cfg.type == "hf":
        if not cfg.path:
            raise BackboneError("backbone type 'hf' needs a local model path")
        return HFTextBackbone(cfg.path, pooling=cfg.pooling, max_length=cfg.max_length)
    from . import zoo

    if not cfg.name:
        raise BackboneError("backbone type 'zoo' needs a name")
    return zoo.load(cfg.name, max_length=cfg.max_length)
