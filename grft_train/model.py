"""A frozen backbone + one task's row deltas (through :class:`grft_serve.core.rowop.RowOpHooks`) + a head.

Training and evaluation share this forward: training passes ``nn.Parameter`` values, evaluation
the tensors of a loaded :class:`grft_serve.core.package.TaskPackage`. The backbone's own weights are
never written; the hooks compute the patched outputs from the frozen ones.
"""
from __future__ import annotations

from contextlib import contextmanager
from typing import Iterator

import torch
from torch import nn

from grft_serve.core.backbones import Backbone
from grft_serve.core.package import TaskPackage
from grft_serve.core.rowop import ModuleDelta, RowOpHooks

__all__ = ["TaskModel"]


def _key(name: str) -> str:
    return name.replace(".", "__")


class TaskModel(nn.Module):
    """``logits = head(backbone(batch))`` with ``deltas`` applied to the backbone's modules.

    ``values``/``biases`` (dicts module -> tensor) become parameters when ``trainable``. A generation
    task has no head (``head=None``): its outputs are the backbone's own (a causal LM's logits);
    :meth:`applied` runs any code on the patched backbone (the answer-token loss, ``generate()``).
    """

    def __init__(self, backbone: Backbone, mode: str, indices: dict[str, torch.Tensor],
                 values: dict[str, torch.Tensor], biases: dict[str, torch.Tensor | None],
                 head: nn.Linear | None, trainable: bool = True):
        super().__init__()
        self.backbone = backbone
        self.mode = mode
        self.names = list(indices)
        self.head = head
        dev = next(backbone.parameters()).device
        for n, idx in indices.items():
            self.register_buffer(f"idx__{_key(n)}", idx.to(device=dev, dtype=torch.int64), persistent=False)
        self.values = nn.ParameterDict() if trainable else {}
        self.biases = nn.ParameterDict() if trainable else {}
        for n in self.names:
            v = values[n].to(dev)
            b = biases.get(n)
            if trainable:
                self.values[_key(n)] = nn.Parameter(v.clone())
                if b is not None:
                    self.biases[_key(n)] = nn.Parameter(b.to(dev).clone())
            else:
                self.values[_key(n)] = v
                if b is not None:
                    self.biases[_key(n)] = b.to(dev)
        self.hooks = RowOpHooks({n: backbone.get_submodule(n) for n in self.names})

    # -- deltas --------------------------------------------------------------------------------
    def indices(self, name: str) -> torch.Tensor:
        return getattr(self, f"idx__{_key(name)}")

    def value(self, name: str) -> torch.Tensor:
        return self.values[_key(name)]

    def bias(self, name: str) -> torch.Tensor | None:
        k = _key(name)
        return self.biases[k] if k in self.biases else None

    def deltas(self) -> dict[str, ModuleDelta]:
        return {n: ModuleDelta(mode=self.mode, indices=self.indices(n), values=self.value(n), bias=self.bias(n))
                for n in self.names}

    # -- forward -------------------------------------------------------------------------------
    @contextmanager
    def applied(self) -> Iterator["TaskModel"]:
        """The task's deltas are active on the backbone's modules inside the block (and only there)."""
        self.hooks.active = self.deltas()
        try:
            yield self
        finally:
            self.hooks.active = {}

    def features(self, batch) -> torch.Tensor:
        with self.applied():
            return self.backbone(batch)

    def forward(self, batch) -> torch.Tensor:
        f = self.features(batch)
        return self.head(f) if self.head is not None else f

    def train(self, mode: bool = True):
        """Only the head follows train/eval; the frozen backbone always runs in eval mode
        (batch-norm statistics and dropout of the base model stay as served)."""
        super().train(mode)
        self.backbone.eval()
        return self

    def close(self) -> None:
        self.hooks.remove()

    @classmethod
    def from_package(cls, backbone: Backbone, pkg: TaskPackage) -> "TaskModel":
        head = pkg.head() if pkg.head_weight is not None else None
        dev = next(backbone.parameters()).device
        dt = next(backbone.parameters()).dtype
        idx = {n: d.indices for n, d in pkg.deltas.items()}
        vals = {n: d.values.to(dt) for n, d in pkg.deltas.items()}
        biases = {n: (d.bias.to(dt) if d.bias is not None else None) for n, d in pkg.deltas.items()}
        return cls(backbone, pkg.meta.mode, idx, vals, biases, head.to(dev) if head is not None else None,
                   trainable=False)
