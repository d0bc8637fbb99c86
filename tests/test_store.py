"""The directory task store: no lost registration under concurrency, stale temp files swept,
broken packages reported as broken, versions and metadata that always agree with the file."""
import multiprocessing as mp
import os
import threading
import time

import pytest

from conftest import tiny_mlp
from grft_serve.core.package import SUFFIX, package_bytes
from grft_serve.store import BaseTaskStore, DirectoryTaskStore, StoredTask, TaskExistsError, TaskNotFoundError, \
    content_version
from grft_serve.testing import random_package


@pytest.fixture(scope="module")
def blobs():
    """Eight different valid packages, all for task id "t"."""
    net = tiny_mlp()
    return [package_bytes(random_package(net, "t", k=1 + i % 3, seed=i)) for i in range(8)]


def _race(n: int, fn) -> list:
    """Run ``fn(i)`` in ``n`` threads released at once; each result is a value or the exception."""
    barrier, out = threading.Barrier(n), [None] * n

    def run(i):
        barrier.wait()
        try:
            out[i] = fn(i)
        except Exception as e:  # noqa: BLE001 - recorded for the assertions
            out[i] = e
    threads = [threading.Thread(target=run, args=(i,)) for i in range(n)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    return out


def _no_temp_files(root):
    return [p.name for p in root.iterdir() if p.name.endswith(".tmp")] == []


def test_concurrent_puts_of_a_new_id_exactly_one_wins_threads(tmp_path, blobs):
    store = DirectoryTaskStore(tmp_path)
    for rnd in range(15):
        tid = f"task{rnd}"
        res = _race(len(blobs), lambda i: store.put(tid, blobs[i]))
        wins = [i for i, r in enumerate(res) if isinstance(r, str)]
        assert len(wins) == 1, f"round {rnd}: {len(wins)} registrations of one new id succeeded"
        assert all(isinstance(r, TaskExistsError) for i, r in enumerate(res) if i != wins[0]), res
        assert store.get(tid) == blobs[wins[0]]
        assert res[wins[0]] == content_version(blobs[wins[0]]) == store.versions()[tid]
    assert _no_temp_files(tmp_path)


def _put_in_process(root, tid, data, barrier, results, i):
    barrier.wait()
    try:
        DirectoryTaskStore(root).put(tid, data)
        results.put((i, "ok"))
    except TaskExistsError:
        results.put((i, "exists"))
    except Exception as e:  # noqa: BLE001
        results.put((i, repr(e)))


def test_concurrent_puts_of_a_new_id_exactly_one_wins_processes(tmp_path, blobs):
    ctx = mp.get_context("fork")
    n = 6
    for rnd in range(3):
        tid = f"p{rnd}"
        barrier, results = ctx.Barrier(n), ctx.Queue()
        procs = [ctx.Process(target=_put_in_process, args=(str(tmp_path), tid, blobs[i], barrier, results, i))
                 for i in range(n)]
        for p in procs:
            p.start()
        for p in procs:
            p.join(60)
        got = dict(results.get(timeout=10) for _ in range(n))
        wins = [i for i, r in got.items() if r == "ok"]
        assert len(wins) == 1 and sorted(r for r in got.values() if r != "ok") == ["exists"] * (n - 1), got
        assert DirectoryTaskStore(tmp_path).get(tid) == blobs[wins[0]]
    assert _no_temp_files(tmp_path)


def test_put_without_replace_racing_delete_is_one_or_the_other(tmp_path, blobs):
    store = DirectoryTaskStore(tmp_path)
    for rnd in range(20):
        store.put("t", blobs[0], replace=True)
        res = _race(2, lambda i: store.put("t", blobs[1]) if i == 0 else store.delete("t"))
        put, delete = res
        assert delete is None  # the task existed until the delete
        if isinstance(put, TaskExistsError):  # put saw the old task: the delete then removed it
            assert "t" not in store.versions()
        else:  # the delete went first: the new package is stored, whole
            assert put == content_version(blobs[1]) and store.get("t") == blobs[1]
            store.delete("t")
    assert _no_temp_files(tmp_path)


def test_replace_and_exists(tmp_path, blobs):
    store = DirectoryTaskStore(tmp_path)
    v0 = store.put("t", blobs[0])
    with pytest.raises(TaskExistsError):
        store.put("t", blobs[1])
    assert store.get("t") == blobs[0] and store.versions() == {"t": v0}
    v1 = store.put("t", blobs[1], replace=True)
    assert v1 != v0 and store.get("t") == blobs[1] and store.versions() == {"t": v1}
    assert store.info("t").meta["k"] == 2  # the cached header follows the new file
    store.delete("t")
    with pytest.raises(TaskNotFoundError):
        store.delete("t")
    with pytest.raises(TaskNotFoundError):
        store.info("t")
    assert store.versions() == {} and store.list() == {} and _no_temp_files(tmp_path)


def test_task_id_is_matched_whole(tmp_path):
    store = DirectoryTaskStore(tmp_path)
    for bad in ("abc\n", "../x", "", ".hidden", "a" * 129, "a/b"):
        with pytest.raises(ValueError, match="invalid task id"):
            store.path(bad)
    assert store.path("a.b-c_1").name == "a.b-c_1" + SUFFIX


def _temp(root, name, age_s):
    p = root / f".{name}{SUFFIX}.x1y2z3{'.tmp'}"
    p.write_bytes(b"half a package")
    t = time.time() - age_s
    os.utime(p, (t, t))
    return p


def test_stale_temp_files_are_swept(tmp_path, blobs):
    old = _temp(tmp_path, "killed", 7200)
    fresh = _temp(tmp_path, "writing", 5)
    other = tmp_path / "notes.tmp"  # not a store temp file: left alone
    other.write_text("x")
    store = DirectoryTaskStore(tmp_path, stale_tmp_s=3600)
    assert not old.exists() and fresh.exists() and other.exists()
    store.put("t", blobs[0])
    assert store.versions() == {"t": content_version(blobs[0])}  # temp files are never tasks
    # and periodically while serving: a writer killed now is cleaned up later
    store.stale_tmp_s = 1
    late = _temp(tmp_path, "killed2", 30)
    store.sweep_interval_s = 0
    store.list()
    assert not late.exists() and not fresh.exists() and other.exists()


def _pkg(tid: str, seed: int = 0) -> bytes:
    return package_bytes(random_package(tiny_mlp(), tid, k=1, seed=seed))


def test_broken_packages_are_reported_not_listed_as_tasks(tmp_path, blobs):
    store = DirectoryTaskStore(tmp_path)
    good_blob, cut_blob = _pkg("good"), _pkg("cut", 1)
    store.put("good", good_blob)
    (tmp_path / f"cut{SUFFIX}").write_bytes(cut_blob[: len(cut_blob) - 7])
    (tmp_path / f"junk{SUFFIX}").write_bytes(b"not a package at all")
    store.put("copy", blobs[0])  # a package of task "t" stored under another name: no replica could serve it
    listing = store.list()
    assert set(listing) == {"good", "cut", "junk", "copy"}
    good = listing["good"]
    assert good.broken is None and good.meta["task_id"] == "good" and good.bytes == len(good_blob)
    assert good.num_params > 0 and good.version == content_version(good_blob)
    assert listing["cut"].broken.startswith("truncated:") and listing["cut"].meta == {}
    assert listing["junk"].broken.startswith("not_safetensors:")
    assert listing["copy"].broken.startswith("task_id_mismatch:") and listing["copy"].meta == {}
    assert store.info("cut") == listing["cut"]
    # repaired in place (a new file): reported healthy again
    store.put("cut", cut_blob, replace=True)
    assert store.info("cut").broken is None and store.info("cut").version == content_version(cut_blob)


def test_info_agrees_with_load(tmp_path, blobs):
    from grft_serve.core.package import load_package

    store = DirectoryTaskStore(tmp_path)
    store.put("t", blobs[2])
    pkg = load_package(blobs[2])
    i = store.info("t")
    assert i.num_params == pkg.num_params() and i.meta == pkg.meta.model_dump(mode="json")


class _MemoryStore(BaseTaskStore):
    """A dict-backed store: what an object-store backend implements (the four core methods)."""

    def __init__(self):
        self.data: dict[str, bytes] = {}

    def put(self, task_id, data, replace=False):
        if task_id in self.data and not replace:
            raise TaskExistsError(task_id)
        self.data[task_id] = data
        return content_version(data)

    def get(self, task_id):
        try:
            return self.data[task_id]
        except KeyError:
            raise TaskNotFoundError(task_id) from None

    def delete(self, task_id):
        self.data.pop(task_id)

    def versions(self):
        return {t: content_version(d) for t, d in self.data.items()}


def test_base_store_derives_info_and_list(blobs):
    s = _MemoryStore()
    s.put("t", blobs[0])
    s.put("b", blobs[0][:40])
    got = s.list()
    assert isinstance(got["t"], StoredTask) and got["t"].broken is None and got["t"].meta["labels"]
    assert got["b"].broken and got["b"].version == content_version(blobs[0][:40])
    with pytest.raises(TaskNotFoundError):
        s.info("zz")


def _in_thread(fn, timeout: float = 5.0):
    """``fn()`` in a daemon thread; fails the test if it does not return in ``timeout`` s (a FIFO
    opened for reading blocks until a writer comes, forever)."""
    out: dict = {}

    def run():
        try:
            out["value"] = fn()
        except Exception as e:  # noqa: BLE001 - re-raised below
            out["error"] = e
    t = threading.Thread(target=run, daemon=True)
    t.start()
    t.join(timeout)
    assert not t.is_alive(), f"{fn} blocked for {timeout} s"
    if "error" in out:
        raise out["error"]
    return out["value"]


def test_entries_that_are_not_regular_files_are_never_opened_listed_or_served(tmp_path, blobs):
    store = DirectoryTaskStore(tmp_path)
    store.put("t", blobs[0])
    os.mkfifo(tmp_path / f"fifo{SUFFIX}")
    (tmp_path / f"dir{SUFFIX}").mkdir()
    (tmp_path / f"alias{SUFFIX}").symlink_to(tmp_path / f"t{SUFFIX}")
    (tmp_path / f"zero{SUFFIX}").symlink_to("/dev/zero")
    assert set(_in_thread(store.list)) == {"t"}  # the FIFO used to block list() forever
    for tid in ("fifo", "dir", "alias", "zero"):
        for op in (store.get, store.info, store.delete):
            with pytest.raises(TaskNotFoundError):
                _in_thread(lambda: op(tid))
    assert (tmp_path / f"dir{SUFFIX}").is_dir() and (tmp_path / f"alias{SUFFIX}").is_symlink()  # left alone
    with pytest.raises(TaskExistsError, match="directory"):  # a directory under the name: 409, not a crash
        store.put("dir", blobs[0], replace=True)
    store.put("alias", _pkg("alias"), replace=True)  # replacing an alias publishes a real file
    assert store.info("alias").broken is None and (tmp_path / f"t{SUFFIX}").read_bytes() == blobs[0]
