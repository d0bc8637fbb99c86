"""What a frozen base model looks like to GRFT: its patchable modules, their shapes, its fingerprint.

A *patchable module* is an ``nn.Linear`` or ``nn.Conv2d`` whose weight can be row- (output feature /
output channel) or column- (input feature / input channel) patched. Everything that is shared by the
training half (selection, fitting) and the serving half (package validation, engine) lives here and in
:mod:`grft_serve.core.rowop`.
"""
from __future__ import annotations

import hashlib
from dataclasses import dataclass, field
from typing import Iterable

import torch
from torch import nn

__all__ = ["PATCHABLE_TYPES", "BaseSpec", "ModuleSpec", "describe_base", "fingerprint_modules", "iter_patchable",
           "module_spec", "slice_count", "slice_numel"]

PATCHABLE_TYPES = (nn.Linear, nn.Conv2d)


def slice_count(shape: tuple[int, ...], mode: str) -> int:
    """How many rows (dim 0) or columns (dim 1) a weight of ``shape`` has."""
    return int(shape[1] if mode == "column" else shape[0])


def slice_numel(shape: tuple[int, ...], mode: str) -> int:
    """Values in one row (every dim but 0) or one column (every dim but 1) of a weight of ``shape``."""
    skip = 1 if mode == "column" else 0
    n = 1
    for i, s in enumerate(shape):
        if i != skip:
            n *= int(s)
    return n


@dataclass(frozen=True)
class ModuleSpec:
    """Shape facts of one patchable module (enough to validate a package without the model)."""

    name: str
    kind: str  # "linear" | "conv"
    weight_shape: tuple[int, ...]
    has_bias: bool
    groups: int = 1

    @property
    def out_features(self) -> int:
        return self.weight_shape[0]

    @property
    def in_features(self) -> int:
        """Size of dim 1 of the weight (input features, or input channels per group for a conv)."""
        return self.weight_shape[1]

    @property
    def row_shape(self) -> tuple[int, ...]:
        return tuple(self.weight_shape[1:])

    @property
    def row_numel(self) -> int:
        return slice_numel(self.weight_shape, "row")

    def supports_columns(self) -> bool:
        """Column patching of a grouped conv would mix channels of different groups: row mode only."""
        return self.kind == "linear" or self.groups == 1

    def values_shape(self, mode: str, k: int) -> tuple[int, ...]:
        if mode == "row":
            return (k, *self.weight_shape[1:])
        return (self.weight_shape[0], k, *self.weight_shape[2:])

    def n_slices(self, mode: str) -> int:
        return slice_count(self.weight_shape, mode)

    def slice_numel(self, mode: str) -> int:
        """Values in one selected row or column (what a k of 1 costs in this module)."""
        return slice_numel(self.weight_shape, mode)

    def to_json(self) -> dict:
        return {"kind": self.kind, "weight_shape": list(self.weight_shape), "has_bias": self.has_bias,
                "groups": self.groups}


@dataclass
class BaseSpec:
    """The contract a task package is checked against: module specs, feature size, fingerprint, and
    the kind of task the base serves (``classification``: pooled features + a head per task;
    ``generation``: a causal LM's own ``lm_head`` over the patched body)."""

    model_id: str
    modules: dict[str, ModuleSpec]
    feature_dim: int
    fingerprint: str
    extra: dict = field(default_factory=dict)
    task_kind: str = "classification"


def iter_patchable(model: nn.Module, exclude: Iterable[str] = ()) -> list[tuple[str, nn.Module]]:
    """All ``nn.Linear``/``nn.Conv2d`` modules of ``model`` in definition order.

    A weight shared by several modules (tied embeddings/heads) is listed once, under its first name.
    """
    exclude = tuple(exclude)
    seen: set[int] = set()
    out = []
    for name, mod in model.named_modules():
        if not isinstance(mod, PATCHABLE_TYPES):
            continue
        if any(name == e or name.startswith(e + ".") for e in exclude):
            continue
        if id(mod.weight) in seen:
            continue
        seen.add(id(mod.weight))
        out.append((name, mod))
    return out


def module_spec(name: str, mod: nn.Module) -> ModuleSpec:
    kind = "linear" if isinstance(mod, nn.Linear) else "conv"
    return ModuleSpec(name=name, kind=kind, weight_shape=tuple(mod.weight.shape),
                      has_bias=mod.bias is not None, groups=getattr(mod, "groups", 1))


def fingerprint_modules(mods: list[tuple[str, nn.Module]]) -> str:
    """Hash of the patchable weights' names, shapes and values (float32 bytes).

    Computed on the pretrained weights before any dtype conversion, so a base loaded in fp32 for
    training and the same base served in bf16 carry the same fingerprint.
    """
    h = hashlib.blake2b(digest_size=16)
    for name, mod in mods:
        for pname in ("weight", "bias"):
            t = getattr(mod, pname, None)
            if t is None:
                continue
            h.update(f"{name}.{pname}:{tuple(t.shape)}".encode())
            h.update(t.detach().to("cpu", torch.float32).contiguous().numpy().tobytes())
    return h.hexdigest()


def describe_base(model: nn.Module, model_id: str, feature_dim: int, exclude: Iterable[str] = (),
                  fingerprint: str | None = None, task_kind: str = "classification") -> BaseSpec:
    mods = iter_patchable(model, exclude)
    specs = {n: module_spec(n, m) for n, m in mods}
    fp = fingerprint if fingerprint is not None else fingerprint_modules(mods)
    return BaseSpec(model_id=model_id, modules=specs, feature_dim=feature_dim, fingerprint=fp, task_kind=task_kind)
