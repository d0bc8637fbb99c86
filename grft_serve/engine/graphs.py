"""CUDA graphs of the backbone forward, one per (path, batch-size bucket, input signature).

A graph replays the kernels of one forward with fixed tensor addresses, which removes the per-kernel
launch cost that dominates small batches. Both paths fit that shape:

- **patch**: the graph is the plain base forward. Patching writes the task's rows into the flat
  weight buffers *in place* before the replay and restores them after, so the same graph serves every
  task. Tasks that attach a bias to bias-free modules get their own graphs, keyed by those modules.
- **override**: the graph is captured with *static* plans (:func:`~grft_serve.engine.plan.module_plans`
  with ``static=True``: whole slot tables, mask and bias always applied — exact for any slot
  contents), and the per-sample slot index is a static input. Writing a task into a slot changes no
  address; a table reallocation bumps ``SlotTables.generation``, which is part of the key, so stale
  graphs are never replayed.

Batches are padded to the next bucket by repeating their first sample (its outputs are dropped).
Without CUDA (``capture=False``) the runner executes the same static-buffer code eagerly, which keeps
that code path tested on CPU; the engine's default eager path is unchanged either way. A capture that
fails (e.g. a model that syncs with the host inside its forward) marks its key as eager-only.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Callable, Sequence

import torch

from ..core.backbones import Backbone
from ..core.rowop import RowOpHooks
from .plan import applied, module_plans
from .slots import SlotTables

__all__ = ["GraphRunner"]

BUCKETS = (1, 2, 4, 8, 16, 32, 64, 128, 256)


def _signature(batch: Any) -> tuple:
    if isinstance(batch, dict):
        return tuple((k, tuple(v.shape[1:]), v.dtype) for k, v in sorted(batch.items()))
    return (tuple(batch.shape[1:]), batch.dtype)


def _pad(batch: Any, size: int) -> Any:
    """``batch`` padded to ``size`` samples by repeating its first sample."""
    n = Backbone.batch_len(batch)
    if n == size:
        return batch
    idx = torch.cat([torch.arange(n), torch.zeros(size - n, dtype=torch.long)])
    dev = batch["input_ids"].device if isinstance(batch, dict) else batch.device
    return Backbone.batch_select(batch, idx.to(dev))


def _copy_into(dst: Any, src: Any) -> None:
    if isinstance(dst, dict):
        for k in dst:
            dst[k].copy_(src[k])
    else:
        dst.copy_(src)


@dataclass
class _Graph:
    inputs: Any
    sample_slot: torch.Tensor | None
    run: Callable[[], torch.Tensor]
    graph: Any = None  # torch.cuda.CUDAGraph when captured
    out: torch.Tensor | None = None
    uses: int = field(default=0)

    def replay(self) -> torch.Tensor:
        self.uses += 1
        if self.graph is None:
            return self.run()
        self.graph.replay()
        return self.out


class GraphRunner:
    """Captured forwards of ``backbone`` on ``device`` (see the module docstring); the override graphs
    read the slot ``tables`` through the row-op ``hooks``."""

    def __init__(self, backbone: Callable[[Any], torch.Tensor], device: torch.device, tables: SlotTables,
                 hooks: RowOpHooks, buckets: Sequence[int] = BUCKETS, capture: bool | None = None):
        self.backbone, self.device, self.tables, self.hooks = backbone, torch.device(device), tables, hooks
        self.buckets = sorted(buckets)
        self.capture = self.device.type == "cuda" if capture is None else capture
        self._graphs: dict[tuple, _Graph] = {}
        self._eager_only: set[tuple] = set()
        self.captures = 0
        self.failures = 0

    def bucket(self, n: int) -> int | None:
        return next((b for b in self.buckets if b >= n), None)

    def run(self, batch: Any, path: str, free_bias: tuple = (), sample_slot: torch.Tensor | None = None):
        """Features of ``batch`` from a graph (captured on first use), or None: run it eagerly."""
        n = Backbone.batch_len(batch)
        size = self.bucket(n)
        if size is None:
            return None
        gen = self.tables.generation if path == "override" else 0
        key = (path, size, _signature(batch), tuple(free_bias), gen)
        if key in self._eager_only:
            return None
        g = self._graphs.get(key)
        if g is None:
            g = self._make(key, _pad(batch, size), path)
            if g is None:
                return None
        _copy_into(g.inputs, _pad(batch, size))
        if g.sample_slot is not None:  # padding samples reuse the first sample's slot
            g.sample_slot[:n].copy_(sample_slot)
            g.sample_slot[n:].copy_(sample_slot[:1].expand(size - n))
        return g.replay()[:n].clone()  # the static output is overwritten by the next replay

    def _make(self, key: tuple, batch: Any, path: str) -> _Graph | None:
        dev = self.device
        if path == "override":
            for k in [k for k in self._graphs if k[0] == "override" and k[4] != key[4]]:
                del self._graphs[k]  # stale: the slot tables were reallocated
        inputs = Backbone.batch_select(batch, torch.arange(Backbone.batch_len(batch), device=dev))  # own copy
        sample_slot = torch.zeros(key[1], dtype=torch.long, device=dev) if path == "override" else None

        def run() -> torch.Tensor:
            if sample_slot is None:
                return self.backbone(inputs)
            with applied(self.hooks, module_plans(self.tables, range(self.tables.capacity), sample_slot, static=True)):
                return self.backbone(inputs)

        g = _Graph(inputs, sample_slot, run)
        if self.capture:
            try:
                s = torch.cuda.Stream(dev)
                s.wait_stream(torch.cuda.current_stream(dev))
                with torch.cuda.stream(s):
                    for _ in range(2):
                        run()
                torch.cuda.current_stream(dev).wait_stream(s)
                graph = torch.cuda.CUDAGraph()
                with torch.cuda.graph(graph):  # a private pool: graphs replay in any order
                    g.out = run()
                g.graph = graph
                self.captures += 1
            except Exception:  # noqa: BLE001 - a model that cannot be captured runs eagerly
                self.failures += 1
                self._eager_only.add(key)  # (the hooks are idle again: ``applied`` clears them)
                return None
        self._graphs[key] = g
        return g

    def stats(self) -> dict:
        return {"graphs": len(self._graphs), "graph_captures": self.captures, "graph_failures": self.failures,
                "graph_replays": sum(g.uses for g in self._graphs.values())}
