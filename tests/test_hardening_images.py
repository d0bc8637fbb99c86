"""Image decode under attack: scan bombs, decode deadlines and cancellation, draft and decoded-byte
budgets, image-by-image preprocessing, and a decode pool that one request cannot hold.

The decoder and the backbone server as plain objects (no Ray); the same attacks over HTTP, beside a
canary, are in tests/test_hardening_http.py.
"""
from __future__ import annotations

import asyncio
import threading
import time

import psutil
import pytest

from app_fixtures import (SEED, VIT_CFG, PeakRss, build_local_backbone, flat_image,
                          png_bytes, progressive_jpeg)
from grft_serve.app.config import Limits
from grft_serve.app.inputs import check_image, decode_image, jpeg_scans
from grft_serve.app.schemas import ApiError
from grft_serve.core.package import package_bytes
from grft_serve.testing import random_package

pytestmark = pytest.mark.timeout(300)


def _raises(fn, *args, **kw) -> ApiError:
    with pytest.raises(ApiError) as e:
        fn(*args, **kw)
    return e.value


# -- the decoder ------------------------------------------------------------------------------------
def test_scan_bombs_are_refused_from_the_markers():
    bomb = progressive_jpeg(1000, 1000, 2000)  # 74 KB; libjpeg needs seconds for it
    assert jpeg_scans(bomb, 10_000) == 2000
    t0 = time.monotonic()
    e = _raises(check_image, bomb, 0, Limits())
    assert e.status == 413 and e.code == "image_too_complex" and time.monotonic() - t0 < 0.1
    # few scans over many pixels is the same work: capped by scans x pixels
    e = _raises(decode_image, progressive_jpeg(3000, 3000, 90), Limits())
    assert e.code == "image_too_complex" and "scans x pixels" in e.message
    ordinary = flat_image(800, 600, "JPEG", progressive=True)  # libjpeg's own script: 10 scans
    assert jpeg_scans(ordinary, 100) <= 12 and check_image(ordinary, 0, Limits()) == ordinary


def test_a_decode_stops_at_its_deadline_or_when_cancelled():
    big = flat_image(6000, 6000)  # ~100 KB of PNG, 108 MB of pixels
    t0 = time.monotonic()
    decode_image(big, Limits())
    full = time.monotonic() - t0
    t0 = time.monotonic()
    e = _raises(decode_image, big, Limits(decode_timeout_s=0.001))
    assert e.status == 413 and e.code == "image_too_complex" and time.monotonic() - t0 < full / 2
    cancel = threading.Event()
    threading.Timer(0.01, cancel.set).start()
    t0 = time.monotonic()
    e = _raises(decode_image, big, Limits(), cancel=cancel)
    assert e.status == 408 and e.code == "cancelled" and time.monotonic() - t0 < full / 2 + 0.01


def test_jpeg_is_drafted_to_the_size_preprocessing_needs():
    data = flat_image(4000, 3000, "JPEG")
    img = decode_image(data, Limits(), min_side=35)
    assert img.mode == "RGB" and min(img.size) >= 35 and img.size == (500, 375)  # DCT scaling by 1/8
    assert decode_image(data, Limits(), min_side=1000).size == (2000, 1500)
    assert decode_image(data, Limits()).size == (4000, 3000)


# -- the backbone server (no Ray) ------------------------------------------------------------------
@pytest.fixture(scope="module")
def server(tmp_path_factory):
    from grft_serve.app import BackboneServer
    from grft_serve.store import DirectoryTaskStore

    root = tmp_path_factory.mktemp("img-replica")
    store = DirectoryTaskStore(root)
    bb = build_local_backbone(VIT_CFG)
    versions = {t: store.put(t, package_bytes(random_package(bb, t, seed=i))) for i, t in enumerate("ab")}
    srv = BackboneServer({"name": "vit", "backbone": VIT_CFG, "seed": SEED, "device": "cpu", "max_batch_size": 16,
                          "decode_workers": 1}, {"path": str(root)}, {}, sync_interval_s=3600)
    yield srv, versions
    srv.close()


def _request(versions, task, inputs):
    return {"items": [{"task": task, "version": versions[task], "input": x} for x in inputs], "top_k": 1}


def test_images_are_preprocessed_one_by_one_within_a_decoded_bytes_budget(server):
    """Eight 4000 x 4000 PNGs (48 MB of pixels each) used to be held decoded all at once."""
    srv, versions = server
    req = _request(versions, "a", [flat_image(4000, 4000)] * 8)
    with PeakRss(psutil.Process()) as mem:
        res = asyncio.run(srv.predict(req))
    assert len(res["predictions"]) == 8
    assert mem.grew_mb < 200, f"decoding grew the process by {mem.grew_mb:.0f} MB (8 images hold 384 MB)"
    srv.limits = Limits(max_decoded_bytes=100 << 20)
    try:
        res = asyncio.run(srv.predict(req))
    finally:
        srv.limits = Limits()
    assert res["error"]["status"] == 413 and res["error"]["code"] == "too_many_pixels" and res["index"] == 2


def test_one_request_cannot_hold_the_decode_pool(server):
    """One decode thread: a request of 16 slow images is decoded in slices, so a one-image request
    that arrives after it is served long before it ends (it used to wait for all 16)."""
    srv, versions = server
    slow = _request(versions, "a", [flat_image(3000, 3000)] * 16)
    quick = _request(versions, "b", [png_bytes(3)])

    async def go():
        t0 = time.monotonic()
        a = asyncio.create_task(srv.predict(slow))
        await asyncio.sleep(0.05)
        b = await srv.predict(quick)
        tb = time.monotonic() - t0
        ra = await a
        return ra, b, tb, time.monotonic() - t0

    ra, rb, tb, ta = asyncio.run(go())
    assert len(ra["predictions"]) == 16 and len(rb["predictions"]) == 1
    assert tb < ta / 3, (tb, ta)


def test_a_cancelled_request_stops_decoding(server):
    """Cancelled a moment in, a request of 16 slow images stops at its next image: the pool's one
    thread is free again after about one image, not sixteen."""
    srv, versions = server
    img = flat_image(3000, 3000)
    t0 = time.monotonic()
    srv.prepare_inputs(_request(versions, "a", [img] * 2)["items"], 1)
    one = (time.monotonic() - t0) / 2  # one slow image, on this machine now
    before = srv.stats()["decode_aborts"]["cancelled"]

    async def go():
        a = asyncio.create_task(srv.predict(_request(versions, "a", [img] * 16)))
        await asyncio.sleep(2 * one)
        a.cancel()
        t0 = time.monotonic()
        b = await srv.predict(_request(versions, "b", [png_bytes(4)]))
        return b, time.monotonic() - t0

    b, tb = asyncio.run(go())
    assert "predictions" in b and tb < 3 * one + 0.3, (tb, one)  # the image in flight, then b's own work
    assert srv.stats()["decode_aborts"]["cancelled"] == before + 1
