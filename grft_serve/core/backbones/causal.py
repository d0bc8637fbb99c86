"""The ``causal_lm`` backbone family: a transformers causal LM (LLaMA and kin) for generation tasks.

The module tree is laid out so that a causal LM and the classification body of the same checkpoint
(:class:`~grft_serve.core.backbones.hf.HFTextBackbone`) have the SAME patchable modules and the SAME
base fingerprint: the body is ``net`` (``net.layers.N.self_attn.q_proj``, ...), the output projection
is ``lm_head`` and is never patchable (tied to the embeddings in SmolLM2; the embeddings are not
``nn.Linear`` either). The full ``*ForCausalLM`` is kept as ``lm`` for its forward and its
generation utilities; registered after ``net`` and ``lm_head``, it adds no names of its own.

``forward(batch)`` returns next-token logits ``[B, T, vocab]``; ``max_length`` is the context window
(prompt + generated tokens) a task may use.
"""
from __future__ import annotations

import logging
import os
from pathlib import Path
from typing import Any

import torch
from torch import nn

from ..generation import GenerationMeta
from .base import Backbone, BackboneError
from .registry import BackboneConfig, register_backbone

log = logging.getLogger("grft_serve.backbones")

__all__ = ["CausalLMBackbone", "DEFAULT_CONTEXT"]

DEFAULT_CONTEXT = 2048


class CausalLMBackbone(Backbone):
    """A causal LM whose rows are patched by generation tasks; its own ``lm_head`` makes the tokens."""

    kind = "text"
    task_kind = "generation"

    def __init__(self, path: str | os.PathLike | None = None, max_length: int | None = None,
                 model_id: str | None = None, model: nn.Module | None = None, tokenizer: Any = None,
                 torch_dtype: torch.dtype = torch.float32):
        super().__init__()
        from transformers import AutoModelForCausalLM, AutoTokenizer

        if model is None:
            if path is None or not Path(path).is_dir():
                raise BackboneError(f"transformers model directory not found: {path}")
            model = AutoModelForCausalLM.from_pretrained(str(path), dtype=torch_dtype)
        if tokenizer is None and path is not None:
            tokenizer = AutoTokenizer.from_pretrained(str(path))
        if tokenizer is not None and tokenizer.pad_token is None:
            tokenizer.pad_token = tokenizer.eos_token
        body = getattr(model, "model", None)
        if not isinstance(body, nn.Module) or not isinstance(getattr(model, "lm_head", None), nn.Module):
            raise BackboneError(f"{type(model).__name__} is not a causal LM with .model and .lm_head")
        self.net = body
        self.lm_head = model.lm_head
        self.lm = model  # after net / lm_head: named_modules lists each module once, under those names
        self.tokenizer = tokenizer
        self.model_id = model_id or f"hf/{Path(str(path)).name if path else type(model).__name__}"
        limit = self.position_limit()
        want = max_length or DEFAULT_CONTEXT
        if limit is not None and want > limit:
            if max_length:
                log.info("%s embeds %d token positions: context %d -> %d", self.model_id, limit, want, limit)
            want = limit
        self.max_length = int(want)
        self.feature_dim = int(model.config.hidden_size)
        self.vocab_size = int(model.config.vocab_size)

    def exclude_from_patching(self) -> tuple[str, ...]:
        return ("lm_head",)

    def position_limit(self) -> int | None:
        n = getattr(self.lm.config, "max_position_embeddings", None)
        return int(n) if isinstance(n, int) and n > 0 else None

    def train(self, mode: bool = True):
        super().train(mode)
        self.lm.train(mode)
        return self

    def check_preprocessing(self, preprocessing: dict) -> str | None:
        why = super().check_preprocessing(preprocessing)
        prep = preprocessing or {}
        if why is None and prep.get("pooling") is not None:
            why = f"a generation task has no pooling; got {prep['pooling']!r}"
        max_length, limit = prep.get("max_length"), self.position_limit()
        if why is None and isinstance(max_length, int) and limit is not None and max_length > limit:
            why = f"task asks for a context of {max_length} tokens; backbone {self.model_id} has {limit} positions"
        return why

    def preprocessing_meta(self, input_size: int | None = None) -> dict:
        return {"kind": "text", "max_length": self.max_length}

    def generation_defaults(self) -> GenerationMeta:
        """What the base model (no task) is served with: its chat template, its EOS ids."""
        cfg = getattr(self.lm, "generation_config", None)
        eos = getattr(cfg, "eos_token_id", None)
        eos_ids = [eos] if isinstance(eos, int) else list(eos or [])
        if not eos_ids and getattr(self.tokenizer, "eos_token_id", None) is not None:
            eos_ids = [int(self.tokenizer.eos_token_id)]
        fmt = "chat" if getattr(self.tokenizer, "chat_template", None) else "completion"
        return GenerationMeta(format=fmt, eos_token_ids=eos_ids[:8])

    def preprocess(self, raw, preprocessing: dict | None = None):
        """Token batches from strings (right-padded), for scoring; generation renders its own ids."""
        if self.tokenizer is None:
            raise BackboneError(f"backbone {self.model_id} has no tokenizer; pass token batches")
        if not all(isinstance(r, str) for r in raw):
            raise TypeError("expected strings")
        max_length = int((preprocessing or {}).get("max_length") or self.max_length)
        self.tokenizer.padding_side = "right"
        enc = self.tokenizer(list(raw), padding=True, truncation=True, max_length=max_length, return_tensors="pt")
        return {"input_ids": enc["input_ids"], "attention_mask": enc["attention_mask"]}

    def forward(self, batch):
        """Next-token logits ``[B, T, vocab]`` of a token batch (``input_ids``, ``attention_mask``)."""
        return self.lm(input_ids=batch["input_ids"], attention_mask=batch.get("attention_mask")).logits


@register_backbone("causal_lm", task_kind="generation")
def _create_causal_lm(cfg: BackboneConfig) -> CausalLMBackbone:
    if not cfg.path:
        raise BackboneError("backbone type 'causal_lm' needs a local model path")
    return CausalLMBackbone(cfg.path, max_length=cfg.max_length)
