"""The serving engine: ONE frozen base on one device, any number of GRFT tasks.

Two ways to run a batch (both bit-exact with respect to the base; see ``tests/test_engine.py``):

- **patch** (one task in the batch): the task's rows are written into the base weights with
  ``index_copy_`` and the pretrained rows restored in a ``finally``. All patchable weights are views
  into a few flat buffers grouped by row length (and one flat bias buffer), so a whole-task patch or
  restore is a handful of ``index_copy_`` calls, not one per layer.
- **override** (several tasks in the batch): no weight is touched; forward hooks correct each
  patchable layer's output per sample (:mod:`grft_serve.rowop`), one pass whatever the task count.

Task tiers: store (disk, :mod:`grft_serve.store`) → host (one contiguous, pinned-on-CUDA buffer per
task) → device (the same buffer uploaded with ONE copy, LRU-capped in bytes). One lock guards weight
mutation and the forward, so the override path never sees half-patched weights; package parsing and
validation happen outside it.
"""
from __future__ import annotations

import json
import threading
import time
from collections import OrderedDict
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any, Literal, Sequence

import torch
import torch.nn.functional as F
from torch import nn

from .backbones import Backbone
from .base import BaseSpec, fingerprint_modules, iter_patchable
from .package import DEFAULT_MAX_BYTES, PackageMeta, PreprocessingMismatchError, TaskPackage, load_package, package_bytes, read_package_bytes
from .rowop import COLUMN, ROW, ModuleDelta, RowOpHooks, build_mixed_plan
from .store import TaskStore, content_version

Path_ = Literal["auto", "patch", "override"]
_ALIGN = 64


class UnknownTaskError(KeyError):
    """No task with this id is registered in the engine."""

    def __str__(self) -> str:  # KeyError quotes its message; keep it readable
        return str(self.args[0]) if self.args else "unknown task"


class TaskExistsError(KeyError):
    def __str__(self) -> str:
        return str(self.args[0]) if self.args else "task exists"


@dataclass
class TaskInfo:
    task_id: str
    version: str
    meta: PackageMeta
    num_params: int
    nbytes: int
    registered_at: float = field(default_factory=time.time)

    def to_json(self) -> dict:
        return {"task_id": self.task_id, "version": self.version, "labels": self.meta.labels,
                "mode": self.meta.mode, "base_model_id": self.meta.base_model_id,
                "num_params": self.num_params, "bytes": self.nbytes, "metrics": self.meta.metrics,
                "preprocessing": self.meta.preprocessing, "registered_at": self.registered_at}


# ---------------------------------------------------------------------------------------------
# one contiguous buffer per task per tier
# ---------------------------------------------------------------------------------------------
class _Packed:
    """Named tensors laid out in one uint8 buffer, so moving a task between tiers is one copy."""

    def __init__(self, buf: torch.Tensor, layout: dict[str, tuple[torch.dtype, tuple[int, ...], int]],
                 modes: dict[str, str]):
        self.buf, self.layout, self.modes = buf, layout, modes

    @classmethod
    def pack(cls, tensors: dict[str, torch.Tensor], modes: dict[str, str], pin: bool) -> "_Packed":
        layout, off = {}, 0
        for name, t in tensors.items():
            layout[name] = (t.dtype, tuple(t.shape), off)
            off += -(-t.numel() * t.element_size() // _ALIGN) * _ALIGN
        buf = torch.empty(max(off, _ALIGN), dtype=torch.uint8, pin_memory=pin)
        for name, t in tensors.items():
            dt, shape, o = layout[name]
            n = t.numel() * t.element_size()
            buf[o:o + n].copy_(t.detach().contiguous().view(-1).view(torch.uint8))
        return cls(buf, layout, modes)

    @property
    def nbytes(self) -> int:
        return self.buf.numel()

    def to(self, device) -> "_Packed":
        return _Packed(self.buf.to(device, non_blocking=True, copy=True), self.layout, self.modes)

    def views(self) -> dict[str, torch.Tensor]:
        out = {}
        for name, (dt, shape, o) in self.layout.items():
            n = 1
            for s in shape:
                n *= s
            esz = torch.empty((), dtype=dt).element_size()
            out[name] = self.buf[o:o + n * esz].view(dt).view(shape)
        return out


@dataclass
class _Resident:
    """A task materialised on one tier: per-module deltas plus the flat-buffer patch lists."""

    packed: _Packed
    deltas: dict[str, ModuleDelta]
    row_groups: list[tuple[int, torch.Tensor, torch.Tensor]]  # (group id, global idx, rows)
    bias_patch: tuple[torch.Tensor, torch.Tensor] | None  # (global idx into bias buffer, values)
    head_w: torch.Tensor
    head_b: torch.Tensor


# ---------------------------------------------------------------------------------------------
# the engine
# ---------------------------------------------------------------------------------------------
class Engine:
    """Serve many GRFT tasks from one frozen ``backbone``.

    ``device_cache_bytes`` caps the task bytes kept on the device (LRU); ``max_package_bytes`` caps
    accepted packages. ``dtype`` is the serving dtype (e.g. ``torch.bfloat16`` on CUDA).
    """

    def __init__(self, backbone: Backbone, device: str | torch.device = "cpu", dtype: torch.dtype | None = None,
                 device_cache_bytes: int = 1 << 30, max_package_bytes: int = DEFAULT_MAX_BYTES,
                 device_tier: bool | None = None):
        self.backbone = backbone
        self.device = torch.device(device)
        self.max_package_bytes = max_package_bytes
        self.device_cache_bytes = int(device_cache_bytes)
        mods = iter_patchable(backbone, backbone.exclude_from_patching())
        # the fingerprint is taken on the pretrained weights before any dtype conversion
        self.spec: BaseSpec = backbone.describe(fingerprint=fingerprint_modules(mods))
        backbone.to(device=self.device, dtype=dtype).eval().requires_grad_(False)
        self.dtype = dtype or next(backbone.parameters()).dtype
        self.modules: dict[str, nn.Module] = dict(mods)
        self._build_flat_buffers()
        self.hooks = RowOpHooks(self.modules)
        self._pin = self.device.type == "cuda"
        # on CPU the host copy is already where the model is; ``device_tier=True`` keeps a separate
        # LRU tier anyway (tests exercise eviction without a GPU)
        self.device_tier = self.device.type != "cpu" if device_tier is None else device_tier
        self._lock = threading.RLock()
        self._tasks: dict[str, TaskInfo] = {}
        self._host: dict[str, _Resident] = {}
        self._dev: OrderedDict[str, _Resident] = OrderedDict()
        self._dev_bytes = 0
        self.counters = {"batches": 0, "samples": 0, "patch_batches": 0, "override_batches": 0,
                         "cache_hits": 0, "cache_misses": 0, "cache_evictions": 0}

    # -- flat buffers ---------------------------------------------------------------------------
    def _build_flat_buffers(self) -> None:
        """Re-home every patchable weight as a view into one flat buffer per row length."""
        by_len: dict[int, list[str]] = {}
        for name, m in self.modules.items():
            by_len.setdefault(m.weight[0].numel(), []).append(name)
        self.row_buffers: list[torch.Tensor] = []
        self.row_offset: dict[str, tuple[int, int]] = {}  # module -> (group id, first row)
        for gid, (n, names) in enumerate(sorted(by_len.items())):
            total = sum(self.modules[nm].weight.shape[0] for nm in names)
            buf = torch.empty(total, n, dtype=self.dtype, device=self.device)
            off = 0
            for nm in names:
                m = self.modules[nm]
                rows = m.weight.shape[0]
                buf[off:off + rows].copy_(m.weight.detach().reshape(rows, n))
                m.weight = nn.Parameter(buf[off:off + rows].view(m.weight.shape), requires_grad=False)
                self.row_offset[nm] = (gid, off)
                off += rows
            self.row_buffers.append(buf)
        with_bias = [nm for nm, m in self.modules.items() if m.bias is not None]
        total = sum(self.modules[nm].bias.numel() for nm in with_bias)
        self.bias_buffer = torch.empty(max(total, 1), dtype=self.dtype, device=self.device)
        self.bias_offset: dict[str, int] = {}
        off = 0
        for nm in with_bias:
            m = self.modules[nm]
            n = m.bias.numel()
            self.bias_buffer[off:off + n].copy_(m.bias.detach())
            m.bias = nn.Parameter(self.bias_buffer[off:off + n], requires_grad=False)
            self.bias_offset[nm] = off
            off += n

    # -- registration ---------------------------------------------------------------------------
    def register(self, source: str | bytes | TaskPackage | Any, replace: bool = False,
                 version: str | None = None) -> TaskInfo:
        """Validate and register a task package (path, bytes or :class:`TaskPackage`).

        Raises a ``PackageError`` subclass for a bad package, :class:`TaskExistsError` when the id is
        taken and ``replace`` is false. On any error the engine is unchanged.
        """
        data = package_bytes(source) if isinstance(source, TaskPackage) else \
            read_package_bytes(source, self.max_package_bytes)
        pkg = self.validate(data)
        version = version or content_version(data)
        with self._lock:  # column deltas read base weights: never while a patch is applied
            if pkg.task_id in self._tasks and not replace:
                raise TaskExistsError(f"task {pkg.task_id!r} is already registered; pass replace to overwrite")
            host = self._materialise(self._pack(pkg))
            info = TaskInfo(pkg.task_id, version, pkg.meta, pkg.num_params(), host.packed.nbytes)
            self._drop_device(pkg.task_id)
            self._tasks[pkg.task_id] = info
            self._host[pkg.task_id] = host
        return info

    def validate(self, data: bytes) -> TaskPackage:
        """Everything :meth:`register` checks, without registering: the package against this base
        (see :func:`~grft_serve.package.load_package`) and its preprocessing against the backbone."""
        pkg = load_package(data, base=self.spec, max_bytes=self.max_package_bytes)
        why = self.backbone.check_preprocessing(pkg.meta.preprocessing)
        if why is not None:
            raise PreprocessingMismatchError(why)
        return pkg

    def unregister(self, task_id: str) -> None:
        with self._lock:
            if task_id not in self._tasks:
                raise UnknownTaskError(f"unknown task {task_id!r}")
            self._drop_device(task_id)
            del self._tasks[task_id], self._host[task_id]

    def tasks(self) -> list[TaskInfo]:
        with self._lock:
            return list(self._tasks.values())

    def task(self, task_id: str) -> TaskInfo:
        try:
            return self._tasks[task_id]
        except KeyError:
            raise UnknownTaskError(f"unknown task {task_id!r}") from None

    def sync(self, store: TaskStore, versions: dict[str, str] | None = None) -> dict[str, list[str]]:
        """Make the registered tasks equal the store's (new/changed loaded, missing dropped).

        ``versions`` (default ``store.versions()``) is the wanted ``{task_id: version}``, e.g. the
        store's listing filtered to the tasks of this base."""
        want = store.versions() if versions is None else versions
        added, removed, failed = [], [], []
        for tid, v in want.items():
            cur = self._tasks.get(tid)
            if cur is not None and cur.version == v:
                continue
            try:
                self.register(store.get(tid), replace=True, version=v)
                added.append(tid)
            except Exception:  # noqa: BLE001 - a bad or vanished file must not stop the others
                failed.append(tid)
        for tid in [t for t in list(self._tasks) if t not in want]:
            try:
                self.unregister(tid)
                removed.append(tid)
            except UnknownTaskError:
                pass
        return {"added": added, "removed": removed, "failed": failed}

    def _pack(self, pkg: TaskPackage) -> _Packed:
        dt = self.dtype
        t: dict[str, torch.Tensor] = {}
        groups: dict[int, tuple[list, list]] = {}
        bias_idx, bias_val = [], []
        for name, d in pkg.deltas.items():
            m = self.modules[name]
            t[f"{name}.indices"] = d.indices
            if d.mode == ROW:
                gid, off = self.row_offset[name]
                gi, gv = groups.setdefault(gid, ([], []))
                gi.append(d.indices + off)
                gv.append(d.values.to(dt).reshape(d.k, -1))
            else:
                t[f"{name}.values"] = d.values.to(dt)
                base_cols = m.weight.detach().index_select(1, d.indices.to(self.device)).float().cpu()
                t[f"{name}.col_delta"] = (d.values.float() - base_cols).to(dt)
            if d.mode == ROW:  # bias of the selected rows (zeros without one): no per-batch allocs
                b = d.bias if d.bias is not None else m.bias.detach().float().cpu() if m.bias is not None \
                    else torch.zeros(m.weight.shape[0])
                t[f"{name}.sel_bias"] = b.index_select(0, d.indices).to(dt)
            if d.bias is not None:
                t[f"{name}.bias"] = d.bias.to(dt)
                if m.bias is not None:
                    t[f"{name}.bias_delta"] = (d.bias.float() - m.bias.detach().float().cpu()).to(dt)
                o = self.bias_offset[name]
                bias_idx.append(torch.arange(o, o + d.bias.numel()))
                bias_val.append(d.bias.to(dt))
        for gid, (gi, gv) in sorted(groups.items()):
            t[f"g{gid}.idx"] = torch.cat(gi)
            t[f"g{gid}.rows"] = torch.cat(gv)
        if bias_idx:
            t["bias.idx"] = torch.cat(bias_idx)
            t["bias.values"] = torch.cat(bias_val)
        t["head.weight"] = pkg.head_weight.to(dt)
        t["head.bias"] = pkg.head_bias.to(dt)
        return _Packed.pack(t, {n: d.mode for n, d in pkg.deltas.items()}, pin=self._pin)

    def _materialise(self, packed: _Packed) -> _Resident:
        v = packed.views()
        modes = packed.modes
        deltas: dict[str, ModuleDelta] = {}
        row_groups = []
        cursor: dict[int, int] = {}
        for name, mode in modes.items():
            idx = v[f"{name}.indices"]
            bias = v.get(f"{name}.bias")
            if mode == ROW:
                gid, _ = self.row_offset[name]
                s = cursor.get(gid, 0)
                k = idx.numel()
                rows = v[f"g{gid}.rows"][s:s + k].view(k, *self.modules[name].weight.shape[1:])
                cursor[gid] = s + k
                deltas[name] = ModuleDelta(ROW, idx, rows, bias)
            else:
                deltas[name] = ModuleDelta(COLUMN, idx, v[f"{name}.values"], bias, v[f"{name}.col_delta"])
            deltas[name].sel_bias = v.get(f"{name}.sel_bias")
            deltas[name].bias_delta = v.get(f"{name}.bias_delta")
        for gid in sorted(cursor):
            row_groups.append((gid, v[f"g{gid}.idx"], v[f"g{gid}.rows"]))
        bias_patch = (v["bias.idx"], v["bias.values"]) if "bias.idx" in v else None
        return _Resident(packed, deltas, row_groups, bias_patch, v["head.weight"], v["head.bias"])

    # -- device tier ----------------------------------------------------------------------------
    def _drop_device(self, task_id: str) -> None:
        r = self._dev.pop(task_id, None)
        if r is not None:
            self._dev_bytes -= r.packed.nbytes

    def _resident(self, task_id: str, keep: Sequence[str]) -> _Resident:
        host = self._host.get(task_id)
        if host is None:
            raise UnknownTaskError(f"unknown task {task_id!r}")
        if not self.device_tier:
            return host
        r = self._dev.get(task_id)
        if r is not None:
            self._dev.move_to_end(task_id)
            self.counters["cache_hits"] += 1
            return r
        self.counters["cache_misses"] += 1
        need = host.packed.nbytes
        for tid in list(self._dev):
            if self._dev_bytes + need <= self.device_cache_bytes:
                break
            if tid in keep:
                continue
            self._drop_device(tid)
            self.counters["cache_evictions"] += 1
        r = self._materialise(host.packed.to(self.device))  # ONE host-to-device copy
        self._dev[task_id] = r
        self._dev_bytes += need
        return r

    def device_cache(self) -> dict:
        with self._lock:
            return {"tasks": list(self._dev), "bytes": self._dev_bytes, "capacity": self.device_cache_bytes}

    # -- patch path -----------------------------------------------------------------------------
    @contextmanager
    def patched(self, r: _Resident):
        """Write ``r``'s rows/columns/biases into the base; restore the pretrained values on exit."""
        saved: list = []
        try:
            for gid, gidx, rows in r.row_groups:
                buf = self.row_buffers[gid]
                saved.append(("g", buf, gidx, buf.index_select(0, gidx)))
                buf.index_copy_(0, gidx, rows)
            for name, d in r.deltas.items():
                if d.mode == COLUMN:
                    w = self.modules[name].weight
                    saved.append(("c", w, d.indices, w.index_select(1, d.indices)))
                    w.index_copy_(1, d.indices, d.values)
            if r.bias_patch is not None:
                bidx, bval = r.bias_patch
                saved.append(("g", self.bias_buffer, bidx, self.bias_buffer.index_select(0, bidx)))
                self.bias_buffer.index_copy_(0, bidx, bval)
            yield
        finally:
            for kind, t, idx, old in reversed(saved):
                t.index_copy_(0 if kind == "g" else 1, idx, old)

    # -- forward --------------------------------------------------------------------------------
    @torch.inference_mode()
    def forward(self, batch: Any, task_ids: Sequence[str], path: Path_ = "auto") -> tuple[list[torch.Tensor], list[str]]:
        """Logits per sample (float32, CPU; each task has its own classes) and the task versions used.

        ``batch`` is a preprocessed batch (see :meth:`Backbone.preprocess`) of ``len(task_ids)``.
        """
        n = Backbone.batch_len(batch)
        if n != len(task_ids):
            raise ValueError(f"batch has {n} samples but {len(task_ids)} task ids")
        unique = list(dict.fromkeys(task_ids))
        slot = {t: i for i, t in enumerate(unique)}
        with self._lock:
            for t in unique:
                if t not in self._tasks:
                    raise UnknownTaskError(f"unknown task {t!r}")
            versions = [self._tasks[t].version for t in task_ids]
            res = [self._resident(t, unique) for t in unique]
            batch = Backbone.batch_to(batch, self.device, self.dtype)
            # per-task sample lists are built on the host: no device syncs for the routing
            groups: list[list[int]] = [[] for _ in unique]
            for i, t in enumerate(task_ids):
                groups[slot[t]].append(i)
            sel = [torch.tensor(g, device=self.device) for g in groups]
            use_patch = path == "patch" or (path == "auto" and len(unique) == 1)
            if use_patch:
                parts = []
                for i, r in enumerate(res):
                    sub = batch if len(unique) == 1 else Backbone.batch_select(batch, sel[i])
                    with self.patched(r):
                        parts.append(self.backbone(sub))
                self.counters["patch_batches"] += 1
            else:
                sample_task = torch.tensor([slot[t] for t in task_ids], device=self.device)
                try:
                    self.hooks.active.update(self.mixed_plans(res, sample_task))
                    feats = self.backbone(batch)
                finally:
                    self.hooks.active.clear()
                parts = [feats if len(unique) == 1 else feats.index_select(0, s) for s in sel]
                self.counters["override_batches"] += 1
            logits = self.heads(parts, res, groups)
            self.counters["batches"] += 1
            self.counters["samples"] += n
        return logits, versions  # type: ignore[return-value]

    def mixed_plans(self, res: Sequence[_Resident], sample_task: torch.Tensor) -> dict:
        """Per-module :class:`MixedPlan` for a batch over the tasks ``res`` (modules no task touches
        are left out, so their hooks stay idle)."""
        plans = {}
        for name, m in self.modules.items():
            plan = build_mixed_plan(m, [r.deltas.get(name) for r in res], sample_task)
            if plan is not None:
                plans[name] = plan
        return plans

    @staticmethod
    def heads(parts: Sequence[torch.Tensor], res: Sequence[_Resident], groups: Sequence[list[int]]) -> list:
        """Each task's head on its samples' features; ONE device-to-host copy for the whole batch."""
        outs = [F.linear(f.to(r.head_w.dtype), r.head_w, r.head_b).float().flatten() for f, r in zip(parts, res)]
        flat = torch.cat(outs).cpu() if len(outs) > 1 else outs[0].cpu()
        logits: list = [None] * sum(len(g) for g in groups)
        pos = 0
        for g, r in zip(groups, res):
            c = r.head_w.shape[0]
            block = flat[pos:pos + len(g) * c].view(len(g), c)
            pos += len(g) * c
            for j, s in enumerate(g):
                logits[s] = block[j]
        return logits

    def predict(self, raw_inputs: Sequence[Any], task_ids: Sequence[str], top_k: int = 5,
                path: Path_ = "auto") -> list[dict]:
        """Preprocess raw inputs (PIL images / strings), run them, and format per-input answers."""
        # inputs are prepared the way each task was trained; tasks sharing a preprocessing (the
        # usual case) share one forward
        by_prep: dict[str, list[int]] = {}
        preps: dict[str, dict] = {}
        for i, t in enumerate(task_ids):
            prep = self.task(t).meta.preprocessing
            key = json.dumps(prep, sort_keys=True, default=str)
            by_prep.setdefault(key, []).append(i)
            preps[key] = prep
        logits: list = [None] * len(task_ids)
        versions: list = [None] * len(task_ids)
        for key, idx in by_prep.items():
            batch = self.backbone.preprocess([raw_inputs[i] for i in idx], preps[key])
            lg, ver = self.forward(batch, [task_ids[i] for i in idx], path=path)
            for j, i in enumerate(idx):
                logits[i], versions[i] = lg[j], ver[j]
        out = []
        for lg, tid, ver in zip(logits, task_ids, versions):
            labels = self._tasks[tid].meta.labels if tid in self._tasks else [str(i) for i in range(lg.numel())]
            p = lg.softmax(-1)
            k = min(top_k, p.numel())
            sc, ix = p.topk(k)
            out.append({"task": tid, "version": ver, "label": labels[int(ix[0])], "score": float(sc[0]),
                        "top_k": [{"label": labels[int(i)], "score": float(s)} for s, i in zip(sc, ix)]})
        return out

    def stats(self) -> dict:
        with self._lock:
            return {**self.counters, "tasks": len(self._tasks), "device_cache_bytes": self._dev_bytes}
