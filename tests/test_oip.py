"""Open Inference Protocol v2 driven by the real ``tritonclient[http]`` against the running app, and the
per-task metrics / residency it exports. One app start for the module (a read token is set: the
client authenticates like any other caller); the per-task label cap is 3 and more tasks are used."""
from __future__ import annotations

import os
import re
import time
from collections import defaultdict

import numpy as np
import pytest
import requests

pytest.importorskip("ray.serve")
httpclient = pytest.importorskip("tritonclient.http")
from tritonclient.utils import InferenceServerException  # noqa: E402

from app_fixtures import (VIT_CFG, app_config, b64, build_local_backbone, free_port,  # noqa: E402
                          make_text_model, png_bytes, run_app, start_ray, text_cfg)
from grft_serve.engine import Engine  # noqa: E402
from grft_serve.core.package import package_bytes  # noqa: E402
from grft_serve.testing import random_package  # noqa: E402

ADMIN, READ = "oip-admin-token", "oip-read-token"
HA = {"Authorization": f"Bearer {ADMIN}"}
HR = {"Authorization": f"Bearer {READ}"}
CAP = 3
pytestmark = pytest.mark.timeout(400)


class Ctx:
    pass


@pytest.fixture(scope="module")
def app(tmp_path_factory):
    import ray
    from ray import serve

    os.environ["GRFT_OIP_ADMIN"] = ADMIN
    os.environ["GRFT_OIP_READ"] = READ
    root = tmp_path_factory.mktemp("oip")
    c = Ctx()
    text_path = make_text_model(root / "bert")
    cfg = app_config(str(root / "store"), text_path, admin_env="GRFT_OIP_ADMIN", read_env="GRFT_OIP_READ")
    cfg["metrics_task_label_cap"] = CAP
    start_ray()
    port = free_port()
    c.url = run_app(cfg, port)
    c.client = httpclient.InferenceServerClient(f"127.0.0.1:{port}", concurrency=4, network_timeout=120)
    c.vit, c.text = build_local_backbone(VIT_CFG), build_local_backbone(text_cfg(text_path), None)
    c.ref = {"vit": Engine(build_local_backbone(VIT_CFG)), "text": Engine(build_local_backbone(text_cfg(text_path),
                                                                                                 None))}
    c.pkgs = {}
    for kind, bb, tids in (("vit", c.vit, ["img-a", "img-b", "img-c"]), ("text", c.text, ["txt-a", "txt-b"])):
        for i, tid in enumerate(tids):
            pkg = random_package(bb, tid, seed=40 + i, n_labels=3 + i)
            r = requests.post(f"{c.url}/v1/tasks", files={"file": ("p", package_bytes(pkg))}, headers=HA, timeout=60)
            assert r.status_code == 201, r.text
            c.ref[kind].register(pkg)
            c.pkgs[tid] = (kind, pkg, r.json()["version"])
    try:
        yield c
    finally:
        c.client.close()
        serve.shutdown()
        ray.shutdown()


def pil(data: bytes):
    import io

    from PIL import Image

    return Image.open(io.BytesIO(data)).convert("RGB")


def expected(app, tid, raws):
    kind, pkg, _ = app.pkgs[tid]
    n = len(pkg.meta.labels)
    inputs = [pil(x) for x in raws] if kind == "vit" else raws
    return app.ref[kind].predict(inputs, [tid] * len(raws), top_k=n)


def infer(app, tid, values, binary=True, outputs=None, **kw):
    kind = app.pkgs[tid][0]
    inp = httpclient.InferInput("images" if kind == "vit" else "texts", [len(values)], "BYTES")
    inp.set_data_from_numpy(np.array(values, dtype=object), binary_data=binary)
    return app.client.infer(tid, [inp], outputs=outputs, headers=dict(HR), **kw)  # infer() adds to its headers


def check(app, tid, raws, res):
    labels = app.pkgs[tid][1].meta.labels
    probs, got = res.as_numpy("probabilities"), res.as_numpy("labels")
    assert probs.shape == (len(raws), len(labels)) and probs.dtype == np.float32
    np.testing.assert_allclose(probs.sum(1), 1.0, atol=1e-4)
    for i, want in enumerate(expected(app, tid, raws)):
        assert labels[int(probs[i].argmax())] == want["label"] == (got[i].decode() if isinstance(got[i], bytes)
                                                                     else got[i])
        for t in want["top_k"]:
            assert abs(probs[i, labels.index(t["label"])] - t["score"]) < 1e-4


def error_of(fn):
    with pytest.raises(InferenceServerException) as e:
        fn()
    assert isinstance(e.value.message(), str), e.value.message()  # the protocol's {"error": "<message>"}
    return int(e.value.status()), e.value.message()


# ---------------------------------------------------------------------------------------------
def test_server_health_and_metadata(app):
    assert app.client.is_server_live() and app.client.is_server_ready()
    md = app.client.get_server_metadata(headers=HR)
    assert md["name"] == "grft-serve" and {"binary_tensor_data", "model_repository"} <= set(md["extensions"])
    assert error_of(lambda: app.client.get_server_metadata())[0] == 401  # reads need the read token


def test_model_metadata_ready_and_config(app):
    for tid, (kind, pkg, version) in app.pkgs.items():
        md = app.client.get_model_metadata(tid, headers=HR)
        assert md["name"] == tid and md["versions"] == [version]
        assert md["inputs"] == [{"name": "images" if kind == "vit" else "texts", "datatype": "BYTES", "shape": [-1]}]
        assert md["outputs"][0] == {"name": "probabilities", "datatype": "FP32", "shape": [-1, len(pkg.meta.labels)]}
        assert md["outputs"][1]["name"] == "labels"
        assert app.client.is_model_ready(tid, headers=HR)
        assert app.client.is_model_ready(tid, model_version=version, headers=HR)
        assert not app.client.is_model_ready(tid, model_version="0000", headers=HR)
        assert app.client.get_model_config(tid, headers=HR)["labels"] == pkg.meta.labels
    assert not app.client.is_model_ready("no-such-task", headers=HR)
    assert error_of(lambda: app.client.get_model_metadata("no-such-task", headers=HR))[0] == 404
    assert error_of(lambda: app.client.get_model_metadata("img-a", model_version="0000", headers=HR))[0] == 404


def test_infer_image_binary_and_json(app):
    raws = [png_bytes(s) for s in (1, 2, 3)]
    res = infer(app, "img-a", raws)
    check(app, "img-a", raws, res)
    assert res.get_response()["model_version"] == app.pkgs["img-a"][2]
    outs = [httpclient.InferRequestedOutput("probabilities", binary_data=False),
            httpclient.InferRequestedOutput("labels", binary_data=False)]
    res = infer(app, "img-a", [b64(x) for x in raws], binary=False, outputs=outs, request_id="r7")
    check(app, "img-a", raws, res)
    assert res.get_response()["id"] == "r7"
    only = infer(app, "img-a", raws[:1], outputs=[httpclient.InferRequestedOutput("labels")])
    assert only.as_numpy("probabilities") is None and only.as_numpy("labels").shape == (1,)


def test_infer_text(app):
    texts = ["a very good film", "the plot was boring", "é 漢字 unknown words"]
    for tid in ("txt-a", "txt-b"):
        check(app, tid, texts, infer(app, tid, texts))
        check(app, tid, texts, infer(app, tid, texts, binary=False))


def test_mixed_sequence_of_tasks_concurrently(app):
    jobs = []
    for i in range(16):
        tid = ["img-a", "txt-a", "img-b", "txt-b", "img-c"][i % 5]
        raws = [png_bytes(100 + i), png_bytes(200 + i)] if app.pkgs[tid][0] == "vit" else [f"good film {i}", "bad"]
        jobs.append((tid, raws))
    pending = []
    for tid, raws in jobs:  # the client's own concurrency (greenlets; it is not thread-safe)
        kind = app.pkgs[tid][0]
        inp = httpclient.InferInput("images" if kind == "vit" else "texts", [len(raws)], "BYTES")
        inp.set_data_from_numpy(np.array(raws, dtype=object))
        pending.append(app.client.async_infer(tid, [inp], headers=dict(HR)))
    for (tid, raws), p in zip(jobs, pending):
        check(app, tid, raws, p.get_result(timeout=120))


def tasks_view(app) -> dict:
    r = requests.get(f"{app.url}/v1/tasks", headers=HR, timeout=30)
    assert r.status_code == 200
    return {t["task_id"]: t for t in r.json()["tasks"]}


def test_repository_index_load_unload(app):
    idx = app.client.get_model_repository_index(headers=HR)
    assert {e["name"]: e["state"] for e in idx} == dict.fromkeys(app.pkgs, "READY")
    assert {e["name"]: e["version"] for e in idx} == {t: v[2] for t, v in app.pkgs.items()}
    assert error_of(lambda: app.client.load_model("img-b", headers=HR))[0] == 403  # admin only
    assert not tasks_view(app)["img-b"]["pinned"]
    app.client.load_model("img-b", headers=HA)  # answers once every vit replica reports it pinned
    t = tasks_view(app)["img-b"]
    assert t["pinned"] and t["version"] == app.pkgs["img-b"][2]
    assert t["residency"]["tier"] == "device"
    reps = t["residency"]["replicas"]
    assert len(reps) == 2 and set(reps.values()) == {"device"}  # both vit replicas hold it on the device
    check(app, "img-b", [png_bytes(5)], infer(app, "img-b", [png_bytes(5)]))
    app.client.unload_model("img-b", headers=HA)
    t = tasks_view(app)["img-b"]
    assert not t["pinned"] and t["residency"]["tier"] in ("device", "host")  # released, still registered
    assert app.client.is_model_ready("img-b", headers=HR)
    assert error_of(lambda: app.client.load_model("no-such-task", headers=HA))[0] == 404
    assert error_of(lambda: app.client.unload_model("no-such-task", headers=HA))[0] == 404
    assert error_of(lambda: app.client.load_model("img-b", config="{}", headers=HA))[0] == 400


def test_errors_in_protocol_shape(app):
    img = png_bytes(1)
    assert error_of(lambda: app.client.infer("no-such-task", [_inp("images", [img])], headers=dict(HR)))[0] == 404
    assert error_of(lambda: app.client.infer("img-a", [_inp("texts", [img])], headers=dict(HR)))[0] == 422
    assert error_of(lambda: app.client.infer("img-a", [_inp("images", [img])]))[0] == 401
    status, msg = error_of(lambda: infer(app, "img-a", [b"not an image"]))
    assert status == 422 and "input 0" in msg
    assert error_of(lambda: infer(app, "img-a", ["@@not base64@@"], binary=False))[0] == 400
    assert error_of(lambda: infer(app, "img-a", [img] * 17))[0] == 413  # max_inputs_per_request is 16
    assert error_of(lambda: infer(app, "txt-a", ["x" * 201]))[0] == 413
    assert error_of(lambda: infer(app, "txt-a", [b"\xff\xfe"]))[0] == 422
    assert error_of(lambda: infer(app, "img-a", []))[0] == 422
    r = requests.get(f"{app.url}/v2/nothing-here", headers=HR)
    assert r.status_code == 404 and isinstance(r.json()["error"], str)
    r = requests.post(f"{app.url}/v2/models/img-a/infer", data=b"{bad", headers=HR)
    assert r.status_code == 400 and isinstance(r.json()["error"], str)
    r = requests.post(f"{app.url}/v2/models/img-a/infer", data=b"{}",
                      headers={**HR, "Inference-Header-Content-Length": "99"})
    assert r.status_code == 400
    r = requests.get(f"{app.url}/v1/tasks/no-such-task", headers=HR)  # /v1 keeps the project's shape
    assert r.status_code == 404 and r.json()["error"]["code"] == "unknown_task"
    check(app, "img-a", [img], infer(app, "img-a", [img]))  # errors changed nothing


def _inp(name, values):
    inp = httpclient.InferInput(name, [len(values)], "BYTES")
    inp.set_data_from_numpy(np.array(values, dtype=object))
    return inp


def series(text: str, name: str) -> dict[tuple, float]:
    """``{(task, tier, replica): value}`` of one exported metric (tier None where it has none)."""
    out: dict[tuple, float] = defaultdict(float)
    for line in text.splitlines():
        m = re.match(rf"ray_{name}(?:_total)?{{(.*)}} ([0-9.e+-]+)$", line)
        if m:
            tags = dict(re.findall(r'(\w+)="([^"]*)"', m.group(1)))
            out[(tags.get("task"), tags.get("tier"), tags.get("replica"))] += float(m.group(2))
    return out


def per_replica_tasks(s: dict[tuple, float]) -> dict[str, set]:
    out: dict[str, set] = defaultdict(set)
    for task, _, replica in s:
        out[replica].add(task)
    return out


def test_per_task_metrics_respect_the_cap(app):
    # all five tasks (> CAP) see traffic, one request fails
    for tid in app.pkgs:
        raw = png_bytes(7) if app.pkgs[tid][0] == "vit" else "good"
        requests.post(f"{app.url}/v1/tasks/{tid}/predict", json={"inputs": [b64(raw) if isinstance(raw, bytes)
                                                                            else raw]}, headers=HR, timeout=60)
    bad = requests.post(f"{app.url}/v1/tasks/img-a/predict", json={"inputs": ["@@"]}, headers=HR, timeout=60)
    assert bad.status_code == 400
    deadline, text = time.time() + 60, ""
    while time.time() < deadline:
        r = requests.get(f"{app.url}/metrics", headers=HR, timeout=30)
        text = r.text if r.status_code == 200 else ""
        if "ray_grft_task_requests" in text and "ray_grft_task_residency" in text and \
                "ray_grft_task_cache_misses" in text:
            reqs = series(text, "grft_task_requests")
            # metrics reach the node's endpoint on the exporter's own schedule: wait for every series
            if any(t == "other" for t, _, _ in reqs) and sum(series(text, "grft_task_errors").values()) >= 1 \
                    and sum(series(text, "grft_task_inputs").values()) >= 5:
                break
        time.sleep(2)
    reqs = series(text, "grft_task_requests")
    tasks = {t for t, _, _ in reqs}
    assert "other" in tasks and len(tasks - {"other"}) <= CAP, tasks  # 5 tasks, at most CAP labelled
    assert tasks - {"other"} <= set(app.pkgs)
    assert sum(reqs.values()) >= 5 + 1
    errs = series(text, "grft_task_errors")
    assert sum(errs.values()) >= 1 and {t for t, _, _ in errs} <= tasks
    assert sum(series(text, "grft_task_inputs").values()) >= 5
    assert "ray_grft_task_latency_ms_bucket" in text
    res = series(text, "grft_task_residency")
    assert {tier for _, tier, _ in res} <= {"device", "host", "store"}
    by_replica = per_replica_tasks(res)
    assert len(by_replica) == 3  # 2 vit replicas + 1 text replica, each with at most CAP task labels
    assert all(len(ts - {"other"}) <= CAP for ts in by_replica.values()), by_replica
    assert sum(series(text, "grft_task_cache_misses").values()) >= 1
    # /v1/tasks: version, residency and pinned state per task
    view = tasks_view(app)
    for tid, (_, _, version) in app.pkgs.items():
        t = view[tid]
        assert t["version"] == version and t["pinned"] is False
        assert t["residency"]["tier"] in ("device", "host", "store")
