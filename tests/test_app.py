"""End-to-end tests of the Ray Serve app: the real app on 127.0.0.1, plain HTTP, no mocks.

The app (a seeded tiny ViT with 2 replicas + a tiny random BERT, one replica) starts ONCE for the
module (~30 s on 2 CPUs); the last test shuts it down and starts it again on the same store.
"""
from __future__ import annotations

import base64
import json
import os
import threading
import time

import pytest
import requests
import torch

pytest.importorskip("ray.serve")

from app_fixtures import (  # noqa: E402
    VIT_CFG,
    app_config,
    b64,
    build_local_backbone,
    free_port,
    make_text_model,
    png_bytes,
    run_app,
    start_ray,
    text_cfg,
)

from grft_serve.app.answers import predict as engine_predict  # noqa: E402
from grft_serve.core.package import package_bytes  # noqa: E402
from grft_serve.engine import Engine  # noqa: E402
from grft_serve.testing import random_package  # noqa: E402

ADMIN = "test-admin-token"
READ = "test-read-token"
H = {"Authorization": f"Bearer {ADMIN}"}
pytestmark = pytest.mark.timeout(300)


class Ctx:
    pass


@pytest.fixture(scope="module")
def app(tmp_path_factory):
    import ray
    from ray import serve

    os.environ["GRFT_TEST_ADMIN"] = ADMIN  # read by the ingress replica (inherited via ray.init)
    os.environ["GRFT_TEST_READ"] = READ
    root = tmp_path_factory.mktemp("app")
    c = Ctx()
    c.text_path = make_text_model(root / "bert")
    c.store = root / "store"
    c.port = free_port()
    c.config = app_config(str(c.store), c.text_path)
    t0 = time.time()
    start_ray()
    c.url = run_app(c.config, c.port)
    c.startup_s = time.time() - t0
    # local twins of the served backbones: same fingerprints, reference predictions
    c.vit = build_local_backbone(VIT_CFG)
    c.text = build_local_backbone(text_cfg(c.text_path), None)
    c.vit_engine = Engine(build_local_backbone(VIT_CFG))
    c.text_engine = Engine(build_local_backbone(text_cfg(c.text_path), None))
    assert c.vit_engine.spec.fingerprint == requests.get(f"{c.url}/healthz").json()["backbones"]["vit"]["fingerprint"]
    try:
        yield c
    finally:
        serve.shutdown()
        ray.shutdown()


def register(app, pkg_or_bytes, replace=False, token=ADMIN, name="task.grft.safetensors"):
    data = pkg_or_bytes if isinstance(pkg_or_bytes, bytes) else package_bytes(pkg_or_bytes)
    headers = {"Authorization": f"Bearer {token}"} if token else {}
    return requests.post(f"{app.url}/v1/tasks", params={"replace": "true"} if replace else None,
                         files={"file": (name, data)}, headers=headers, timeout=60)


def predict(app, task, inputs, top_k=3, **kw):
    return requests.post(f"{app.url}/v1/tasks/{task}/predict", json={"inputs": inputs, "top_k": top_k},
                         timeout=60, **kw)


def reference(engine: Engine, pkg, raws) -> list[dict]:
    """What the served app must answer (the same engine code, run locally)."""
    try:
        engine.unregister(pkg.task_id)
    except KeyError:
        pass
    engine.register(pkg)
    return engine_predict(engine, raws, [pkg.task_id] * len(raws), top_k=3)


def pil(data: bytes):
    import io

    from PIL import Image

    return Image.open(io.BytesIO(data)).convert("RGB")


def assert_same(got: dict, want: dict, atol=1e-4):
    assert got["label"] == want["label"], (got, want)
    assert abs(got["score"] - want["score"]) < atol, (got, want)
    assert [t["label"] for t in got["top_k"]] == [t["label"] for t in want["top_k"]]


def listing(app) -> dict:
    """GET /v1/tasks without the live residency (tiers move as replicas load and evict tasks)."""
    body = requests.get(f"{app.url}/v1/tasks").json()
    for t in body["tasks"]:
        t.pop("residency", None)
    return body


def store_state(app) -> dict:
    return {p.name: p.stat().st_mtime_ns for p in app.store.glob("*.grft.safetensors")}


# ---------------------------------------------------------------------------------------------
def test_healthz_openapi(app):
    r = requests.get(f"{app.url}/healthz")
    assert r.status_code == 200
    body = r.json()
    assert body["status"] == "ok" and set(body["backbones"]) == {"vit", "text"}
    assert body["backbones"]["text"]["kind"] == "text"
    paths = requests.get(f"{app.url}/openapi.json").json()["paths"]
    for p in ("/v1/tasks", "/v1/tasks/{task_id}", "/v1/tasks/{task_id}/predict", "/v1/predict", "/healthz",
              "/metrics"):
        assert p in paths, p
    pred = paths["/v1/tasks/{task_id}/predict"]["post"]["requestBody"]["content"]
    assert {"application/json", "multipart/form-data"} <= set(pred)
    print(f"startup {app.startup_s:.1f}s")


def test_register_replace_list_get_delete(app):
    p1 = random_package(app.vit, "crud", seed=1)
    r = register(app, p1)
    assert r.status_code == 201, r.text
    info = r.json()
    assert info["task_id"] == "crud" and info["backbone"] == "vit" and info["labels"] == p1.meta.labels
    assert info["num_params"] == p1.num_params() and len(info["version"]) == 16
    r = register(app, random_package(app.vit, "crud", seed=2))
    assert r.status_code == 409 and r.json()["error"]["code"] == "task_exists"
    assert "replace" in r.json()["error"]["message"]
    r2 = register(app, random_package(app.vit, "crud", seed=2), replace=True)
    assert r2.status_code == 201 and r2.json()["version"] != info["version"]
    tasks = {t["task_id"]: t for t in requests.get(f"{app.url}/v1/tasks").json()["tasks"]}
    assert tasks["crud"]["version"] == r2.json()["version"]
    r = requests.get(f"{app.url}/v1/tasks/crud")
    assert r.status_code == 200 and r.json()["version"] == r2.json()["version"]
    assert predict(app, "crud", [b64(png_bytes(0))]).json()["predictions"][0]["version"] == r2.json()["version"]
    r = requests.delete(f"{app.url}/v1/tasks/crud", headers=H)
    assert r.status_code == 200
    assert requests.get(f"{app.url}/v1/tasks/crud").status_code == 404
    assert requests.delete(f"{app.url}/v1/tasks/crud", headers=H).status_code == 404
    r = predict(app, "crud", [b64(png_bytes(0))])
    assert r.status_code == 404 and r.json()["error"]["code"] == "unknown_task"


def test_auth(app):
    pkg = random_package(app.vit, "authz", seed=3)
    r = register(app, pkg, token=None)
    assert r.status_code == 401 and "Bearer" in r.headers.get("www-authenticate", "")
    r = register(app, pkg, token="wrong")
    assert r.status_code == 403 and r.json()["error"]["code"] == "forbidden"
    assert "authz" not in {t["task_id"] for t in requests.get(f"{app.url}/v1/tasks").json()["tasks"]}
    assert register(app, pkg).status_code == 201
    assert requests.delete(f"{app.url}/v1/tasks/authz").status_code == 401
    assert requests.delete(f"{app.url}/v1/tasks/authz", headers={"Authorization": "Bearer x"}).status_code == 403
    assert predict(app, "authz", [b64(png_bytes(1))]).status_code == 200  # reads are open in this config
    assert requests.delete(f"{app.url}/v1/tasks/authz", headers=H).status_code == 200


def test_predict_json_base64_and_multipart(app):
    pkg = random_package(app.vit, "imgs", seed=4, k=3)
    assert register(app, pkg).status_code == 201
    imgs = [png_bytes(i) for i in range(3)]
    want = reference(app.vit_engine, pkg, [pil(x) for x in imgs])
    r = predict(app, "imgs", [b64(x) for x in imgs])
    assert r.status_code == 200, r.text
    got = r.json()["predictions"]
    assert len(got) == 3
    for g, w in zip(got, want):
        assert_same(g, w)
        assert g["task"] == "imgs" and g["version"] == w["version"] and len(g["top_k"]) == 3
    # data URL form
    r = predict(app, "imgs", ["data:image/png;base64," + b64(imgs[0])], top_k=1)
    assert r.status_code == 200 and len(r.json()["predictions"][0]["top_k"]) == 1
    assert_same(r.json()["predictions"][0], {**want[0], "top_k": want[0]["top_k"][:1]})
    # multipart upload
    files = [("files", (f"{i}.png", x, "image/png")) for i, x in enumerate(imgs)]
    r = requests.post(f"{app.url}/v1/tasks/imgs/predict", files=files, data={"top_k": "3"}, timeout=60)
    assert r.status_code == 200, r.text
    for g, w in zip(r.json()["predictions"], want):
        assert_same(g, w)


def test_text_predict(app):
    pkg = random_package(app.text, "senti", seed=5, n_labels=2)
    assert register(app, pkg).status_code == 201
    texts = ["good movie", "this film was very boring", "love it"]
    want = reference(app.text_engine, pkg, texts)
    r = predict(app, "senti", texts)
    assert r.status_code == 200, r.text
    for g, w in zip(r.json()["predictions"], want):
        assert_same(g, w, atol=1e-4)
        assert g["backbone"] == "text"


def test_mixed_predict_matches_single_task_calls(app):
    pkgs = [random_package(app.vit, f"mix{i}", seed=10 + i, k=2) for i in range(3)]
    tpkg = random_package(app.text, "mixtext", seed=20)
    for p in [*pkgs, tpkg]:
        assert register(app, p, replace=True).status_code == 201
    items = []
    for j in range(8):
        if j % 4 == 3:
            items.append({"task": "mixtext", "input": ["good plot", "bad actor"][j % 2]})
        else:
            items.append({"task": f"mix{j % 3}", "input": b64(png_bytes(100 + j))})
    r = requests.post(f"{app.url}/v1/predict", json={"items": items, "top_k": 3}, timeout=60)
    assert r.status_code == 200, r.text
    mixed = r.json()["predictions"]
    assert [m["task"] for m in mixed] == [it["task"] for it in items]
    for it, m in zip(items, mixed):
        single = predict(app, it["task"], [it["input"]]).json()["predictions"][0]
        assert_same(m, single)
        assert m["version"] == single["version"]
    # and against the local reference (override path vs. patch path are exact up to float noise)
    for it, m in zip(items, mixed):
        if it["task"] == "mix0":
            w = reference(app.vit_engine, pkgs[0], [pil(base64.b64decode(it["input"]))])[0]
            assert_same(m, w)


def test_bad_requests_are_4xx_and_change_nothing(app):
    pkg = random_package(app.vit, "stable", seed=30)
    tpkg = random_package(app.text, "stabletext", seed=31)
    assert register(app, pkg, replace=True).status_code == 201
    assert register(app, tpkg, replace=True).status_code == 201
    before = listing(app)
    files_before = store_state(app)
    cases = [
        (predict(app, "nope", [b64(png_bytes(0))]), 404, "unknown_task"),
        (predict(app, "stable", ["%%% not base64 %%%"]), 400, "bad_base64"),
        (predict(app, "stable", [b64(b"hello, not an image at all")]), 422, "not_an_image"),
        (predict(app, "stable", [123]), 422, "invalid_input"),
        (predict(app, "stable", []), 422, "no_inputs"),
        (predict(app, "stable", [b64(png_bytes(0))] * 17), 413, "too_many_inputs"),
        (predict(app, "stable", [b64(b"\x89PNG" + b"0" * 200_001)]), 413, "image_too_large"),
        (predict(app, "stabletext", ["word " * 100]), 413, "text_too_long"),
        (predict(app, "stabletext", [{"x": 1}]), 422, "invalid_input"),
        (requests.post(f"{app.url}/v1/tasks/stable/predict", data=b"{oops", timeout=30,
                       headers={"content-type": "application/json"}), 400, "bad_json"),
        (requests.post(f"{app.url}/v1/tasks/stable/predict", json={"input": []}, timeout=30), 422, "invalid_request"),
        (requests.post(f"{app.url}/v1/predict", json={"items": [{"task": "stable", "input": b64(png_bytes(0))},
                                                                {"task": "ghost", "input": "x"}]}, timeout=30),
         404, "unknown_task"),
        (requests.post(f"{app.url}/v1/predict", json={"items": [{"task": "stable", "input": "!!"}]}, timeout=30),
         400, "bad_base64"),
        (requests.post(f"{app.url}/v1/predict", json={"items": [{"task": "stabletext", "input": "a"}] * 17},
                       timeout=30), 413, "too_many_inputs"),
        (requests.post(f"{app.url}/v1/tasks/stable/predict", files=[("files", ("x.png", b"not an image"))],
                       timeout=30), 422, "not_an_image"),
    ]
    for r, status, code in cases:
        assert r.status_code == status, (status, code, r.status_code, r.text)
        err = r.json()["error"]
        assert err["code"] == code and err["message"], err
    assert "item 1" in cases[11][0].json()["error"]["message"]
    assert listing(app) == before
    assert store_state(app) == files_before


def _tensors_bytes(pkg, edit) -> bytes:
    from safetensors.torch import save

    t = pkg.tensors()
    meta = json.loads(pkg.meta.model_dump_json())
    edit(t, meta)
    return save(t, metadata={"grft": json.dumps(meta)})


def _first(t):
    return next(k for k in t if k.endswith(".values"))


def _validator_cases(app):
    pkg = random_package(app.vit, "bad", seed=40)
    good = package_bytes(pkg)
    other = random_package(app.vit, "bad", seed=40, fingerprint="0" * 32)

    def shape(t, m):
        k = _first(t)
        t[k] = t[k][:, :-1].contiguous()

    def module(t, m):
        k = _first(t)
        t["no.such.module.values"] = t.pop(k)
        t["no.such.module.indices"] = t.pop(k.replace(".values", ".indices"))

    def indices(t, m):
        k = _first(t).replace(".values", ".indices")
        t[k] = t[k] + 100_000

    def nan(t, m):
        k = _first(t)
        t[k] = t[k].clone()
        t[k][0].view(-1)[0] = float("nan")

    def dtype(t, m):
        k = _first(t)
        t[k] = t[k].to(torch.float64)

    def version(t, m):
        m["format_version"] = 99

    def labels(t, m):
        m["labels"] = m["labels"][:1]

    def meta_type(t, m):
        m["mode"] = "diagonal"

    def text_task(t, m):  # right weights, wrong kind of input: an image backbone cannot serve it
        m["preprocessing"] = {"kind": "text", "pooling": "mean"}

    return [
        ("not_safetensors", b"hello world, this is not a package at all", 400, "not_safetensors"),
        ("pickle", b"\x80\x04\x95" + b"\x00" * 64, 400, "pickle_content"),
        ("truncated", good[: len(good) // 2], 400, "truncated"),
        ("too_large", good + b"\x00" * 4_000_001, 413, "too_large"),
        ("fingerprint", package_bytes(other), 409, "base_fingerprint_mismatch"),
        ("format_version", _tensors_bytes(pkg, version), 422, "unsupported_format_version"),
        ("metadata", _tensors_bytes(pkg, meta_type), 422, "bad_metadata"),
        ("head_vs_labels", _tensors_bytes(pkg, labels), 422, "shape_mismatch"),
        ("shape", _tensors_bytes(pkg, shape), 422, "shape_mismatch"),
        ("unknown_module", _tensors_bytes(pkg, module), 422, "unknown_module"),
        ("indices", _tensors_bytes(pkg, indices), 422, "invalid_indices"),
        ("non_finite", _tensors_bytes(pkg, nan), 422, "non_finite"),
        ("dtype", _tensors_bytes(pkg, dtype), 422, "bad_dtype"),
        ("preprocessing", _tensors_bytes(pkg, text_task), 422, "preprocessing_mismatch"),
    ]


def test_validator_errors_map_to_status_and_change_nothing(app):
    before = listing(app)
    files_before = store_state(app)
    seen = set()
    for name, data, status, code in _validator_cases(app):
        r = register(app, data)
        assert r.status_code == status, (name, r.status_code, r.text)
        err = r.json()["error"]
        assert err["code"] == code and len(err["message"]) > 10, (name, err)
        seen.add(status)
    assert seen == {400, 409, 413, 422}
    assert listing(app) == before
    assert store_state(app) == files_before
    assert predict(app, "bad", [b64(png_bytes(0))]).status_code == 404


def test_two_replicas_see_registration_and_delete(app):
    """Register once: BOTH vit replicas answer with that version; delete: nobody answers; re-add:
    both answer with the new version (no stale weights anywhere)."""
    img = b64(png_bytes(7))

    def replicas_answering(version, want=2, max_requests=60):
        seen = set()
        for _ in range(max_requests):
            r = predict(app, "fanout", [img] * 2)
            assert r.status_code == 200, r.text
            for p in r.json()["predictions"]:
                assert p["version"] == version
                seen.add(p["replica"])
            if len(seen) >= want:
                break
        return seen

    v1 = register(app, random_package(app.vit, "fanout", seed=50)).json()["version"]
    assert len(replicas_answering(v1)) == 2
    assert requests.delete(f"{app.url}/v1/tasks/fanout", headers=H).status_code == 200
    for _ in range(10):
        assert predict(app, "fanout", [img]).status_code == 404
    v2 = register(app, random_package(app.vit, "fanout", seed=51)).json()["version"]
    assert v2 != v1
    assert len(replicas_answering(v2)) == 2
    # the background sync frees deleted tasks on every replica
    assert requests.delete(f"{app.url}/v1/tasks/fanout", headers=H).status_code == 200
    latest: dict[str, dict] = {}  # replica -> its latest task list
    deadline = time.time() + 25
    while time.time() < deadline:
        s = requests.get(f"{app.url}/v1/backbones").json()["backbones"][0]["stats"]
        latest[s["replica"]] = s["tasks"]
        if len(latest) == 2 and all("fanout" not in t for t in latest.values()):
            break
        time.sleep(0.1)
    else:
        pytest.fail(f"replicas still hold the deleted task (or one never answered): {latest}")


def test_concurrent_registration_under_predict_traffic(app):
    """3 threads x 20 predicts while the task is replaced 3 times: no request fails, and every answer
    matches (label and score) the reference of exactly the version it reports."""
    imgs = [png_bytes(200 + i) for i in range(2)]
    pkgs = [random_package(app.vit, "live", seed=60 + i) for i in range(4)]
    refs = {}
    from grft_serve.store import content_version

    for p in pkgs:
        refs[content_version(package_bytes(p))] = reference(app.vit_engine, p, [pil(x) for x in imgs])
    assert register(app, pkgs[0], replace=True).status_code == 201
    errors, answers = [], []
    deadline = time.time() + 60

    def client(tid):
        s = requests.Session()
        for _ in range(20):
            if time.time() > deadline:
                break
            try:
                r = s.post(f"{app.url}/v1/tasks/live/predict", json={"inputs": [b64(x) for x in imgs]}, timeout=30)
                if r.status_code != 200:
                    errors.append((r.status_code, r.text))
                else:
                    answers.append(r.json()["predictions"])
            except Exception as e:  # noqa: BLE001
                errors.append(repr(e))

    threads = [threading.Thread(target=client, args=(i,)) for i in range(3)]
    for t in threads:
        t.start()
    reg_status = []
    for p in pkgs[1:]:
        time.sleep(0.3)
        reg_status.append(register(app, p, replace=True).status_code)
    for t in threads:
        t.join(timeout=max(1, deadline - time.time()))
    assert not any(t.is_alive() for t in threads)
    assert reg_status == [201, 201, 201]
    assert not errors, errors[:3]
    assert len(answers) == 60
    versions = set()
    for preds in answers:
        for i, p in enumerate(preds):
            assert p["version"] in refs, p
            assert_same(p, refs[p["version"]][i])
            versions.add(p["version"])
    assert len(versions) >= 2  # traffic really overlapped the replacements
    # after the dust settles everyone answers with the last version
    last = content_version(package_bytes(pkgs[-1]))
    assert all(p["version"] == last for p in predict(app, "live", [b64(imgs[0])] * 4).json()["predictions"])


def test_batching_shares_forwards(app):
    """Concurrent single-input requests for different tasks get batched into shared forwards."""
    for i in range(3):
        register(app, random_package(app.vit, f"batch{i}", seed=70 + i), replace=True)
    results = []

    def go(i):
        r = predict(app, f"batch{i % 3}", [b64(png_bytes(300 + i))])
        results.append((r.status_code, r.json()["predictions"][0] if r.status_code == 200 else r.text))

    threads = [threading.Thread(target=go, args=(i,)) for i in range(24)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(60)
    assert [s for s, _ in results] == [200] * 24, results
    preds = [p for _, p in results]
    assert max(p["batch_size"] for p in preds) > 1  # some inputs shared a forward ...
    assert max(p["batch_tasks"] for p in preds) > 1  # ... across tasks (override path)


def test_metrics(app):
    stats = requests.get(f"{app.url}/v1/backbones").json()["backbones"]
    m = stats[0]["stats"]["metrics"]
    assert m.get("grft_batch_size{backbone=vit}:count", 0) > 0
    assert any(k.startswith("grft_tasks_per_batch") for k in m)
    # Ray exports the metrics on the node's metrics port (the ingress proxies it at /metrics)
    deadline = time.time() + 45
    text = ""
    while time.time() < deadline:
        r = requests.get(f"{app.url}/metrics", timeout=30)
        text = r.text if r.status_code == 200 else ""
        if "ray_grft_batch_size" in text and "ray_grft_requests" in text:
            break
        time.sleep(2)
    assert "ray_grft_batch_size" in text, text[:500]
    assert "ray_grft_tasks_per_batch" in text and "ray_grft_request_latency_ms" in text


def test_cli_against_running_app(app, tmp_path):
    from typer.testing import CliRunner

    from grft_serve.cli import app as cli
    from grft_serve.core.package import save_package

    path = save_package(random_package(app.vit, "clitask", seed=80), tmp_path / "clitask.grft.safetensors")
    img = tmp_path / "x.png"
    img.write_bytes(png_bytes(9))
    run = CliRunner().invoke
    r = run(cli, ["register", str(path), "--url", app.url, "--token", ADMIN])
    assert r.exit_code == 0, r.output
    r = run(cli, ["register", str(path), "--url", app.url, "--token", ADMIN])
    assert r.exit_code != 0 and "already registered" in r.output
    assert run(cli, ["register", str(path), "--url", app.url, "--token", ADMIN, "--replace"]).exit_code == 0
    r = run(cli, ["tasks", "--url", app.url])
    assert r.exit_code == 0 and "clitask" in r.output
    r = run(cli, ["predict", "clitask", str(img), "--url", app.url, "--json"])
    assert r.exit_code == 0, r.output
    assert json.loads(r.output)["predictions"][0]["task"] == "clitask"
    r = run(cli, ["predict", "clitask", str(img), "--url", app.url, "--token", "x"])
    assert r.exit_code == 0  # reads open
    r = run(cli, ["delete", "clitask", "--url", app.url, "--token", "wrong"])
    assert r.exit_code != 0 and "invalid token" in r.output
    assert run(cli, ["delete", "clitask", "--url", app.url, "--token", ADMIN]).exit_code == 0
    r = run(cli, ["predict", "clitask", str(img), "--url", app.url])
    assert r.exit_code != 0 and "unknown task" in r.output
    r = run(cli, ["tasks", "--url", "http://127.0.0.1:1"])
    assert r.exit_code != 0 and "cannot reach" in r.output


def test_restart_keeps_tasks_and_read_token(app):
    """Shut the app down, start it again on the same store (now requiring a read token)."""
    from ray import serve

    keep = random_package(app.vit, "persist", seed=90)
    v = register(app, keep, replace=True).json()["version"]
    want = predict(app, "persist", [b64(png_bytes(5))]).json()["predictions"][0]
    listed = {t["task_id"]: t["version"] for t in requests.get(f"{app.url}/v1/tasks").json()["tasks"]}
    serve.delete("grft")
    with pytest.raises(requests.RequestException):
        r = requests.get(f"{app.url}/healthz", timeout=5)
        r.raise_for_status()
    cfg = app_config(str(app.store), app.text_path, vit_replicas=1, read_env="GRFT_TEST_READ")
    t0 = time.time()
    run_app(cfg, app.port)
    print(f"restart {time.time() - t0:.1f}s")
    assert requests.get(f"{app.url}/v1/tasks").status_code == 401
    assert requests.get(f"{app.url}/v1/tasks", headers={"Authorization": "Bearer nope"}).status_code == 403
    rh = {"Authorization": f"Bearer {READ}"}
    again = {t["task_id"]: t["version"] for t in requests.get(f"{app.url}/v1/tasks", headers=rh).json()["tasks"]}
    assert again == listed and again["persist"] == v
    assert predict(app, "persist", [b64(png_bytes(5))]).status_code == 401
    got = predict(app, "persist", [b64(png_bytes(5))], headers=rh).json()["predictions"][0]
    assert_same(got, want) and got["version"] == v
    # the admin token also reads
    assert predict(app, "persist", [b64(png_bytes(5))], headers=H).status_code == 200
