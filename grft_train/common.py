"""Helpers shared by select / fit / eval: devices, backbones, data and batches, seeding."""
from __future__ import annotations

import logging
import random
import re
from typing import Any, Iterator

import numpy as np
import torch
from torch import nn

from grft_serve.core.backbones import Backbone, load_backbone
from grft_serve.core.device import resolve_device  # noqa: F401  (the training commands' device door)

from .data import DataError, DataSplits, SampleSet, load_splits
from .loader import raw_batches
from .summary import summary_table

__all__ = ["EMBED_RE", "HEAD_RE", "apply_threads", "autocast_ctx", "build_backbone", "count_params",
           "freeze", "is_embed", "is_head", "iter_batches", "load_data", "resolve_device", "seed_everything",
           "task_preprocessing"]

log = logging.getLogger("grft_train")

HEAD_RE = re.compile(r"(^|\.)(head|heads|classifier|fc|lm_head|pre_logits)(\.|$)")
EMBED_RE = re.compile(r"(^|\.)(patch_embed|conv_stem|stem|embeddings)(\.|$)")


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed % (2**32))
    torch.manual_seed(seed)


def task_preprocessing(backbone: Backbone, cfg) -> dict:
    """The preprocessing of the run's task: the backbone's defaults with the run's ``input_size``.
    Every ``backbone.preprocess`` call of select / fit gets it, and the selection and the package
    record it (serving and eval pass the package's to each call); the backbone is never changed."""
    return backbone.preprocessing_meta(input_size=getattr(cfg, "input_size", None))


def apply_threads(cfg) -> None:
    n = getattr(cfg, "threads", None)
    if n:
        torch.set_num_threads(int(n))


def build_backbone(cfg, device: torch.device) -> Backbone:
    # Random-init backbones (tests, demos without weights) must be the same model in every command,
    # whatever the run seed: build them under a fixed seed without touching the global RNG state.
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        bb = load_backbone(cfg.backbone)
    freeze(bb)
    bb.eval()
    return bb.to(device)


def freeze(module: nn.Module) -> None:
    for p in module.parameters():
        p.requires_grad_(False)


def load_data(cfg, backbone: Backbone | None = None, summary: bool = True) -> DataSplits:
    """The run's splits; logs the dataset summary table (classes, counts per split, input sizes)."""
    splits = load_splits(cfg.data)
    if backbone is not None and splits.kind != backbone.kind and backbone.kind in ("image", "text"):
        raise DataError(f"{splits.kind} data cannot feed the {backbone.kind} backbone {backbone.model_id}")
    if summary:
        prep = task_preprocessing(backbone, cfg) if backbone is not None else None
        log.info("dataset\n%s", summary_table(splits, backbone, prep))
        for note in splits.info.get("notes", []):
            log.warning("dataset: %s", note)
    return splits


def iter_batches(ds: SampleSet, batch_size: int, shuffle: bool = False,
                 generator: np.random.Generator | None = None) -> Iterator[tuple[list[Any], torch.Tensor]]:
    """``(raw inputs, labels)`` batches read by DataLoader workers (see :mod:`grft_train.loader`)."""
    return raw_batches(ds, batch_size, shuffle, generator)


def is_head(name: str) -> bool:
    return bool(HEAD_RE.search(name))


def is_embed(name: str) -> bool:
    return bool(EMBED_RE.search(name))


def autocast_ctx(device: torch.device, bf16: bool):
    if device.type == "cuda" and bf16:
        return torch.autocast(device_type="cuda", dtype=torch.bfloat16)
    return torch.autocast(device_type="cpu", enabled=False)


def count_params(module: nn.Module) -> int:
    seen, n = set(), 0
    for p in module.parameters():
        if id(p) not in seen:
            seen.add(id(p))
            n += p.numel()
    return n
