"""Task packages: one ``<task>.grft.safetensors`` file per fine-tuned task.

Tensors (safetensors, never pickle):

- ``<module>.indices``  int64/int32 [k], sorted and unique — selected rows (or columns); k may be 0;
- ``<module>.values``   row mode ``[k, *W.shape[1:]]`` (new rows); column mode
  ``[W.shape[0], k, *W.shape[2:]]`` (new columns);
- ``<module>.bias``     optional, the module's full new bias ``[out]`` — also for a module whose base
  has no bias (the base bias is then 0);
- ``head.weight`` ``[classes, feature_dim]`` and ``head.bias`` ``[classes]``.

``__metadata__`` holds one key, ``grft``, whose value is the JSON of :class:`PackageMeta`.
A task changes ``num_params = Σ_modules (|values| + |bias|)`` backbone parameters. A package with no
module entry is a linear probe (head only); one whose module entries all change nothing is refused.

:func:`read_header` checks everything the header declares (entries, offsets tiling the data, sizes
against ``max_bytes`` before anything is allocated, the metadata and its preprocessing) from the
file's first ``8 + n`` bytes; :func:`load_package` then validates the tensors themselves, each
failure with its own exception class (all subclasses of :class:`PackageError`, which carries an HTTP
status). :func:`save_package` writes atomically (temp file in the same directory, fsync, rename).
"""
from __future__ import annotations

import json
import math
import os
import re
import struct
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, NamedTuple

import torch
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator

from .atomic import TMP_SUFFIX, atomic_write
from .spec import BaseSpec
from .package_errors import (DtypeError, EmptyPackageError, FingerprintMismatchError, InvalidIndicesError,
                             MetadataError, NonFiniteError, NotSafetensorsError, PackageError, PackageTooLargeError,
                             PickleContentError, PreprocessingError, PreprocessingMismatchError, ShapeMismatchError,
                             TruncatedPackageError, UnknownModuleError, UnsupportedFormatError)
from .preprocessing import validate_preprocessing
from .rowop import COLUMN, ROW, ModuleDelta

__all__ = [
    "DEFAULT_MAX_BYTES", "FORMAT_VERSION", "SUFFIX", "TASK_ID_RE", "PackageHeader", "PackageMeta", "TaskPackage",
    "load_package", "package_bytes", "peek_meta", "read_header", "read_header_info", "read_package_bytes",
    "save_package", "valid_task_id",
    # re-exported: the errors (grft_serve.package_errors) and the atomic write (grft_serve.atomic)
    "PackageError", "NotSafetensorsError", "TruncatedPackageError", "PickleContentError", "UnsupportedFormatError",
    "MetadataError", "PreprocessingError", "EmptyPackageError", "UnknownModuleError", "ShapeMismatchError",
    "InvalidIndicesError", "DtypeError", "NonFiniteError", "FingerprintMismatchError",
    "PreprocessingMismatchError", "PackageTooLargeError", "TMP_SUFFIX", "atomic_write",
]

FORMAT_VERSION = 1
SUFFIX = ".grft.safetensors"
DEFAULT_MAX_BYTES = 256 * 1024 * 1024  # the one default package size limit (engine, app, CLI)
MAX_HEADER_BYTES = 100_000_000  # safetensors' own header limit
MAX_RANK = 8
TASK_ID_RE = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.\-]{0,127}")
VALUE_DTYPES = {torch.float32, torch.float16, torch.bfloat16}
INDEX_DTYPES = {torch.int64, torch.int32}
_ST_SIZES = {"F64": 8, "I64": 8, "F32": 4, "I32": 4, "F16": 2, "BF16": 2, "I16": 2, "I8": 1, "U8": 1,
             "BOOL": 1, "F8_E4M3": 1, "F8_E5M2": 1}


# ---------------------------------------------------------------------------------------------
# data
# ---------------------------------------------------------------------------------------------
def valid_task_id(task_id: Any) -> bool:
    """A task id: letters, digits, ``_``, ``-``, ``.``; starts alphanumeric; at most 128 characters."""
    return isinstance(task_id, str) and TASK_ID_RE.fullmatch(task_id) is not None


class PackageMeta(BaseModel):
    """JSON metadata of a task package. ``preprocessing``: see :mod:`grft_serve.preprocessing`."""

    model_config = ConfigDict(extra="allow")

    format_version: int = FORMAT_VERSION
    task_id: str = Field(pattern=f"^{TASK_ID_RE.pattern}$")
    base_model_id: str
    base_fingerprint: str
    mode: str = Field(pattern="^(row|column)$")
    k: int | dict[str, int] | None = None
    labels: list[str] = Field(min_length=1)
    preprocessing: dict[str, Any] = {}
    metrics: dict[str, Any] = {}
    training_config: dict[str, Any] = {}
    created: float | None = Field(default_factory=time.time)  # a read package without one: None

    @field_validator("labels")
    @classmethod
    def _unique_labels(cls, v: list[str]) -> list[str]:
        seen = set()
        for label in v:
            if label in seen:
                raise ValueError(f"duplicate label {label[:64]!r}")
            seen.add(label)
        return v

    @field_validator("preprocessing", mode="before")
    @classmethod
    def _preprocessing(cls, v: Any) -> dict:
        return validate_preprocessing(v)


@dataclass
class TaskPackage:
    meta: PackageMeta
    deltas: dict[str, ModuleDelta]
    head_weight: torch.Tensor
    head_bias: torch.Tensor
    extra: dict[str, Any] = field(default_factory=dict)

    @property
    def task_id(self) -> str:
        return self.meta.task_id

    def num_params(self) -> int:
        """Backbone parameters this task changes (rows/columns and biases; head excluded)."""
        n = 0
        for d in self.deltas.values():
            n += d.values.numel() + (d.bias.numel() if d.bias is not None else 0)
        return n

    def tensors(self) -> dict[str, torch.Tensor]:
        out: dict[str, torch.Tensor] = {}
        for name, d in self.deltas.items():
            out[f"{name}.indices"] = d.indices.to(torch.int64)
            out[f"{name}.values"] = d.values
            if d.bias is not None:
                out[f"{name}.bias"] = d.bias
        out["head.weight"] = self.head_weight
        out["head.bias"] = self.head_bias
        return {k: v.detach().to("cpu").contiguous() for k, v in out.items()}


# ---------------------------------------------------------------------------------------------
# write
# ---------------------------------------------------------------------------------------------
def package_bytes(pkg: TaskPackage) -> bytes:
    from safetensors.torch import save

    return save(pkg.tensors(), metadata={"grft": pkg.meta.model_dump_json()})


def save_package(pkg: TaskPackage, path: str | os.PathLike) -> Path:
    """Write ``pkg`` to ``path`` atomically; returns the path."""
    return atomic_write(path, package_bytes(pkg))


# ---------------------------------------------------------------------------------------------
# read + validate: the header (cheap: the file's first 8 + n bytes)
# ---------------------------------------------------------------------------------------------
class PackageHeader(NamedTuple):
    """What a package's safetensors header says, checked without reading a tensor.

    ``tensors``: ``{name: {"dtype", "shape", "data_offsets"}}``; ``num_params``: backbone values and
    biases the task changes (head excluded); ``size``: the file's bytes."""

    tensors: dict[str, dict]
    meta: PackageMeta
    num_params: int
    size: int


def _no_duplicate_keys(pairs: list[tuple[str, Any]]) -> dict:
    out = {}
    for k, v in pairs:
        if k in out:
            raise NotSafetensorsError(f"not a safetensors file (header repeats the key {k!r})")
        out[k] = v
    return out


def _header_length(prefix: bytes, last: bytes, size: int) -> int:
    """The header length ``n`` from the first 9 bytes (pickle and zip files are named as such)."""
    n = struct.unpack("<Q", prefix[:8])[0] if size >= 8 else 0
    looks_st = 2 <= n <= MAX_HEADER_BYTES and prefix[8:9] == b"{"
    if not looks_st and (prefix[:2] == b"PK" or (prefix[:1] == b"\x80" and prefix[1:2] in bytes(range(2, 6)))
                         or last == b"." and prefix[:1] in (b"(", b"c", b"}", b"]")):
        raise PickleContentError("package looks like a pickle / torch.save file; only safetensors is accepted")
    if size < 8:
        raise NotSafetensorsError(f"not a safetensors file ({size} bytes, no header)")
    if not looks_st:
        raise NotSafetensorsError("not a safetensors file (bad header length or header is not JSON)")
    if 8 + n > size:
        raise TruncatedPackageError(f"truncated package: header needs {8 + n} bytes, file has {size}")
    return n


def _is_int(x: Any) -> bool:
    return type(x) is int


def _check_entries(header: dict, body: int, max_bytes: int) -> dict[str, dict]:
    """Each tensor entry well-formed, its declared size under ``max_bytes``, the data regions exactly
    tiling the body (no gap, no overlap, no trailing byte), as safetensors itself requires."""
    entries, total = {}, 0
    for name, info in header.items():
        if name == "__metadata__":
            continue
        if not isinstance(info, dict) or set(info) != {"dtype", "shape", "data_offsets"}:
            raise NotSafetensorsError(f"not a safetensors file (bad entry for tensor {name!r})")
        dtype, shape, offsets = info["dtype"], info["shape"], info["data_offsets"]
        if not isinstance(dtype, str):
            raise NotSafetensorsError(f"tensor {name!r}: dtype must be a string")
        if dtype not in _ST_SIZES:
            raise DtypeError(f"tensor {name!r} has unsupported dtype {dtype[:32]!r}")
        if not isinstance(shape, list) or not all(_is_int(s) and s >= 0 for s in shape):
            raise NotSafetensorsError(f"tensor {name!r}: shape must be a list of non-negative integers")
        if len(shape) > MAX_RANK:
            raise ShapeMismatchError(f"tensor {name!r} has {len(shape)} dimensions; at most {MAX_RANK}")
        if not (isinstance(offsets, list) and len(offsets) == 2 and all(_is_int(o) for o in offsets)
                and 0 <= offsets[0] <= offsets[1]):
            raise NotSafetensorsError(f"tensor {name!r}: data_offsets must be two integers 0 <= begin <= end")
        nbytes = _ST_SIZES[dtype]
        for s in shape:
            nbytes *= s
        total += nbytes
        if nbytes > max_bytes or total > max_bytes:
            raise PackageTooLargeError(f"tensor {name!r} declares {nbytes} bytes of data; the package limit "
                                       f"is {max_bytes}")
        if offsets[1] - offsets[0] != nbytes:
            raise NotSafetensorsError(f"tensor {name!r}: data offsets do not match its shape and dtype")
        entries[name] = info
    end = 0
    for name, info in sorted(entries.items(), key=lambda kv: tuple(kv[1]["data_offsets"])):
        begin, stop = info["data_offsets"]
        if begin != end:
            raise NotSafetensorsError(f"tensor {name!r}: data regions overlap or leave a gap")
        end = stop
    if end > body:
        raise TruncatedPackageError(f"truncated package: tensors need {end} data bytes, file has {body}")
    if end < body:
        raise NotSafetensorsError(f"not a safetensors file ({body - end} bytes after the last tensor)")
    return entries


def _parse_meta(header: dict) -> PackageMeta:
    md = header.get("__metadata__", {})
    if not isinstance(md, dict) or not all(isinstance(v, str) for v in md.values()):
        raise NotSafetensorsError("not a safetensors file (__metadata__ must be an object of strings)")
    raw = md.get("grft")
    if raw is None:
        raise MetadataError("package has no 'grft' metadata entry")
    try:
        obj = json.loads(raw)
    except (ValueError, RecursionError) as e:
        raise MetadataError(f"package metadata is not valid JSON: {e}") from None
    if not isinstance(obj, dict):
        raise MetadataError("package metadata must be a JSON object")
    if obj.get("format_version") != FORMAT_VERSION:
        raise UnsupportedFormatError(f"unsupported package format version {str(obj.get('format_version'))[:32]}; "
                                     f"this build reads {FORMAT_VERSION}")
    obj.setdefault("created", None)  # reading is deterministic: no default timestamp
    try:
        return PackageMeta(**obj)
    except ValidationError as e:
        first = e.errors()[0]
        where = ".".join(map(str, first["loc"]))
        if where.startswith("preprocessing"):
            raise PreprocessingError(first["msg"].removeprefix("Value error, ")) from None
        raise MetadataError(f"bad package metadata field {where}: {first['msg']}") from None


def read_header(source: str | os.PathLike | bytes, max_bytes: int = DEFAULT_MAX_BYTES) -> PackageHeader:
    """Read and check a package's header and metadata only: a path reads ``8 + n`` bytes of the file.

    Everything the header declares is checked (entries, offsets, sizes against the file and against
    ``max_bytes``, the metadata and its preprocessing); tensor values are not (see
    :func:`load_package`). Raises a :class:`PackageError` subclass, or ``FileNotFoundError``."""
    if isinstance(source, (bytes, bytearray, memoryview)):
        data = memoryview(source)
        size = len(data)
        if size > max_bytes:
            raise PackageTooLargeError(f"package is {size} bytes; the limit is {max_bytes}")
        n = _header_length(bytes(data[:9]), bytes(data[-1:]), size)
        raw = bytes(data[8:8 + n])
    else:
        with open(source, "rb") as f:
            size = os.fstat(f.fileno()).st_size
            if size > max_bytes:
                raise PackageTooLargeError(f"package is {size} bytes; the limit is {max_bytes}")
            prefix = f.read(9)
            f.seek(max(size - 1, 0))
            n = _header_length(prefix, f.read(1) if size else b"", size)
            f.seek(8)
            raw = f.read(n)
    try:
        header = json.loads(raw, object_pairs_hook=_no_duplicate_keys)
    except (ValueError, RecursionError) as e:  # bad UTF-8/JSON, an integer of > 4300 digits
        raise NotSafetensorsError(f"not a safetensors file (header JSON: {str(e)[:200]})") from None
    if not isinstance(header, dict):
        raise NotSafetensorsError("not a safetensors file (header is not a JSON object)")
    entries = _check_entries(header, size - 8 - n, max_bytes)
    meta = _parse_meta(header)
    num_params = 0
    for name, info in entries.items():
        if not name.startswith("head.") and name.endswith((".values", ".bias")):
            num_params += math.prod(info["shape"])
    return PackageHeader(entries, meta, num_params, size)


# ---------------------------------------------------------------------------------------------
# read + validate: the tensors
# ---------------------------------------------------------------------------------------------
def _fail_dtype(name: str, t: torch.Tensor, allowed) -> None:
    if t.dtype not in allowed:
        names = ", ".join(sorted(str(a).replace("torch.", "") for a in allowed))
        raise DtypeError(f"tensor {name!r} has dtype {str(t.dtype).replace('torch.', '')}; expected one of {names}")


def _check_finite(name: str, t: torch.Tensor) -> None:
    if not bool(torch.isfinite(t).all()):
        raise NonFiniteError(f"tensor {name!r} contains NaN or Inf values")


def read_package_bytes(source: str | os.PathLike | bytes, max_bytes: int = DEFAULT_MAX_BYTES) -> bytes:
    if isinstance(source, (bytes, bytearray, memoryview)):
        data = bytes(source)
        if len(data) > max_bytes:
            raise PackageTooLargeError(f"package is {len(data)} bytes; the limit is {max_bytes}")
        return data
    p = Path(source)
    if not p.is_file():
        raise FileNotFoundError(f"task package not found: {p}")
    size = p.stat().st_size
    if size > max_bytes:
        raise PackageTooLargeError(f"package is {size} bytes; the limit is {max_bytes}")
    return p.read_bytes()


def _check_module(mod: str, g: dict[str, torch.Tensor], mode: str, base: BaseSpec | None) -> ModuleDelta:
    """One module's ``.indices``/``.values``/``.bias`` checked (against ``base`` if given)."""
    if "indices" not in g or "values" not in g:
        raise ShapeMismatchError(f"module {mod!r} needs both .indices and .values")
    spec = None
    if base is not None:
        spec = base.modules.get(mod)
        if spec is None:
            raise UnknownModuleError(f"module {mod!r} is not a patchable module of base {base.model_id}")
    idx, vals, bias = g["indices"], g["values"], g.get("bias")
    _fail_dtype(f"{mod}.indices", idx, INDEX_DTYPES)
    _fail_dtype(f"{mod}.values", vals, VALUE_DTYPES)
    if bias is not None:
        _fail_dtype(f"{mod}.bias", bias, VALUE_DTYPES)
    if idx.dim() != 1:
        raise ShapeMismatchError(f"{mod}.indices must be 1-D, got shape {tuple(idx.shape)}")
    idx = idx.to(torch.int64)
    k = idx.numel()
    if k and bool((idx[1:] <= idx[:-1]).any()):
        raise InvalidIndicesError(f"{mod}.indices must be sorted and unique")
    if k and int(idx.min()) < 0:
        raise InvalidIndicesError(f"{mod}.indices has a negative index")
    if spec is not None:
        if k and mode == COLUMN and not spec.supports_columns():
            raise ShapeMismatchError(f"module {mod!r} (grouped conv) cannot be column-patched")
        limit = spec.n_slices(mode)
        if k and int(idx.max()) >= limit:
            raise InvalidIndicesError(f"{mod}.indices has index {int(idx.max())} out of range [0, {limit})")
        want = spec.values_shape(mode, k)
        if tuple(vals.shape) != want:
            raise ShapeMismatchError(f"{mod}.values has shape {tuple(vals.shape)}; expected {want}")
        if bias is not None and tuple(bias.shape) != (spec.out_features,):
            raise ShapeMismatchError(f"{mod}.bias has shape {tuple(bias.shape)}; expected ({spec.out_features},)")
    else:
        dim = 0 if mode == ROW else 1
        if vals.dim() < 2 or vals.shape[dim] != k:
            raise ShapeMismatchError(f"{mod}.values shape {tuple(vals.shape)} does not hold {k} {mode}s")
        if bias is not None and (bias.dim() != 1 or (mode == COLUMN and bias.shape[0] != vals.shape[0])):
            raise ShapeMismatchError(f"{mod}.bias has shape {tuple(bias.shape)}; expected one value per output")
    _check_finite(f"{mod}.values", vals)
    if bias is not None:
        _check_finite(f"{mod}.bias", bias)
    return ModuleDelta(mode=mode, indices=idx, values=vals, bias=bias)


def load_package(source: str | os.PathLike | bytes, base: BaseSpec | None = None,
                 max_bytes: int = DEFAULT_MAX_BYTES, check_fingerprint: bool = True) -> TaskPackage:
    """Read and validate a task package. With ``base`` given, also check it against that base.

    Raises a :class:`PackageError` subclass naming the problem; nothing is returned half-checked.
    """
    data = read_package_bytes(source, max_bytes)
    meta = read_header(data, max_bytes).meta

    # a package for another base is refused as such, before any shape check could fail on it
    if base is not None and check_fingerprint and meta.base_fingerprint != base.fingerprint:
        raise FingerprintMismatchError(
            f"package was trained on base {meta.base_model_id} with fingerprint {meta.base_fingerprint}; "
            f"this base is {base.model_id} with fingerprint {base.fingerprint}")

    from safetensors.torch import load as st_load

    try:
        tensors = st_load(data)
    except Exception:  # noqa: BLE001 - read_header checked the layout; anything left is a bad file
        raise NotSafetensorsError("not a readable safetensors file") from None

    for name in ("head.weight", "head.bias"):
        if name not in tensors:
            raise ShapeMismatchError(f"package has no {name!r} tensor")
    hw, hb = tensors.pop("head.weight"), tensors.pop("head.bias")
    for name, t in (("head.weight", hw), ("head.bias", hb)):
        _fail_dtype(name, t, VALUE_DTYPES)
        _check_finite(name, t)
    n_cls = len(meta.labels)
    if hw.dim() != 2 or hw.shape[0] != n_cls or hb.shape != (n_cls,):
        raise ShapeMismatchError(f"head shapes {tuple(hw.shape)}/{tuple(hb.shape)} do not match {n_cls} labels")
    if base is not None and hw.shape[1] != base.feature_dim:
        raise ShapeMismatchError(f"head expects {hw.shape[1]} features; base {base.model_id} has {base.feature_dim}")

    groups: dict[str, dict[str, torch.Tensor]] = {}
    for name, t in tensors.items():
        mod, _, kind = name.rpartition(".")
        if kind not in ("indices", "values", "bias") or not mod:
            raise UnknownModuleError(f"unexpected tensor {name!r} (expected <module>.indices/.values/.bias)")
        groups.setdefault(mod, {})[kind] = t

    deltas: dict[str, ModuleDelta] = {}
    for mod, g in groups.items():
        d = _check_module(mod, g, meta.mode, base)
        if d.k or d.bias is not None:  # an entry that changes nothing is dropped
            deltas[mod] = d
    if groups and not deltas:
        raise EmptyPackageError("every module entry of the package has zero rows/columns and no bias: it changes "
                                "nothing (a head-only package has no module entries)")

    return TaskPackage(meta=meta, deltas=deltas, head_weight=hw, head_bias=hb)


def peek_meta(source: str | os.PathLike | bytes, max_bytes: int = DEFAULT_MAX_BYTES) -> PackageMeta:
    """Validate a package's container and metadata only (no base needed) and return the metadata."""
    return load_package(source, None, max_bytes).meta


def read_header_info(source: str | os.PathLike | bytes, max_bytes: int = DEFAULT_MAX_BYTES) -> dict:
    """:func:`read_header` as ``{"meta": dict, "num_params": int, "bytes": int}`` (JSON-ready)."""
    h = read_header(source, max_bytes)
    return {"meta": h.meta.model_dump(mode="json"), "num_params": h.num_params, "bytes": h.size}
