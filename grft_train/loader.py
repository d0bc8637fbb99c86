"""Batches for select / fit / eval through :class:`torch.utils.data.DataLoader`.

Samples are decoded and transformed one by one inside loader workers (forked processes on Linux),
so memory stays flat whatever the dataset size: at most ``workers × prefetch_factor`` batches are
in flight. Images get the backbone's per-sample transform (or a training augmentation) in the
workers; text batches are tokenised by the backbone in the collate step. Batches are pinned when the
model runs on CUDA. Shuffling draws the epoch's order from the caller's numpy generator, so a run
is reproducible for a seed whatever the number of workers.
"""
from __future__ import annotations

import multiprocessing
import os
from typing import Any, Callable, Iterator, Sequence

import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset

from grft_serve.core.backbones import Backbone

__all__ = ["make_loader", "resolve_workers", "Batches", "raw_batches"]


class _Mapped(Dataset):
    """``dataset[i] = (transform(x), y)``."""

    def __init__(self, dataset: Dataset, transform: Callable):
        self.dataset, self.transform = dataset, transform

    def __len__(self) -> int:
        return len(self.dataset)

    def __getitem__(self, i: int):
        x, y = self.dataset[i]
        return self.transform(x), y


def resolve_workers(workers: int | None, n_items: int, batch_size: int, kind: str = "image") -> int:
    """Explicit ``workers``, or: up to 4 worker processes for images (one core left to the model)
    when there are more than two batches; none for text (tokenising a batch is cheap)."""
    if workers is not None:
        return int(workers)
    if kind == "text" or n_items <= 2 * batch_size:
        return 0
    return max(0, min(4, (os.cpu_count() or 1) - 1))


def _collate_raw(items: Sequence[tuple[Any, int]]):
    return [x for x, _ in items], torch.tensor([y for _, y in items], dtype=torch.long)


def make_loader(dataset: Dataset, batch_size: int, shuffle: bool = False, workers: int | None = 0,
                transform: Callable | None = None, collate: Callable | None = None,
                order: Sequence[int] | None = None, pin_memory: bool = False, seed: int = 0) -> DataLoader:
    """A DataLoader over ``(x, y)`` samples.

    ``transform`` maps one raw input (in the workers); ``collate`` builds a batch from a list of
    ``(x, y)`` (default: stack tensors, or keep raw inputs as a list); ``order`` fixes the sample
    order (overrides ``shuffle``, which otherwise shuffles with a generator seeded by ``seed``)."""
    ds = _Mapped(dataset, transform) if transform is not None else dataset
    n = len(ds)
    workers = resolve_workers(workers, n, batch_size)
    kw: dict[str, Any] = {}
    if workers > 0:
        kw["prefetch_factor"] = 2
        if "fork" in multiprocessing.get_all_start_methods():
            kw["multiprocessing_context"] = "fork"  # transforms may be closures over the backbone
    if order is not None:
        sampler, shuffle = list(int(i) for i in order), False
    else:
        sampler = None
        if shuffle:
            kw["generator"] = torch.Generator().manual_seed(seed)
    if collate is None and transform is None:
        collate = _collate_raw
    return DataLoader(ds, batch_size=batch_size, shuffle=shuffle, sampler=sampler, num_workers=workers,
                      collate_fn=collate, pin_memory=pin_memory, drop_last=False, **kw)


def _model_device(backbone: Backbone) -> torch.device:
    p = next(backbone.parameters(), None)
    return p.device if p is not None else torch.device("cpu")


def _sample_transform(backbone: Backbone, augment: Callable | None, preprocessing: dict | None) -> Callable | None:
    if augment is not None:
        return augment
    if backbone.kind == "text":
        return None
    return lambda x: backbone.preprocess([x], preprocessing)[0]


def _token_collate(backbone: Backbone, preprocessing: dict | None) -> Callable:
    """Text batches: the backbone tokenises the batch's texts (padded to the longest)."""
    def collate(items):
        x, y = _collate_raw(items)
        return backbone.preprocess(x, preprocessing), y
    return collate


class Batches:
    """A split ready for batching: ``batches(bs, shuffle, rng)`` yields ``(model batch, labels)``.

    Model batches are what ``backbone.batch_to`` takes: preprocessed image tensors (eval transform,
    or ``augment_tf`` for training) or token dicts. ``preprocessing`` (a task package's) is passed to
    ``backbone.preprocess`` on every call; the backbone is never reconfigured. Nothing is kept between
    epochs."""

    def __init__(self, ds: Dataset, backbone: Backbone, augment_tf: Callable | None = None,
                 workers: int | None = None, preprocessing: dict | None = None):
        self.ds = ds
        self.backbone = backbone
        self.preprocessing = preprocessing
        self.y = torch.tensor(list(getattr(ds, "targets", [])), dtype=torch.long)
        self.augment_tf = augment_tf
        self.workers = workers if workers is not None else getattr(ds, "workers", None)

    def __len__(self) -> int:
        return len(self.ds)

    def batches(self, bs: int, shuffle: bool = False, rng: np.random.Generator | None = None) -> Iterator:
        if not len(self.ds):
            return iter(())
        order = (rng or np.random.default_rng(0)).permutation(len(self.ds)) if shuffle else None
        bb = self.backbone
        collate = _token_collate(bb, self.preprocessing) if bb.kind == "text" else None
        workers = resolve_workers(self.workers, len(self.ds), bs, bb.kind)
        return iter(make_loader(self.ds, bs, workers=workers,
                                transform=_sample_transform(bb, self.augment_tf, self.preprocessing),
                                collate=collate, order=order, pin_memory=_model_device(bb).type == "cuda"))


def raw_batches(ds: Dataset, batch_size: int, shuffle: bool = False, generator: np.random.Generator | None = None,
                workers: int | None = None) -> Iterator[tuple[list[Any], torch.Tensor]]:
    """``(raw inputs, labels)`` batches (images decoded in the workers), in order or shuffled with
    ``generator``."""
    if not len(ds):
        return iter(())
    order = (generator or np.random.default_rng(0)).permutation(len(ds)) if shuffle else None
    workers = resolve_workers(workers if workers is not None else getattr(ds, "workers", None), len(ds),
                              batch_size, getattr(ds, "kind", "image"))
    return iter(make_loader(ds, batch_size, workers=workers, order=order))
