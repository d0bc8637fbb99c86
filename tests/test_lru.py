"""The one LRU class (host tier, device tier, slot map): order, sizes, pins, holds, over-cap, on_evict."""
from grft_serve.engine.lru import LRU


class Blob:
    def __init__(self, n):
        self.nbytes = n


def sized(capacity, **kw):
    evicted = []
    lru = LRU(capacity, getsizeof=lambda b: b.nbytes, on_evict=lambda k, v: evicted.append(k), **kw)
    return lru, evicted


def test_eviction_order_is_least_recently_used_and_counted():
    lru, evicted = sized(30)
    for k in "abc":
        lru.put(k, Blob(10))
    assert lru.get("a") is not None  # a is now the most recent: b is the oldest
    lru.touch("b")  # ...until b is touched (no counting): c is the oldest
    assert list(lru) == ["c", "a", "b"]
    assert lru.get("zz") is None
    assert (lru.hits, lru.misses) == (1, 1)
    out = lru.make_room(15)  # 30 + 15 > 30: two must go, oldest first
    assert [k for k, _ in out] == ["c", "a"] == evicted
    assert list(lru) == ["b"] and lru.size == 10 and lru.evictions == 2 and lru.over_cap == 0
    assert lru.make_room(20) == [] and lru.size_of("b") == 10 and lru.size_of("c") == 0


def test_put_never_evicts_and_replacing_resizes():
    lru, evicted = sized(10)
    lru.put("a", Blob(8))
    lru.put("b", Blob(8))  # over the cap until someone makes room
    assert lru.size == 16 and evicted == []
    lru.put("b", Blob(1))  # replace: the old size goes
    assert lru.size == 9 and list(lru) == ["a", "b"]
    assert lru.pop("a").nbytes == 8 and evicted == [] and lru.evictions == 0  # pop is not an eviction
    assert lru.pop("a") is None


def test_pins_and_holds_protect_and_the_map_reports_going_over_cap():
    lru, evicted = sized(20)
    for k in "abc":
        lru.put(k, Blob(10))
    lru.pin("a")
    lru.hold(["b"])
    lru.hold(["b"])  # two users
    assert [k for k, _ in lru.make_room(0)] == ["c"]
    assert lru.make_room(10) == [] and lru.over_cap == 1 and evicted == ["c"]  # everything left is protected
    lru.release(["b"])
    assert lru.holds("b") == 1 and lru.make_room(10) == []  # still one user
    lru.release(["b"])
    assert lru.holds("b") == 0 and [k for k, _ in lru.make_room(10)] == ["b"]
    assert lru.pinned("a") and list(lru) == ["a"]
    lru.unpin("a")
    assert [k for k, _ in lru.make_room(20)] == ["a"] and len(lru) == 0


def test_keep_and_evictable_veto_eviction():
    only_copy = {"x"}
    lru, evicted = sized(10, evictable=lambda k: k not in only_copy)
    for k in "xyz":
        lru.put(k, Blob(5))
    out = lru.make_room(5, keep=["y"])  # x may not go, y is kept by the caller: z goes, still over
    assert [k for k, _ in out] == ["z"] and lru.over_cap == 1 and list(lru) == ["x", "y"]
    assert [k for k, _ in lru.make_room(5)] == ["y"] and evicted == ["z", "y"]


def test_pins_belong_to_the_key_and_survive_pop_and_reinsertion():
    lru, _ = sized(10)
    lru.pin("a")  # before the key exists
    lru.put("a", Blob(10))
    lru.pop("a")
    lru.put("a", Blob(10))  # a replace keeps the pin
    lru.put("b", Blob(10))
    assert [k for k, _ in lru.make_room(0)] == ["b"] and list(lru) == ["a"]


def test_resize_and_unbounded_and_slot_style_counting():
    slots = LRU(2)  # size 1 per key: a slot map with two slots
    slots.put("t0", 0)
    slots.put("t1", 1)
    assert not slots.fits(1) and [k for k, _ in slots.make_room(1)] == ["t0"]
    slots.put("t2", 0)
    slots.capacity = 4  # growing capacity: nothing to evict
    assert slots.make_room(2) == [] and slots.fits(2)
    assert [k for k, _ in slots.resize(1)] == ["t1"] and list(slots) == ["t2"]
    free = LRU(None, getsizeof=lambda b: b.nbytes)
    free.put("a", Blob(1 << 40))
    assert free.fits(1 << 40) and free.make_room(1 << 40) == [] and free.stats()["over_cap"] == 0
    assert free.stats() == {"len": 1, "size": 1 << 40, "capacity": None, "hits": 0, "misses": 0,
                            "evictions": 0, "over_cap": 0}
