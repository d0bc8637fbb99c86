"""Registration refuses what the base cannot run; served answers are finite; the host tier is capped.

* a package whose preprocessing the base cannot run (the test ViT's position table is fixed at
  32 px) or that is over the pixel budget is refused at registration (422
  ``preprocessing_unrunnable``), and one planted in the store answers 422 ``broken_task``, never 500
  (over HTTP, with the packages built here: tests/test_hardening_http.py);
* finite but huge values (±3e38) are refused (422 ``value_out_of_range``), so is metadata over
  1 Mi characters (413 ``metadata_too_large``); scores that still come out
  non-finite (float16 overflow) are refused per input (422 ``non_finite_result``; never a bare NaN);
* ``host_cache_bytes``: a replica over its cap evicts tasks to the store and reloads them.
"""
from __future__ import annotations

import asyncio

import numpy as np
import pytest
import torch

from app_fixtures import SEED, VIT_CFG, build_local_backbone, png_bytes
from test_package import _err, _rewrite
from grft_serve.app.oip_codec import infer_response
from grft_serve.app.schemas import ApiError
from grft_serve.core import package as P
from grft_serve.core.package import load_package, package_bytes
from grft_serve.testing import random_package

pytestmark = pytest.mark.timeout(300)


def with_prep(pkg, input_size: int, crop_pct: float = 1.0):
    vit = build_local_backbone(VIT_CFG)
    prep = vit.preprocessing_meta(input_size)
    prep["timm_data_config"]["crop_pct"] = crop_pct
    pkg.meta = pkg.meta.model_copy(update={"preprocessing": prep})
    return pkg


def huge_head(pkg):
    pkg.head_weight = pkg.head_weight.clone()
    pkg.head_weight[0, 0] = 3e38
    return pkg


def test_huge_finite_values_are_refused(vit):
    pkg, base = random_package(vit, "taskA", k=3, tune_bias=True), vit.describe()
    """±3e38 is finite in float32 but overflows in the first product (NaN scores on every input):
    every value must fit float16's range, the smallest of the serving dtypes."""
    hw = pkg.head_weight.clone()
    hw[0, 0] = 3e38
    e = _err(_rewrite(pkg, {"head.weight": hw}), base, P.ValueRangeError, "head.weight")
    assert e.status == 422 and e.code == "value_out_of_range"
    name = next(iter(pkg.deltas))
    v = pkg.tensors()[f"{name}.values"].clone()
    v[0, 0] = -P.MAX_ABS_VALUE * 1.01
    _err(_rewrite(pkg, {f"{name}.values": v}), base, P.ValueRangeError, name)
    v[0, 0] = -P.MAX_ABS_VALUE  # the bound itself is accepted
    load_package(_rewrite(pkg, {f"{name}.values": v}), base=base)


def test_metadata_size_is_capped(vit):
    pkg, base = random_package(vit, "taskA", k=3, tune_bias=True), vit.describe()
    big = {"training_config": {"note": "x" * (P.MAX_METADATA_CHARS + 1)}}
    e = _err(_rewrite(pkg, meta=big), base, P.MetadataTooLargeError, "metadata")
    assert e.status == 413 and e.code == "metadata_too_large"
    assert P.read_header(_rewrite(pkg, meta={"training_config": {"note": "x" * 1000}})).meta.task_id == "taskA"


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
