"""The backbone server as a plain class (no Ray, no HTTP): whole requests in, ordered answers out,
lazy loading, and one bad request never failing the others in its batch."""
from __future__ import annotations

import asyncio

import pytest
import torch
from app_fixtures import SEED, VIT_CFG, build_local_backbone, make_text_model, png_bytes, text_cfg

from grft_serve.app import BackboneServer
from grft_serve.app.answers import predict
from grft_serve.app.messages import PredictCall, PredictInput
from grft_serve.app.replica import Chunk
from grft_serve.core.package import package_bytes
from grft_serve.engine import Engine
from grft_serve.store import DirectoryTaskStore
from grft_serve.testing import random_package


def pil(data: bytes):
    import io

    from PIL import Image

    return Image.open(io.BytesIO(data)).convert("RGB")


@pytest.fixture(scope="module")
def vit_server(tmp_path_factory):
    root = tmp_path_factory.mktemp("replica")
    store = DirectoryTaskStore(root)
    bb = build_local_backbone(VIT_CFG)
    pkgs = {t: random_package(bb, t, seed=i, mode="row" if i % 2 else "column") for i, t in enumerate("abc")}
    versions = {t: store.put(t, package_bytes(p)) for t, p in pkgs.items()}
    srv = BackboneServer({"name": "vit", "backbone": VIT_CFG, "seed": SEED, "device": "cpu", "max_batch_size": 4},
                         {"path": str(root)}, {}, sync_interval_s=3600)
    ref = Engine(build_local_backbone(VIT_CFG))
    for p in pkgs.values():
        ref.register(p)
    yield srv, store, pkgs, versions, ref
    srv.close()


def run(coro):
    return asyncio.run(coro)


def request(versions, tasks, seeds, top_k=3):
    return PredictCall([PredictInput(t, versions.get(t), png_bytes(s)) for t, s in zip(tasks, seeds)], top_k)


def test_request_answers_in_order_and_match_the_engine(vit_server):
    srv, _, _, versions, ref = vit_server
    tasks = ["a", "b", "a", "c", "b", "a", "c"]  # > max_batch_size: split into chunks, order kept
    seeds = list(range(10, 17))
    got = run(srv.predict(request(versions, tasks, seeds))).predictions
    want = predict(ref, [pil(png_bytes(s)) for s in seeds], tasks, top_k=3)
    assert [g["task"] for g in got] == tasks
    for g, w in zip(got, want):
        assert g["label"] == w["label"] and abs(g["score"] - w["score"]) < 1e-5
        assert g["version"] == versions[g["task"]] and len(g["top_k"]) == 3
        assert g["batch_size"] <= 4


def test_bad_input_fails_only_its_request(vit_server):
    srv, _, _, versions, _ = vit_server

    async def go():
        good = [srv.predict(request(versions, ["a", "b"], [1, 2])) for _ in range(3)]
        bad = srv.predict(PredictCall([PredictInput("a", versions["a"], png_bytes(3)),
                                       PredictInput("a", versions["a"], b"\x89PNG\r\n\x1a\nbroken")], top_k=2))
        return await asyncio.gather(bad, *good)

    bad, *good = run(go())
    assert bad.error.status == 422 and bad.error.index == 1
    assert all(g.error is None and len(g.predictions) == 2 for g in good)


def test_a_failing_chunk_is_isolated_from_the_rest_of_its_batch(vit_server):
    """A merged batch that raises is re-run request by request: only the broken one fails."""
    srv, _, _, _, ref = vit_server
    good = srv.prepare_inputs([PredictInput("a", None, png_bytes(5))], 2)[0][1]
    broken = Chunk(torch.full((1, 3, 7, 7), float("nan")), ["a"], good.prep_key, 2)  # wrong shape: forward raises
    out = srv.run_chunks([good, broken, good])
    assert out[0].error is None and out[2].error is None
    assert out[1].error.status == 500 and "Tensor" not in out[1].error.message
    want = predict(ref, [pil(png_bytes(5))], ["a"], top_k=2)[0]
    assert out[0].predictions[0]["label"] == want["label"]


def test_lazy_load_new_version_and_delete(vit_server):
    srv, store, _, versions, _ = vit_server
    bb = build_local_backbone(VIT_CFG)
    p1, p2 = random_package(bb, "live", seed=41), random_package(bb, "live", seed=42)
    v1 = store.put("live", package_bytes(p1))
    assert run(srv.predict(request({"live": v1}, ["live"], [1]))).predictions[0]["version"] == v1
    v2 = store.put("live", package_bytes(p2), replace=True)
    assert run(srv.predict(request({"live": v2}, ["live"], [1]))).predictions[0]["version"] == v2
    store.delete("live")  # the ingress stops routing at once; the replica frees it at its next sync
    assert srv.sync()["removed"] == ["live"]
    assert "live" not in {t.task_id for t in srv.engine.tasks()}
    res = run(srv.predict(request({"live": v2}, ["live"], [1])))
    assert res.error.status == 404
    # a stored package that fails validation is refused (422), and the others keep working
    store.put("junk", b"not a package at all")
    assert run(srv.predict(request({}, ["junk"], [1]))).error.code == "broken_task"
    assert run(srv.predict(request(versions, ["a"], [1]))).error is None


def test_text_requests_of_different_lengths_share_one_padded_batch(tmp_path):
    path = make_text_model(tmp_path / "bert")
    store = DirectoryTaskStore(tmp_path / "store")
    bb = build_local_backbone(text_cfg(path), None)
    v = store.put("t", package_bytes(random_package(bb, "t", seed=3)))
    srv = BackboneServer({"name": "text", "backbone": text_cfg(path), "device": "cpu", "max_batch_size": 8},
                         {"path": str(tmp_path / "store")}, {}, sync_interval_s=3600)
    try:
        texts = ["good", "the movie was not very fun at all", "a bad plot"]
        chunks = [srv.prepare_inputs([PredictInput("t", v, x)], 3)[0][1] for x in texts]
        merged = srv.run_chunks(chunks)  # one forward, right-padded to the longest text
        ref = Engine(build_local_backbone(text_cfg(path), None))
        ref.register(store.get("t"))
        for x, m in zip(texts, merged):
            want = predict(ref, [x], ["t"], top_k=3)[0]
            got = m.predictions[0]
            assert got["batch_size"] == 3
            assert got["label"] == want["label"] and abs(got["score"] - want["score"]) < 1e-4
        bad = run(srv.predict(PredictCall([PredictInput("t", v, "fine")], top_k=1)))
        assert bad.error is None and len(bad.predictions) == 1
    finally:
        srv.close()
