"""The ``hf`` backbone family: a transformers encoder/decoder body from a local directory.

Features are the mean of the last hidden states over real tokens (``pooling: mean``,
``f = sum_t m_t h_t / sum_t m_t``) or the hidden state of the last real token (``pooling: last``).
"""
from __future__ import annotations

import logging
import os
from pathlib import Path
from typing import Any, Literal

import torch
from torch import nn

from .base import Backbone, BackboneError
from .registry import BackboneConfig, register_backbone

log = logging.getLogger("grft_serve.backbones")

__all__ = ["HFTextBackbone"]


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
        # Never tokenize past what the model can embed: a small model's own limit wins over the default.
        limit = self.position_limit()
        self.model_id = model_id or f"hf/{Path(str(path)).name if path else type(model).__name__}"
        if limit is not None and max_length > limit:
            log.info("%s embeds %d token positions: max_length %d -> %d", self.model_id, limit, max_length, limit)
        self.max_length = min(max_length, limit) if limit is not None else max_length
        self.feature_dim = int(model.config.hidden_size)

    def exclude_from_patching(self) -> tuple[str, ...]:
        # A causal-LM head would never run in a classification forward; bodies have none.
        return tuple(n for n in ("net.lm_head",) if _has_module(self, n))

    def check_preprocessing(self, preprocessing: dict) -> str | None:
        why = super().check_preprocessing(preprocessing)
        pooling = (preprocessing or {}).get("pooling")
        if why is None and pooling is not None and pooling != self.pooling:
            why = f"task was trained with {pooling} pooling; backbone {self.model_id} pools by {self.pooling}"
        max_length, limit = (preprocessing or {}).get("max_length"), self.position_limit()
        if why is None and isinstance(max_length, int) and limit is not None and max_length > limit:
            why = f"task asks for max_length {max_length}; backbone {self.model_id} has {limit} positions"
        return why

    def position_limit(self) -> int | None:
        """How many token positions the model can embed (None: no fixed limit known)."""
        n = getattr(getattr(self.net, "config", None), "max_position_embeddings", None)
        return int(n) if isinstance(n, int) and n > 0 else None

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

    def forward(self, batch):
        mask = batch["attention_mask"]
        hidden = self.net(input_ids=batch["input_ids"], attention_mask=mask).last_hidden_state
        if self.pooling == "last":
            last = mask.sum(dim=1).clamp(min=1) - 1
            return hidden[torch.arange(hidden.shape[0], device=hidden.device), last]
        m = mask.unsqueeze(-1).to(hidden.dtype)
        return (hidden * m).sum(1) / m.sum(1).clamp(min=1e-6)

    def preprocessing_meta(self, input_size: int | None = None) -> dict:
        return {"kind": "text", "pooling": self.pooling, "max_length": self.max_length}


def _has_module(root: nn.Module, dotted: str) -> bool:
    try:
        root.get_submodule(dotted)
        return True
    except AttributeError:
        return False

@register_backbone("hf")
def _create_hf(cfg: BackboneConfig) -> HFTextBackbone:
    if not cfg.path:
        raise BackboneError("backbone type 'hf' needs a local model path")
    return HFTextBackbone(cfg.path, pooling=cfg.pooling, max_length=cfg.max_length or 128)
