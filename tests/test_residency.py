"""Pins, replica reports and per-task residency metrics with real backbone servers (no Ray): two
servers on one store stand for two replicas; a pin recorded once is applied by both at their sync."""
from __future__ import annotations

import json
import time

import pytest
from app_fixtures import SEED, VIT_CFG, build_local_backbone

from grft_serve.app import BackboneServer
from grft_serve.app import metrics as M
from grft_serve.app.answers import predict
from grft_serve.app.residency import STALE_S, ResidencyView, StateDir
from grft_serve.core.package import package_bytes
from grft_serve.store import DirectoryTaskStore
from grft_serve.testing import random_package


@pytest.fixture(scope="module")
def two(tmp_path_factory):
    root = tmp_path_factory.mktemp("residency")
    store = DirectoryTaskStore(root)
    bb = build_local_backbone(VIT_CFG)
    for i, t in enumerate(["a", "b", "c", "d", "e"]):
        store.put(t, package_bytes(random_package(bb, t, seed=i)))
    spec = {"name": "vit", "backbone": VIT_CFG, "seed": SEED, "device": "cpu", "max_batch_size": 4}
    srvs = [BackboneServer(spec, {"path": str(root)}, {}, sync_interval_s=3600, metrics_task_label_cap=2)
            for _ in range(2)]
    for i, s in enumerate(srvs):  # two replicas in one process: give them distinct ids
        s.replica = s.residency.replica = f"r{i}"
    yield store, srvs
    for s in srvs:
        s.close()


def test_pin_reaches_every_replica_and_unpin_releases(two):
    store, srvs = two
    state, view = StateDir(store.root), ResidencyView(StateDir(store.root), ttl_s=0)
    state.pin("b")
    assert all(s.sync()["pinned"] == ["b"] for s in srvs)
    for s in srvs:
        r = s.engine.residency()["b"]
        assert r["pinned"] and r["tier"] == "device"
    out = view.of("b")
    assert out["pinned"] and out["residency"]["tier"] == "device"
    assert set(out["residency"]["replicas"]) == {"vit/r0", "vit/r1"}
    assert view.applied("b", "vit", True) and not view.applied("b", "vit", False)
    assert view.of("c") == {"residency": {"tier": "store", "replicas": {}}, "pinned": False}
    assert state.unpin("b") and not state.unpin("b")
    for s in srvs:
        s.sync()
        assert not s.engine.residency()["b"]["pinned"]
    assert view.applied("b", "vit", False) and not view.of("b")["pinned"]


def test_pins_of_other_bases_or_missing_tasks_are_ignored(two):
    store, srvs = two
    state = StateDir(store.root)
    state.pin("zz-not-stored")
    try:
        assert srvs[0].sync()["pinned"] == [] and "zz-not-stored" not in srvs[0].engine.residency()
    finally:
        state.unpin("zz-not-stored")
    with pytest.raises(ValueError):
        state.pin("../escape")


def test_stale_reports_are_ignored(two):
    store, srvs = two
    for s in srvs:
        s.sync()
    state = StateDir(store.root)
    assert len(state.reports()) == 2
    assert state.reports(now=time.time() + STALE_S + 1) == []
    p = next(state.reports_dir.glob("*.json"))
    p.write_text("{half")
    assert len(state.reports()) == 1  # unreadable report skipped, not fatal


def test_residency_gauge_and_cache_counters_are_capped_per_task(two):
    store, srvs = two
    srv = srvs[0]
    for t in ["a", "c", "d", "e"]:  # 4 tasks held, cap 2: two labelled, the rest under 'other'
        srv.ensure_task(t, None)
    predict(srv.engine, [_img()] * 2, ["a", "c"])
    srv.sync()
    snap = M.snapshot()
    labelled = srv.residency.labels.labelled()
    assert len(labelled) == 2

    def held(lab):  # this replica's residency gauge of one label, summed over the tiers
        return sum(snap.get(f"grft_task_residency{{backbone=vit,task={lab},tier={t}}}", 0)
                   for t in ("device", "host", "store"))

    assert all(held(t) == 1 for t in labelled)
    assert held(M.OTHER) == 5 - len(labelled)  # every stored task of this base is counted once
    misses = sum(v for k, v in snap.items() if k.startswith("grft_task_cache_misses{"))
    assert misses >= 2
    report = json.loads(next(StateDir(store.root).reports_dir.glob("vit.r0.json")).read_text())
    assert {"a", "c", "d", "e"} <= set(report["tasks"])


def _img():
    from PIL import Image

    return Image.new("RGB", (32, 32), (120, 30, 200))
