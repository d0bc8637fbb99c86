"""TaskCache: tiers, LRU order, caps, pins, in-use protection, lazy reloads, per-call usage."""
import pytest

from grft_serve.engine.tiers import TaskCache, UnknownTaskError


class Blob:
    def __init__(self, tid, n, where="host"):
        self.tid, self.nbytes, self.where = tid, n, where


def make(host=None, device=None, shared=False):
    uploads = []

    def upload(tid, h):
        uploads.append(tid)
        return Blob(tid, h.nbytes, "device")

    return TaskCache(upload, host_bytes=host, device_bytes=device, shared=shared), uploads


def test_device_lru_and_usage_per_call():
    c, uploads = make(device=20)
    for t in "abc":
        c.add(t, "v1", Blob(t, 10))
    with c.use(["a", "b"]) as (vals, u):
        assert [v.where for v in vals] == ["device", "device"] and (u.hits, u.misses, u.evictions) == (0, 2, 0)
    with c.use(["a"]) as (_, u):
        assert (u.hits, u.misses) == (1, 0)
    with c.use(["c"]) as (_, u):  # evicts b, the least recently used
        assert (u.misses, u.evictions) == (1, 1)
    assert c.device_ids() == ["a", "c"]
    assert {t: r["tier"] for t, r in c.residency().items()} == {"a": "device", "b": "host", "c": "device"}
    assert (c.hits(), c.misses(), c.evictions()) == (1, 3, 1) and uploads == ["a", "b", "c"]


def test_in_use_and_pinned_are_not_evicted():
    c, _ = make(device=20)
    for t in "abcd":
        c.add(t, "v1", Blob(t, 10))
    c.pin("a")
    with c.use(["b"]):
        with c.use(["c"]) as (_, u):  # a pinned, b in use: over the cap rather than evict them
            assert u.evictions == 0
        assert c.stats()["device_over_cap"] == 1
        with c.use(["d"]) as (_, u):  # c is no longer in use: it goes
            assert u.evictions == 1
        assert set(c.device_ids()) == {"a", "b", "d"}
    with c.use(["c"]):
        pass
    assert "a" in c.device_ids() and c.residency()["a"]["pinned"]
    c.unpin("a")
    with c.use(["b"]), c.use(["d"]):
        pass
    with c.use(["c"]):
        pass
    assert "a" not in c.device_ids()


def test_host_cap_reloads_lazily_and_keeps_unbacked_tasks():
    c, _ = make(host=25, device=100)
    loads = []

    def reload(t):
        def f():
            loads.append(t)
            return Blob(t, 10)
        return f

    c.add("mem", "v", Blob("mem", 10))  # no store behind it: never dropped from the host
    for t in "ab":
        c.add(t, "v", Blob(t, 10), reload(t))
    assert c.tier("a") == "store" and c.tier("b") == "host" and c.tier("mem") == "host"
    with c.use(["a"]) as (vals, u):
        assert u.store_loads == 1 and u.misses == 1 and vals[0].tid == "a"
    assert loads == ["a"] and c.misses("host") == 1
    assert c.nbytes("host") <= 25 and c.tier("mem") in ("host", "device")
    c.resize(host_bytes=0)
    assert c.tier("mem") != "store" and c.stats()["host_over_cap"] >= 1


def test_shared_device_tier_follows_the_host():
    c, _ = make(host=10, device=100, shared=True)
    c.add("a", "v", Blob("a", 10), lambda: Blob("a", 10))
    c.add("b", "v", Blob("b", 10), lambda: Blob("b", 10))
    with c.use(["a"]):
        pass
    assert c.tier("a") == "device" and c.tier("b") == "store"
    with c.use(["b"]) as (_, u):  # a leaves the host, so its (shared) device value goes with it
        assert u.evictions == 1
    assert c.tier("a") == "store" and c.device_ids() == ["b"]


def test_unknown_and_replace():
    c, _ = make(device=100)
    with pytest.raises(UnknownTaskError):
        with c.use(["x"]):
            pass
    c.add("a", "v1", Blob("a", 10))
    c.pin("a")
    c.add("a", "v2", Blob("a", 12))  # replace: the device copy goes, the pin stays
    assert c.tier("a") == "host" and c.version("a") == "v2" and c.residency()["a"]["pinned"]
    c.remove("a")
    assert "a" not in c and len(c) == 0
    with pytest.raises(UnknownTaskError):
        c.remove("a")
    with pytest.raises(ValueError):
        c.hits("disk")
