"""Task package headers: what a ``<task>.grft.safetensors`` file declares, checked before any tensor
is read.

A safetensors file is ``n`` (little-endian u64) + an ``n``-byte JSON header + the data. The header's
entries must tile the data exactly (offsets ``[b_i, e_i)`` sorted, ``e_i = b_{i+1}``, ``e_last =
size - 8 - n``) with ``e_i - b_i = itemsize * prod(shape)``; sizes are checked against ``max_bytes``
before anything is allocated. ``__metadata__["grft"]`` is the JSON of :class:`PackageMeta`; the
task changes ``num_params = sum(|values| + |bias|)`` backbone parameters (head excluded).
"""
from __future__ import annotations

import json
import math
import os
import re
import struct
import time
from typing import Any, NamedTuple

import torch
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from .generation import GenerationMeta
from .package_errors import (DtypeError, MetadataError, MetadataTooLargeError, NotSafetensorsError,
                             PackageTooLargeError, PickleContentError, PreprocessingError, ShapeMismatchError,
                             TruncatedPackageError, UnsupportedFormatError)
from .preprocessing import validate_preprocessing

__all__ = ["CLASSIFICATION", "DEFAULT_MAX_BYTES", "FORMAT_VERSION", "GENERATION", "INDEX_DTYPES", "MAX_HEADER_BYTES",
           "MAX_METADATA_CHARS", "MAX_RANK", "SUFFIX", "TASK_KINDS",
           "TASK_ID_RE", "VALUE_DTYPES", "PackageHeader", "PackageMeta", "read_header", "read_header_info",
           "valid_task_id"]

FORMAT_VERSION = 1
SUFFIX = ".grft.safetensors"
DEFAULT_MAX_BYTES = 256 * 1024 * 1024  # the one default package size limit (engine, app, CLI)
MAX_HEADER_BYTES = 100_000_000  # safetensors' own header limit
# the ``grft`` metadata JSON (labels, metrics, training config: a few KB to a few hundred KB for
# thousands of classes); every replica and listing holds it per task
MAX_METADATA_CHARS = 1 << 20
MAX_RANK = 8
TASK_ID_RE = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.\-]{0,127}")
VALUE_DTYPES = {torch.float32, torch.float16, torch.bfloat16}
INDEX_DTYPES = {torch.int64, torch.int32}
CLASSIFICATION, GENERATION = "classification", "generation"
TASK_KINDS = (CLASSIFICATION, GENERATION)
_ST_SIZES = {"F64": 8, "I64": 8, "F32": 4, "I32": 4, "F16": 2, "BF16": 2, "I16": 2, "I8": 1, "U8": 1,
             "BOOL": 1, "F8_E4M3": 1, "F8_E5M2": 1}


# ---------------------------------------------------------------------------------------------
# data
# ---------------------------------------------------------------------------------------------
def valid_task_id(task_id: Any) -> bool:
    """A task id: letters, digits, ``_``, ``-``, ``.``; starts alphanumeric; at most 128 characters."""
    return isinstance(task_id, str) and TASK_ID_RE.fullmatch(task_id) is not None


class PackageMeta(BaseModel):
    """JSON metadata of a task package. ``preprocessing``: see :mod:`grft_serve.core.preprocessing`.

    ``kind``: ``classification`` (a head over ``labels``; the default, so packages written before
    generation existed read unchanged) or ``generation`` (no head, no labels; ``generation`` holds the
    prompt format and sampling defaults, :class:`~grft_serve.core.generation.GenerationMeta`)."""

    model_config = ConfigDict(extra="allow")

    format_version: int = FORMAT_VERSION
    task_id: str = Field(pattern=f"^{TASK_ID_RE.pattern}$")
    kind: str = Field(CLASSIFICATION, pattern=f"^({CLASSIFICATION}|{GENERATION})$")
    base_model_id: str
    base_fingerprint: str
    mode: str = Field(pattern="^(row|column)$")
    k: int | dict[str, int] | None = None
    labels: list[str] = []
    generation: GenerationMeta | None = None
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

    @model_validator(mode="after")
    def _kind_fields(self) -> "PackageMeta":
        if self.kind == GENERATION:
            if self.generation is None:
                raise ValueError("a generation package needs 'generation' metadata")
            if self.labels:
                raise ValueError("a generation package has no labels")
        else:
            if not self.labels:
                raise ValueError("a classification package needs labels (at least one)")
            if self.generation is not None:
                raise ValueError("'generation' metadata belongs to generation packages only")
        return self


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
    if len(raw) > MAX_METADATA_CHARS:
        raise MetadataTooLargeError(f"package metadata is {len(raw)} characters; the limit is {MAX_METADATA_CHARS}")
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
        msg = first["msg"].removeprefix("Value error, ")
        raise MetadataError(f"bad package metadata field {where}: {msg}" if where else f"bad package metadata: {msg}") \
            from None


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


def read_header_info(source: str | os.PathLike | bytes, max_bytes: int = DEFAULT_MAX_BYTES) -> dict:
    """:func:`read_header` as ``{"meta": dict, "num_params": int, "bytes": int}`` (JSON-ready)."""
    h = read_header(source, max_bytes)
    return {"meta": h.meta.model_dump(mode="json"), "num_params": h.num_params, "bytes": h.size}
