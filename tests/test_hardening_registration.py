"""Registration refuses what the base cannot run; served answers are finite; the host tier is capped.

* a package whose preprocessing the base cannot run (the test ViT's position table is fixed at
  32 px) or that is over the pixel budget is refused at registration (422
  ``preprocessing_unrunnable``), and one planted in the store answers 422 ``broken_task``, never 500;
* finite but huge values (±3e38) are refused (422 ``value_out_of_range``); scores that still come out
  non-finite (float16 overflow) are refused per input (422 ``non_finite_result``; never a bare NaN);
* ``host_cache_bytes``: a replica over its cap evicts tasks to the store and reloads them.
"""
from __future__ import annotations

import asyncio
import json
import os

import numpy as np
import pytest
import requests
import torch

from app_fixtures import (SEED, VIT_CFG, Canary, app_config, b64, build_local_backbone, free_port,  # noqa: F401
                          make_text_model, png_bytes, run_app, start_ray)
from grft_serve.app.oip_codec import infer_response
from grft_serve.app.schemas import ApiError
from grft_serve.core.package import SUFFIX, package_bytes
from grft_serve.testing import random_package

A = {"Authorization": "Bearer reg-admin"}
pytestmark = pytest.mark.timeout(300)


def _with_prep(pkg, input_size: int, crop_pct: float = 1.0):
    vit = build_local_backbone(VIT_CFG)
    prep = vit.preprocessing_meta(input_size)
    prep["timm_data_config"]["crop_pct"] = crop_pct
    pkg.meta = pkg.meta.model_copy(update={"preprocessing": prep})
    return pkg


def _huge_head(pkg):
    pkg.head_weight = pkg.head_weight.clone()
    pkg.head_weight[0, 0] = 3e38
    return pkg


@pytest.fixture(scope="module")
def app(tmp_path_factory):
    import ray
    from ray import serve

    os.environ["GRFT_REG_ADMIN"] = "reg-admin"
    root = tmp_path_factory.mktemp("hard-reg")
    cfg = app_config(str(root / "store"), make_text_model(root / "bert"), vit_replicas=1, admin_env="GRFT_REG_ADMIN")
    start_ray()
    url = run_app(cfg, free_port())
    vit = build_local_backbone(VIT_CFG)
    r = requests.post(f"{url}/v1/tasks", files={"file": ("p", package_bytes(random_package(vit, "canary", seed=1)))},
                      headers=A, timeout=60)
    assert r.status_code == 201, r.text
    yield url, root / "store", vit
    serve.shutdown()
    ray.shutdown()


def _register(url, pkg):
    return requests.post(f"{url}/v1/tasks", files={"file": ("p", package_bytes(pkg))}, headers=A, timeout=60)


def _canary(url):
    s = requests.Session()
    return Canary(lambda: s.post(f"{url}/v1/tasks/canary/predict", json={"inputs": [b64(png_bytes(2))]}, timeout=30))


def test_unrunnable_packages_are_refused_and_planted_ones_are_broken_tasks(app):
    url, store, vit = app
    with _canary(url) as c:
        r = _register(url, _with_prep(random_package(vit, "at64", seed=3), 64))  # the base's table is 32 px
        assert r.status_code == 422 and r.json()["error"]["code"] == "preprocessing_unrunnable", r.text
        r = _register(url, _with_prep(random_package(vit, "at1024", seed=4), 1024, 0.5))
        assert r.status_code == 422 and "max_input_pixels" in r.json()["error"]["message"]
        r = _register(url, _huge_head(random_package(vit, "huge", seed=5)))
        assert r.status_code == 422 and r.json()["error"]["code"] == "value_out_of_range"
        listed = {t["task_id"] for t in requests.get(f"{url}/v1/tasks").json()["tasks"]}
        assert listed == {"canary"}
        # planted in the store behind the app's back (or registered before these checks existed)
        for tid, pkg in (("planted64", _with_prep(random_package(vit, "planted64", seed=6), 64)),
                         ("plantedhuge", _huge_head(random_package(vit, "plantedhuge", seed=7)))):
            (store / f"{tid}{SUFFIX}").write_bytes(package_bytes(pkg))
            for _ in range(2):  # the second answer comes from the replica's record of the failure
                r = requests.post(f"{url}/v1/tasks/{tid}/predict", json={"inputs": [b64(png_bytes(1))]}, timeout=60)
                assert r.status_code == 422 and r.json()["error"]["code"] == "broken_task", r.text
            body = {"inputs": [{"name": "images", "datatype": "BYTES", "shape": [1], "data": [b64(png_bytes(1))]}]}
            r = requests.post(f"{url}/v2/models/{tid}/infer", json=body, timeout=60)
            assert r.status_code == 422 and isinstance(json.loads(r.content)["error"], str)
    c.check(1.0)
    r = _register(url, random_package(vit, "fine", seed=8))  # the cached dry-run result lets good ones in
    assert r.status_code == 201


def test_oip_never_writes_a_bare_nan():
    probs = np.array([[0.5, 0.5], [np.nan, np.nan]], dtype=np.float32)
    for binary in (False, True):
        with pytest.raises(ApiError) as e:
            infer_response("t", "v", probs, ["a", "b"], {"probabilities": binary, "labels": binary})
        assert e.value.status == 422 and e.value.code == "non_finite_result" and "input 1" in e.value.message


def _server(root, **spec):
    from grft_serve.app import BackboneServer

    return BackboneServer({"name": "vit", "backbone": VIT_CFG, "seed": SEED, "device": "cpu", **spec},
                          {"path": str(root)}, {}, sync_interval_s=3600)


def _request(versions, tasks, seeds):
    return {"items": [{"task": t, "version": versions[t], "input": png_bytes(s)} for t, s in zip(tasks, seeds)],
            "top_k": 3}


def test_non_finite_scores_are_refused_per_input(tmp_path):
    """Head weights within the bound still overflow float16 logits: that input's request gets 422,
    another request in the same batch is answered."""
    from grft_serve.store import DirectoryTaskStore

    store = DirectoryTaskStore(tmp_path)
    vit = build_local_backbone(VIT_CFG)
    hot = random_package(vit, "hot", seed=1)
    signs = torch.randn(hot.head_weight.shape, generator=torch.Generator().manual_seed(0)).sign()
    hot.head_weight = signs * 60000.0  # within the bound; |logits| ~ 60000 * |features|_1 >> 65504
    versions = {"hot": store.put("hot", package_bytes(hot)),
                "ok": store.put("ok", package_bytes(random_package(vit, "ok", seed=2)))}
    srv = _server(tmp_path, dtype="float16")
    try:
        chunks = [srv.prepare_inputs(_request(versions, [t], [3])["items"], 3)[0][1] for t in ("ok", "hot")]
        good, bad = srv.run_chunks(chunks)
        assert bad["error"]["status"] == 422 and bad["error"]["code"] == "non_finite_result"
        assert "answers" in good and all(np.isfinite(a["score"]) for a in good["answers"])
        res = asyncio.run(srv.predict(_request(versions, ["ok", "hot"], [1, 2])))
        assert res["error"]["code"] == "non_finite_result" and res["index"] == 1
    finally:
        srv.close()


def test_a_replica_over_its_host_cap_evicts_to_the_store_and_reloads(tmp_path):
    from grft_serve.engine import Engine
    from grft_serve.store import DirectoryTaskStore

    store = DirectoryTaskStore(tmp_path)
    vit = build_local_backbone(VIT_CFG)
    pkgs = {t: random_package(vit, t, seed=i) for i, t in enumerate("abc")}  # one size: the cap holds one
    versions = {t: store.put(t, package_bytes(p)) for t, p in pkgs.items()}
    ref = Engine(build_local_backbone(VIT_CFG))
    for p in pkgs.values():
        ref.register(p)
    one = max(len(package_bytes(p)) for p in pkgs.values())
    srv = _server(tmp_path, host_cache_bytes=int(1.5 * one))  # room for one task
    try:
        order = list("abcabcab")
        for k, t in enumerate(order):
            got = asyncio.run(srv.predict(_request(versions, [t], [k])))["predictions"][0]
            want = ref.predict([_pil(png_bytes(k))], [t], top_k=3)[0]
            assert got["label"] == want["label"] and abs(got["score"] - want["score"]) < 1e-5
            assert got["version"] == versions[t]
        cache = srv.engine.stats()["cache"]
        assert cache["host_capacity"] == int(1.5 * one) and cache["host_bytes"] <= cache["host_capacity"]
        assert cache["host_evictions"] >= len(order) - 2 and cache["store_tasks"] == 2  # each switch evicts
        assert {t for t, r in srv.engine.residency().items() if r["tier"] == "store"} == set("abc") - {order[-1]}
    finally:
        srv.close()


def _pil(data: bytes):
    import io

    from PIL import Image

    return Image.open(io.BytesIO(data)).convert("RGB")
