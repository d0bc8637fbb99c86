"""Task packages: one ``<task>.grft.safetensors`` file per fine-tuned task.

Tensors (safetensors, never pickle):

- ``<module>.indices``  int64/int32 [k], sorted and unique — selected rows (or columns); k may be 0;
- ``<module>.values``   row mode ``[k, *W.shape[1:]]`` (new rows); column mode
  ``[W.shape[0], k, *W.shape[2:]]`` (new columns);
- ``<module>.bias``     optional, the module's full new bias ``[out]`` — also for a module whose base
  has no bias (the base bias is then 0);
- ``head.weight`` ``[classes, feature_dim]`` and ``head.bias`` ``[classes]`` — classification
  packages only: a ``kind: generation`` package has no head (its outputs are the base's own
  ``lm_head`` over the patched body; see :mod:`grft_serve.core.generation`).

``__metadata__`` holds one key, ``grft``, whose value is the JSON of :class:`PackageMeta`.
A task changes ``num_params = Σ_modules (|values| + |bias|)`` backbone parameters. A package with no
module entry is a linear probe (head only); one whose module entries all change nothing is refused.

:func:`read_header` checks everything the header declares (entries, offsets tiling the data, sizes
against ``max_bytes`` before anything is allocated, the metadata and its preprocessing) from the
file's first ``8 + n`` bytes; :func:`load_package` then validates the tensors themselves, each
failure with its own exception class (all subclasses of :class:`PackageError`, which carries an HTTP
status). :func:`save_package` writes atomically (temp file in the same directory, fsync, rename).

Every value and bias (head included) must be finite and at most :data:`MAX_ABS_VALUE` in magnitude:
float16's largest finite number (65,504). That is the range every serving dtype (float32, bfloat16,
float16) can hold, so a package means the same on every engine, and it is orders of magnitude above
trained weights (an L2 pull to pretrained rows of norm ~1 per entry). Finite but huge values (±3e38)
would otherwise overflow in the first product and give NaN scores for every input.
"""
from __future__ import annotations

import math
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn

from .atomic import TMP_SUFFIX, atomic_write
from .package_errors import (DtypeError, EmptyPackageError, FingerprintMismatchError, InvalidIndicesError,
                             MetadataError, MetadataTooLargeError, NonFiniteError, NotSafetensorsError, PackageError,
                             PackageTooLargeError, PickleContentError, PreprocessingError, PreprocessingMismatchError,
                             PreprocessingUnrunnableError, ShapeMismatchError, TaskKindMismatchError,
                             TruncatedPackageError, UnknownModuleError, UnsupportedFormatError, ValueRangeError)
from .package_header import (CLASSIFICATION, DEFAULT_MAX_BYTES, FORMAT_VERSION, GENERATION, INDEX_DTYPES,
                             MAX_METADATA_CHARS, SUFFIX, TASK_ID_RE, TASK_KINDS, VALUE_DTYPES, PackageHeader,
                             PackageMeta, read_header, read_header_info, valid_task_id)
from .rowop import COLUMN, ROW, ModuleDelta
from .spec import BaseSpec

__all__ = [
    "CLASSIFICATION", "DEFAULT_MAX_BYTES", "FORMAT_VERSION", "GENERATION", "MAX_ABS_VALUE", "MAX_METADATA_CHARS",
    "SUFFIX", "TASK_ID_RE", "TASK_KINDS", "PackageHeader", "PackageMeta", "TaskPackage",
    "load_package", "package_bytes", "peek_meta", "read_header", "read_header_info", "read_package_bytes",
    "save_package", "valid_task_id",
    # re-exported: the header (package_header), the errors (package_errors) and the atomic write (atomic)
    "PackageError", "NotSafetensorsError", "TruncatedPackageError", "PickleContentError", "UnsupportedFormatError",
    "MetadataError", "PreprocessingError", "EmptyPackageError", "UnknownModuleError", "ShapeMismatchError",
    "InvalidIndicesError", "DtypeError", "NonFiniteError", "ValueRangeError", "FingerprintMismatchError",
    "PreprocessingMismatchError", "PreprocessingUnrunnableError", "PackageTooLargeError", "MetadataTooLargeError",
    "TaskKindMismatchError", "TMP_SUFFIX", "atomic_write",
]

MAX_ABS_VALUE = float(torch.finfo(torch.float16).max)  # 65504: see the module docstring

@dataclass
class TaskPackage:
    """A validated package. ``head_weight``/``head_bias`` are None for a generation package."""

    meta: PackageMeta
    deltas: dict[str, ModuleDelta]
    head_weight: torch.Tensor | None
    head_bias: torch.Tensor | None
    extra: dict[str, Any] = field(default_factory=dict)

    @property
    def task_id(self) -> str:
        return self.meta.task_id

    @property
    def kind(self) -> str:
        return self.meta.kind

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
        if self.head_weight is not None:
            out["head.weight"] = self.head_weight
            out["head.bias"] = self.head_bias
        return {k: v.detach().to("cpu").contiguous() for k, v in out.items()}

    def head(self) -> nn.Linear:
        """The task's classifier ``logits = W f + b`` as a frozen float32 ``nn.Linear`` (on the CPU)."""
        if self.head_weight is None:
            raise ValueError(f"task {self.task_id!r} is a {self.kind} package: it has no classifier head")
        out_f, in_f = self.head_weight.shape
        lin = nn.Linear(in_f, out_f)
        with torch.no_grad():
            lin.weight.copy_(self.head_weight.float())
            lin.bias.copy_(self.head_bias.float())
        return lin.requires_grad_(False)


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
# read + validate: the tensors
# ---------------------------------------------------------------------------------------------
def _fail_dtype(name: str, t: torch.Tensor, allowed) -> None:
    if t.dtype not in allowed:
        names = ", ".join(sorted(str(a).replace("torch.", "") for a in allowed))
        raise DtypeError(f"tensor {name!r} has dtype {str(t.dtype).replace('torch.', '')}; expected one of {names}")


def _check_values(name: str, t: torch.Tensor) -> None:
    """Finite and within ±MAX_ABS_VALUE (one pass: ``amax`` propagates NaN)."""
    if not t.numel():
        return
    m = float(t.detach().abs().amax())
    if not math.isfinite(m):
        raise NonFiniteError(f"tensor {name!r} contains NaN or Inf values")
    if m > MAX_ABS_VALUE:
        raise ValueRangeError(f"tensor {name!r} holds a value of magnitude {m:.3g}; the limit is {MAX_ABS_VALUE:g}")


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
    _check_values(f"{mod}.values", vals)
    if bias is not None:
        _check_values(f"{mod}.bias", bias)
    return ModuleDelta(mode=mode, indices=idx, values=vals, bias=bias)


def _check_head(tensors: dict[str, torch.Tensor], meta: PackageMeta, base: BaseSpec | None):
    """Pop and check ``head.weight``/``head.bias``: required for classification, absent for generation."""
    if meta.kind == GENERATION:
        if "head.weight" in tensors or "head.bias" in tensors:
            raise ShapeMismatchError("a generation package has no classifier head (found head tensors)")
        return None, None
    for name in ("head.weight", "head.bias"):
        if name not in tensors:
            raise ShapeMismatchError(f"package has no {name!r} tensor")
    hw, hb = tensors.pop("head.weight"), tensors.pop("head.bias")
    for name, t in (("head.weight", hw), ("head.bias", hb)):
        _fail_dtype(name, t, VALUE_DTYPES)
        _check_values(name, t)
    n_cls = len(meta.labels)
    if hw.dim() != 2 or hw.shape[0] != n_cls or hb.shape != (n_cls,):
        raise ShapeMismatchError(f"head shapes {tuple(hw.shape)}/{tuple(hb.shape)} do not match {n_cls} labels")
    if base is not None and hw.shape[1] != base.feature_dim:
        raise ShapeMismatchError(f"head expects {hw.shape[1]} features; base {base.model_id} has {base.feature_dim}")
    return hw, hb


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

    if base is not None and meta.kind != base.task_kind:
        raise TaskKindMismatchError(f"task {meta.task_id!r} is a {meta.kind} package; base {base.model_id} serves "
                                    f"{base.task_kind} tasks")

    from safetensors.torch import load as st_load

    try:
        tensors = st_load(data)
    except Exception:  # noqa: BLE001 - read_header checked the layout; anything left is a bad file
        raise NotSafetensorsError("not a readable safetensors file") from None

    hw, hb = _check_head(tensors, meta, base)

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

    if meta.kind == GENERATION and not deltas:
        raise EmptyPackageError("a generation package with no module entries changes nothing (it is the base)")
    return TaskPackage(meta=meta, deltas=deltas, head_weight=hw, head_bias=hb)


def peek_meta(source: str | os.PathLike | bytes, max_bytes: int = DEFAULT_MAX_BYTES) -> PackageMeta:
    """Validate a package's container and metadata only (no base needed) and return the metadata."""
    return load_package(source, None, max_bytes).meta
