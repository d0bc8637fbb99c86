"""Task residency across replicas and nodes: pins, per-replica reports, residency and cache metrics.

The state lives beside the packages, so every node that shares the store shares it too::

    <store>/.grft-state/pins/<task_id>.pin             one per pinned task (repository load / unload)
    <store>/.grft-state/replicas/<backbone>.<id>.json  what one backbone replica holds, per task

A Serve handle reaches ONE replica, so a pin is not sent to replicas: it is recorded, and each backbone
replica applies the pins of its base at its background sync (:meth:`ReplicaResidency.sync`): a pinned
task is loaded and kept on the device tier (``Engine.pin``); an unpinned one goes back to the LRU
(``Engine.unpin``). The same sync writes the replica's report (rewritten when it changes, at least
every ``HEARTBEAT_S``) and sets the per-task residency gauge and cache counters. A replica's tier of a
task is ``device`` > ``host`` > ``store`` (never loaded there); across replicas the best tier counts.
Reports older than ``STALE_S`` (a replica that is gone) are ignored, and deleted after ``PRUNE_S``.

Only a directory store (one with a ``root``) has this state; with another store, pins are refused and
residency is not reported.
"""
from __future__ import annotations

import json
import logging
import os
import re
import threading
import time
from pathlib import Path
from typing import Callable

from ..core.atomic import atomic_write
from ..core.package import valid_task_id
from . import metrics as M

__all__ = ["STATE_DIR", "TIERS", "StateDir", "ReplicaResidency", "ResidencyView"]

log = logging.getLogger("grft_serve.app")

STATE_DIR = ".grft-state"
TIERS = ("device", "host", "store")
HEARTBEAT_S = 5.0
STALE_S = 30.0
PRUNE_S = 3600.0
_RANK = {t: i for i, t in enumerate(TIERS)}


class StateDir:
    """Pins and replica reports under ``<root>/.grft-state``."""

    def __init__(self, root: str | os.PathLike):
        self.root = Path(root) / STATE_DIR
        self.pins_dir = self.root / "pins"
        self.reports_dir = self.root / "replicas"

    @classmethod
    def for_store(cls, store) -> "StateDir | None":
        root = getattr(store, "root", None)
        return cls(root) if root is not None else None

    # -- pins -------------------------------------------------------------------------------------
    def _pin_path(self, task_id: str) -> Path:
        if not valid_task_id(task_id):
            raise ValueError(f"invalid task id {task_id!r}")
        return self.pins_dir / f"{task_id}.pin"

    def pin(self, task_id: str) -> None:
        atomic_write(self._pin_path(task_id), json.dumps({"pinned_at": time.time()}).encode())

    def unpin(self, task_id: str) -> bool:
        """Remove the pin; False when there was none."""
        try:
            self._pin_path(task_id).unlink()
            return True
        except FileNotFoundError:
            return False

    def pins(self) -> set[str]:
        try:
            names = os.listdir(self.pins_dir)
        except FileNotFoundError:
            return set()
        return {n[:-4] for n in names if n.endswith(".pin") and valid_task_id(n[:-4])}

    # -- replica reports --------------------------------------------------------------------------
    def write_report(self, key: str, report: dict) -> None:
        name = re.sub(r"[^A-Za-z0-9_.-]", "_", key)
        atomic_write(self.reports_dir / f"{name}.json", json.dumps(report, separators=(",", ":")).encode())

    def reports(self, now: float | None = None) -> list[dict]:
        """Reports of live replicas (newer than ``STALE_S``); reports older than ``PRUNE_S`` are deleted."""
        now = time.time() if now is None else now
        out = []
        try:
            paths = list(self.reports_dir.glob("*.json"))
        except OSError:
            return out
        for p in paths:
            try:
                rep = json.loads(p.read_bytes())
                age = now - float(rep["at"])
            except (OSError, ValueError, KeyError, TypeError):
                continue  # vanished or half-written by an older writer: skip it this time
            if age > PRUNE_S:
                p.unlink(missing_ok=True)
            elif age <= STALE_S:
                out.append(rep)
        return out


class ReplicaResidency:
    """The replica side: applies pins, reports what this replica holds, exports per-task metrics.

    ``engine``: the replica's :class:`~grft_serve.engine.Engine`; ``load(task_id, version)`` makes the
    engine hold a task (the replica's lazy loader); ``cap``: labelled tasks in the metrics."""

    def __init__(self, engine, store, load: Callable[[str, str], None], backbone: str, replica: str,
                 cap: int = 100):
        self.engine, self.load = engine, load
        self.state = StateDir.for_store(store)
        self.backbone, self.replica = backbone, replica
        self.labels = M.TaskLabels(cap)
        self._counts: dict[str, tuple[int, int, int]] = {}  # task -> cache (hits, misses, evictions) seen
        self._exported: set[str] = set()  # residency labels set so far (zeroed when they empty)
        self._last: tuple[dict, float] = ({}, float("-inf"))
        self._lock = threading.Lock()

    def sync(self, want: dict[str, str]) -> dict:
        """One pass for ``want`` (``{task_id: version}`` of this base in the store); returns what it did."""
        with self._lock:
            pinned, failed = self._apply_pins(want)
            res = self.engine.residency()
            self._metrics(want, res)
            self._report(res)
            return {"pinned": pinned, "pin_failed": failed}

    def _apply_pins(self, want: dict[str, str]) -> tuple[list[str], list[str]]:
        if self.state is None:
            return [], []
        pins = self.state.pins() & set(want)
        res = self.engine.residency()
        pinned, failed = [], []
        for tid in sorted(pins):
            if res.get(tid, {}).get("pinned"):
                continue
            try:
                self.load(tid, want[tid])
                self.engine.pin(tid)
                pinned.append(tid)
            except Exception as e:  # noqa: BLE001 - a broken or vanished task must not stop the others
                failed.append(tid)
                log.warning("backbone %s: cannot pin task %r: %s", self.backbone, tid, getattr(e, "message", e))
        for tid, r in res.items():
            if r.get("pinned") and tid not in pins:
                try:
                    self.engine.unpin(tid)
                except KeyError:
                    pass
        return pinned, failed

    def _metrics(self, want: dict[str, str], res: dict[str, dict]) -> None:
        tags = {"backbone": self.backbone}
        # tasks this replica holds get labels first (device before host): cold tasks rarely deserve one
        for tid in sorted(res, key=lambda t: (not res[t]["pinned"], _RANK[res[t]["tier"]], t)):
            self.labels(tid)
        labelled = self.labels.labelled()
        counts: dict[str, dict[str, int]] = {}
        for tid in set(want) | set(res):
            lab = tid if tid in labelled else M.OTHER
            tier = res[tid]["tier"] if tid in res else "store"
            c = counts.setdefault(lab, dict.fromkeys(TIERS, 0))
            c[tier] += 1
        for lab in self._exported - set(counts):
            counts[lab] = dict.fromkeys(TIERS, 0)
        for lab, c in counts.items():
            for tier, n in c.items():
                M.set_gauge("grft_task_residency", n, {**tags, "task": lab, "tier": tier})
        self._exported = {lab for lab, c in counts.items() if any(c.values())}
        deltas: dict[str, list[int]] = {}
        for tid, r in res.items():
            now = (r.get("hits", 0), r.get("misses", 0), r.get("evictions", 0))
            before = self._counts.get(tid, (0, 0, 0))
            d = deltas.setdefault(tid if tid in labelled else M.OTHER, [0, 0, 0])
            for i in range(3):  # a task replaced since the last sync starts its counters again
                d[i] += now[i] - before[i] if now[i] >= before[i] else now[i]
        self._counts = {tid: (r.get("hits", 0), r.get("misses", 0), r.get("evictions", 0)) for tid, r in res.items()}
        for lab, (h, m, e) in deltas.items():
            t = {**tags, "task": lab}
            M.inc("grft_task_cache_hits", h, t)
            M.inc("grft_task_cache_misses", m, t)
            M.inc("grft_task_cache_evictions", e, t)

    def _report(self, res: dict[str, dict]) -> None:
        if self.state is None:
            return
        tasks = {tid: {"tier": r["tier"], "pinned": r["pinned"], "version": r["version"]} for tid, r in res.items()}
        last, at = self._last
        if tasks == last and time.monotonic() - at < HEARTBEAT_S:
            return
        report = {"backbone": self.backbone, "replica": self.replica, "node": _node_id(), "pid": os.getpid(),
                  "at": time.time(), "tasks": tasks}
        try:
            self.state.write_report(f"{self.backbone}.{self.replica}", report)
            self._last = (tasks, time.monotonic())
        except OSError as e:
            log.warning("backbone %s: cannot write the residency report: %s", self.backbone, e)


def _node_id() -> str | None:
    try:
        import ray

        return ray.get_runtime_context().get_node_id() if ray.is_initialized() else None
    except Exception:  # noqa: BLE001 - outside a Ray worker
        return None


class ResidencyView:
    """The ingress side: pins and the merged live reports, re-read at most every ``ttl_s``."""

    def __init__(self, state: StateDir | None, ttl_s: float = 1.0):
        self.state, self.ttl_s = state, ttl_s
        self._at = float("-inf")
        self._pins: set[str] = set()
        self._tasks: dict[str, dict[str, str]] = {}  # task -> {"<backbone>/<replica>": tier}
        self._replicas: dict[str, list[dict]] = {}  # backbone -> live reports
        self._lock = threading.Lock()

    def refresh(self, force: bool = False) -> None:
        if self.state is None:
            return
        with self._lock:
            if not force and time.monotonic() - self._at < self.ttl_s:
                return
            reports = self.state.reports()
            tasks: dict[str, dict[str, str]] = {}
            replicas: dict[str, list[dict]] = {}
            for rep in reports:
                replicas.setdefault(rep["backbone"], []).append(rep)
                for tid, r in rep.get("tasks", {}).items():
                    tasks.setdefault(tid, {})[f"{rep['backbone']}/{rep['replica']}"] = r["tier"]
            self._pins, self._tasks, self._replicas = self.state.pins(), tasks, replicas
            self._at = time.monotonic()

    def of(self, task_id: str) -> dict:
        """``{"residency": {"tier", "replicas": {replica: tier}}, "pinned": bool}`` of one task."""
        if self.state is None:
            return {}
        self.refresh()
        reps = self._tasks.get(task_id, {})
        best = min((_RANK[t] for t in reps.values()), default=_RANK["store"])
        return {"residency": {"tier": TIERS[best], "replicas": dict(sorted(reps.items()))},
                "pinned": task_id in self._pins}

    def applied(self, task_id: str, backbone: str, pinned: bool) -> bool:
        """Whether every live replica of ``backbone`` reports ``task_id`` pinned (or, for ``pinned=False``,
        none does); fresh reads."""
        self.refresh(force=True)
        reps = self._replicas.get(backbone, [])
        return bool(reps) and all(bool(r.get("tasks", {}).get(task_id, {}).get("pinned")) == pinned for r in reps)
