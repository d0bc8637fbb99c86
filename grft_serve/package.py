"""Task packages: one ``<task>.grft.safetensors`` file per fine-tuned task.

Tensors (safetensors, never pickle):

- ``<module>.indices``  int64/int32 [k], sorted and unique — selected rows (or columns);
- ``<module>.values``   row mode ``[k, *W.shape[1:]]`` (new rows); column mode
  ``[W.shape[0], k, *W.shape[2:]]`` (new columns);
- ``<module>.bias``     optional, the module's full new bias ``[out]``;
- ``head.weight`` ``[classes, feature_dim]`` and ``head.bias`` ``[classes]``.

``__metadata__`` holds one key, ``grft``, whose value is the JSON of :class:`PackageMeta`.

:func:`load_package` validates everything before a tensor can reach a model, each failure with its
own exception class (all subclasses of :class:`PackageError`, which carries an HTTP status).
:func:`save_package` writes atomically (temp file in the same directory, fsync, rename).
"""
from __future__ import annotations

import json
import os
import struct
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from pydantic import BaseModel, ConfigDict, Field, ValidationError

from .base import BaseSpec
from .rowop import COLUMN, ROW, ModuleDelta

FORMAT_VERSION = 1
SUFFIX = ".grft.safetensors"
DEFAULT_MAX_BYTES = 512 * 1024 * 1024
VALUE_DTYPES = {torch.float32, torch.float16, torch.bfloat16}
INDEX_DTYPES = {torch.int64, torch.int32}
_ST_DTYPES = {"F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16, "I64": torch.int64,
              "I32": torch.int32, "F64": torch.float64, "I16": torch.int16, "I8": torch.int8,
              "U8": torch.uint8, "BOOL": torch.bool, "F8_E4M3": None, "F8_E5M2": None}
_ST_SIZES = {"F64": 8, "I64": 8, "F32": 4, "I32": 4, "F16": 2, "BF16": 2, "I16": 2, "I8": 1, "U8": 1,
             "BOOL": 1, "F8_E4M3": 1, "F8_E5M2": 1}


# ---------------------------------------------------------------------------------------------
# errors
# ---------------------------------------------------------------------------------------------
class PackageError(ValueError):
    """A task package was rejected. ``status`` is the HTTP status the serving app answers with."""

    status = 422
    code = "invalid_package"

    def __init__(self, message: str):
        super().__init__(message)
        self.message = message


class NotSafetensorsError(PackageError):
    status, code = 400, "not_safetensors"


class TruncatedPackageError(PackageError):
    status, code = 400, "truncated"


class PickleContentError(PackageError):
    status, code = 400, "pickle_content"


class UnsupportedFormatError(PackageError):
    status, code = 422, "unsupported_format_version"


class MetadataError(PackageError):
    status, code = 422, "bad_metadata"


class UnknownModuleError(PackageError):
    status, code = 422, "unknown_module"


class ShapeMismatchError(PackageError):
    status, code = 422, "shape_mismatch"


class InvalidIndicesError(PackageError):
    status, code = 422, "invalid_indices"


class DtypeError(PackageError):
    status, code = 422, "bad_dtype"


class NonFiniteError(PackageError):
    status, code = 422, "non_finite"


class FingerprintMismatchError(PackageError):
    status, code = 409, "base_fingerprint_mismatch"


class PreprocessingMismatchError(PackageError):
    status, code = 422, "preprocessing_mismatch"


class PackageTooLargeError(PackageError):
    status, code = 413, "too_large"


# ---------------------------------------------------------------------------------------------
# data
# ---------------------------------------------------------------------------------------------
class PackageMeta(BaseModel):
    """JSON metadata of a task package."""

    model_config = ConfigDict(extra="allow")

    format_version: int = FORMAT_VERSION
    task_id: str = Field(pattern=r"^[A-Za-z0-9][A-Za-z0-9_.\-]{0,127}$")
    base_model_id: str
    base_fingerprint: str
    mode: str = Field(pattern="^(row|column)$")
    k: int | dict[str, int] | None = None
    labels: list[str]
    preprocessing: dict[str, Any] = {}
    metrics: dict[str, Any] = {}
    training_config: dict[str, Any] = {}
    created: float = Field(default_factory=time.time)


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


def atomic_write(path: str | os.PathLike, data: bytes) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        try:
            os.unlink(tmp)
        except FileNotFoundError:
            pass
        raise
    return path


# ---------------------------------------------------------------------------------------------
# read + validate
# ---------------------------------------------------------------------------------------------
def _read_header(data: bytes) -> tuple[dict, int]:
    n = struct.unpack("<Q", data[:8])[0] if len(data) >= 8 else 0
    looks_st = 2 <= n <= 100_000_000 and data[8:9] == b"{"
    if not looks_st and (data[:2] == b"PK" or (data[:1] == b"\x80" and data[1:2] in bytes(range(2, 6)))
                         or data[-1:] == b"." and data[:1] in (b"(", b"c", b"}", b"]")):
        raise PickleContentError("package looks like a pickle / torch.save file; only safetensors is accepted")
    if len(data) < 8:
        raise NotSafetensorsError(f"not a safetensors file ({len(data)} bytes, no header)")
    if not looks_st:
        raise NotSafetensorsError("not a safetensors file (bad header length or header is not JSON)")
    if 8 + n > len(data):
        raise TruncatedPackageError(f"truncated package: header needs {8 + n} bytes, file has {len(data)}")
    try:
        header = json.loads(data[8:8 + n])
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise NotSafetensorsError(f"not a safetensors file (header JSON: {e})") from None
    if not isinstance(header, dict):
        raise NotSafetensorsError("not a safetensors file (header is not a JSON object)")
    body = len(data) - 8 - n
    end_max = 0
    for name, info in header.items():
        if name == "__metadata__":
            continue
        try:
            dtype, shape, (start, end) = info["dtype"], info["shape"], info["data_offsets"]
        except (KeyError, TypeError, ValueError):
            raise NotSafetensorsError(f"not a safetensors file (bad entry for tensor {name!r})") from None
        if dtype not in _ST_SIZES:
            raise DtypeError(f"tensor {name!r} has unsupported dtype {dtype}")
        numel = 1
        for s in shape:
            numel *= int(s)
        if end - start != numel * _ST_SIZES[dtype] or start < 0:
            raise NotSafetensorsError(f"tensor {name!r}: data offsets do not match its shape")
        end_max = max(end_max, end)
    if end_max > body:
        raise TruncatedPackageError(f"truncated package: tensors need {end_max} data bytes, file has {body}")
    return header, n


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


def load_package(source: str | os.PathLike | bytes, base: BaseSpec | None = None,
                 max_bytes: int = DEFAULT_MAX_BYTES, check_fingerprint: bool = True) -> TaskPackage:
    """Read and validate a task package. With ``base`` given, also check it against that base.

    Raises a :class:`PackageError` subclass naming the problem; nothing is returned half-checked.
    """
    data = read_package_bytes(source, max_bytes)
    header, _ = _read_header(data)
    raw_meta = (header.get("__metadata__") or {}).get("grft")
    if raw_meta is None:
        raise MetadataError("package has no 'grft' metadata entry")
    try:
        meta_obj = json.loads(raw_meta)
    except json.JSONDecodeError as e:
        raise MetadataError(f"package metadata is not valid JSON: {e}") from None
    if not isinstance(meta_obj, dict):
        raise MetadataError("package metadata must be a JSON object")
    if meta_obj.get("format_version") != FORMAT_VERSION:
        raise UnsupportedFormatError(
            f"unsupported package format version {meta_obj.get('format_version')!r}; this build reads {FORMAT_VERSION}")
    try:
        meta = PackageMeta(**meta_obj)
    except ValidationError as e:
        first = e.errors()[0]
        raise MetadataError(f"bad package metadata field {'.'.join(map(str, first['loc']))}: {first['msg']}") from None

    # a package for another base is refused as such, before any shape check could fail on it
    if base is not None and check_fingerprint and meta.base_fingerprint != base.fingerprint:
        raise FingerprintMismatchError(
            f"package was trained on base {meta.base_model_id} with fingerprint {meta.base_fingerprint}; "
            f"this base is {base.model_id} with fingerprint {base.fingerprint}")

    from safetensors import SafetensorError
    from safetensors.torch import load as st_load

    try:
        tensors = st_load(data)
    except (SafetensorError, Exception) as e:  # noqa: BLE001 - any parse error means a bad file
        raise NotSafetensorsError(f"not a readable safetensors file: {e}") from None

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
            if meta.mode == COLUMN and not spec.supports_columns():
                raise ShapeMismatchError(f"module {mod!r} (grouped conv) cannot be column-patched")
            limit = spec.n_slices(meta.mode)
            if k and int(idx.max()) >= limit:
                raise InvalidIndicesError(f"{mod}.indices has index {int(idx.max())} out of range [0, {limit})")
            want = spec.values_shape(meta.mode, k)
            if tuple(vals.shape) != want:
                raise ShapeMismatchError(f"{mod}.values has shape {tuple(vals.shape)}; expected {want}")
            if bias is not None and (not spec.has_bias or tuple(bias.shape) != (spec.out_features,)):
                raise ShapeMismatchError(f"{mod}.bias has shape {tuple(bias.shape)}; base bias is "
                                         f"{(spec.out_features,) if spec.has_bias else 'absent'}")
        else:
            dim = 0 if meta.mode == ROW else 1
            if vals.dim() < 2 or vals.shape[dim] != k:
                raise ShapeMismatchError(f"{mod}.values shape {tuple(vals.shape)} does not hold {k} {meta.mode}s")
        _check_finite(f"{mod}.values", vals)
        if bias is not None:
            _check_finite(f"{mod}.bias", bias)
        deltas[mod] = ModuleDelta(mode=meta.mode, indices=idx, values=vals, bias=bias)

    return TaskPackage(meta=meta, deltas=deltas, head_weight=hw, head_bias=hb)


def peek_meta(source: str | os.PathLike | bytes, max_bytes: int = DEFAULT_MAX_BYTES) -> PackageMeta:
    """Validate a package's container and metadata only (no base needed) and return the metadata."""
    return load_package(source, None, max_bytes).meta
