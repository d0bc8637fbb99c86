"""The engine: both paths equal a directly edited model, the base stays bit-exact, tiers and threads."""
import random
import threading

import pytest
import torch
from conftest import tiny_cnn, tiny_mlp, tiny_vit

from grft_serve.core.backbones import HFTextBackbone
from grft_serve.core.package import PackageError, package_bytes
from grft_serve.engine import Engine, TaskExistsError, UnknownTaskError
from grft_serve.testing import random_package, reference_forward


def tiny_llama(seed=0):
    from transformers import LlamaConfig, LlamaModel

    torch.manual_seed(seed)
    cfg = LlamaConfig(vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64)
    return HFTextBackbone(None, pooling="last", model=LlamaModel(cfg), model_id="llama/tiny")


def tiny_bert(seed=0):
    from transformers import BertConfig, BertModel

    torch.manual_seed(seed)
    cfg = BertConfig(vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                     num_attention_heads=4, max_position_embeddings=64, hidden_dropout_prob=0.0)
    return HFTextBackbone(None, pooling="mean", model=BertModel(cfg), model_id="bert/tiny")


def _tokens(n, T=7, seed=0):
    g = torch.Generator().manual_seed(seed)
    mask = torch.ones(n, T, dtype=torch.long)
    for i in range(n):
        mask[i, T - (i % 3):] = 0  # ragged lengths
    return {"input_ids": torch.randint(0, 64, (n, T), generator=g), "attention_mask": mask}


CASES = {
    "vit": (tiny_vit, lambda n: torch.randn(n, 3, 32, 32)),
    "cnn": (tiny_cnn, lambda n: torch.randn(n, 3, 48, 48)),
    "mlp": (tiny_mlp, lambda n: torch.randn(n, 12)),
    "llama": (tiny_llama, _tokens),
    "bert": (tiny_bert, _tokens),
}


def _snapshot(engine):
    return {n: (m.weight.detach().clone(), None if m.bias is None else m.bias.detach().clone())
            for n, m in engine.modules.items()}


def _assert_base_exact(engine, snap):
    for n, m in engine.modules.items():
        assert torch.equal(m.weight, snap[n][0]), f"weight of {n} changed"
        if m.bias is not None:
            assert torch.equal(m.bias, snap[n][1]), f"bias of {n} changed"


def _packages(bb):
    return [random_package(bb, "rows", mode="row", k=3, seed=1),
            random_package(bb, "rows-bias", mode="row", k=2, tune_bias=True, seed=2),
            random_package(bb, "cols", mode="column", k=3, seed=3),
            random_package(bb, "cols-bias", mode="column", k=1, tune_bias=True, seed=4)]


@pytest.mark.parametrize("case", list(CASES))
def test_both_paths_match_edited_model(case):
    make, data = CASES[case]
    bb = make()
    x = data(6)
    pkgs = _packages(bb)
    refs = [reference_forward(bb, p, x) for p in pkgs]
    with torch.no_grad():
        base_feats = bb.eval()(x)
    eng = Engine(bb)
    snap = _snapshot(eng)
    for p in pkgs:
        eng.register(p)
    for p, ref in zip(pkgs, refs):
        ids = [p.task_id] * 6
        patch = torch.stack(eng.forward(x, ids, path="patch")[0])
        over = torch.stack(eng.forward(x, ids, path="override")[0])
        assert torch.allclose(patch, ref, atol=1e-5, rtol=1e-5), (case, p.task_id)
        assert torch.allclose(over, ref, atol=1e-5, rtol=1e-5), (case, p.task_id)
        # the task really changes the backbone (its head on base features gives other logits)
        plain = torch.nn.functional.linear(base_feats, p.head_weight, p.head_bias)
        assert not torch.allclose(plain, ref, atol=1e-4), (case, p.task_id)
    # one mixed batch, every sample a different task in turn
    ids = [pkgs[i % 4].task_id for i in range(6)]
    mixed = eng.forward(x, ids)[0]
    for i in range(6):
        assert torch.allclose(mixed[i], refs[i % 4][i], atol=1e-5, rtol=1e-5)
    _assert_base_exact(eng, snap)


def _engine_with(bb, pkgs, **kw):
    eng = Engine(bb, **kw)
    for p in pkgs:
        eng.register(p)
    return eng


def test_auto_path_choice_and_counters(mlp):
    eng = _engine_with(mlp, _packages(mlp))
    x = torch.randn(4, 12)
    eng.forward(x, ["rows"] * 4)
    assert eng.counters["patch_batches"] == 1 and eng.counters["override_batches"] == 0
    eng.forward(x, ["rows", "cols", "rows", "cols"])
    assert eng.counters["override_batches"] == 1
    assert eng.stats()["samples"] == 8


class Boom(RuntimeError):
    pass


@pytest.mark.parametrize("case,n_batches", [("mlp", 2000), ("vit", 150), ("cnn", 40), ("llama", 120)])
def test_base_bit_exact_after_random_batches_with_failures(case, n_batches):
    """Thousands of random single- and mixed-task batches, some failing mid-forward."""
    make, data = CASES[case]
    bb = make()
    eng = Engine(bb)
    snap = _snapshot(eng)
    pkgs = _packages(bb) + [random_package(bb, f"extra{i}", k=1 + i, seed=10 + i, tune_bias=bool(i % 2))
                            for i in range(4)]
    names = [n for n, _ in iter_patchable_names(bb)]
    pkgs.append(with_all_biases(bb, random_package(bb, "allbias", k=2, seed=30), seed=30, bias_only=names[::2]))
    for p in pkgs:
        eng.register(p)
    ids_all = [p.task_id for p in pkgs]
    names = list(eng.modules)
    rng = random.Random(0)
    fail = {"on": False, "at": None}

    def maybe_fail(mod, inp, out):
        if fail["on"] and mod is fail["at"]:
            raise Boom("injected")

    # a hook registered after the engine's runs after the row op: the failure hits half-way
    handles = [m.register_forward_hook(maybe_fail) for m in eng.modules.values()]
    failures = 0
    try:
        for _ in range(n_batches):
            n = rng.randint(1, 5)
            ids = [rng.choice(ids_all)] * n if rng.random() < 0.5 else [rng.choice(ids_all) for _ in range(n)]
            path = rng.choice(["auto", "patch", "override"])
            fail["on"] = rng.random() < 0.3
            fail["at"] = eng.modules[rng.choice(names)]
            try:
                eng.forward(data(n), ids, path=path)
            except Boom:
                failures += 1
            assert not eng.hooks.active
    finally:
        for h in handles:
            h.remove()
    assert failures > 0
    _assert_base_exact(eng, snap)


def test_mixed_equals_sequential_many_tasks(vit):
    eng = Engine(vit)
    pkgs = [random_package(vit, f"t{i}", mode="row" if i % 3 else "column", k=1 + i % 4, seed=i,
                           tune_bias=i % 2 == 0) for i in range(16)]
    for p in pkgs:
        eng.register(p)
    x = torch.randn(32, 3, 32, 32)
    ids = [pkgs[i % 16].task_id for i in range(32)]
    mixed = eng.forward(x, ids, path="override")[0]
    for i in range(32):
        single = eng.forward(x[i:i + 1], [ids[i]], path="patch")[0][0]
        assert (mixed[i] - single).abs().max() <= 1e-5


def test_register_errors_change_nothing(vit, tmp_path):
    eng = Engine(vit)
    snap = _snapshot(eng)
    good = random_package(vit, "good", k=2)
    info = eng.register(good)
    with pytest.raises(TaskExistsError):
        eng.register(good)
    other = tiny_vit(seed=5)
    with pytest.raises(PackageError, match="fingerprint"):
        eng.register(random_package(other, "alien", k=2))
    with pytest.raises(PackageError):
        eng.register(b"garbage" * 10)
    assert [t.task_id for t in eng.tasks()] == ["good"] and eng.task("good").version == info.version
    _assert_base_exact(eng, snap)
    with pytest.raises(UnknownTaskError):
        eng.forward(torch.randn(1, 3, 32, 32), ["missing"])
    with pytest.raises(UnknownTaskError):
        eng.unregister("missing")
    # replace gives a new version and new answers
    new = random_package(vit, "good", k=2, seed=9)
    info2 = eng.register(package_bytes(new), replace=True)
    assert info2.version != info.version
    x = torch.randn(2, 3, 32, 32)
    assert torch.allclose(torch.stack(eng.forward(x, ["good"] * 2)[0]), reference_forward(vit, new, x), atol=1e-5)
    eng.unregister("good")
    assert eng.tasks() == []


def test_device_tier_lru_one_buffer_per_task(vit):
    pkgs = [random_package(vit, f"t{i}", k=2, seed=i) for i in range(4)]
    eng = Engine(vit, device_tier=True, device_cache_bytes=1)
    size = None
    for p in pkgs:
        size = eng.register(p).nbytes
    eng.cache.resize(device_bytes=2 * size)  # room for two tasks
    x = torch.randn(2, 3, 32, 32)
    refs = {p.task_id: reference_forward(vit, p, x) for p in pkgs}
    reports = []
    for tid in ["t0", "t1", "t0", "t2", "t3", "t0"]:
        res = eng.run(x, [tid] * 2)
        reports.append(res.report)
        assert len(res.logits) == 2 and list(res.infos) == [tid]
        assert res.versions == [eng.task(tid).version] * 2
        out = torch.stack(eng.forward(x, [tid] * 2)[0])  # a second batch: a hit
        assert torch.allclose(out, refs[tid], atol=1e-5)
    # each batch reports its own cache work: miss on the first call, hit on the repeat
    assert [(r.cache_hits, r.cache_misses) for r in reports] == [(0, 1), (0, 1), (1, 0), (0, 1), (0, 1), (0, 1)]
    assert [r.cache_evictions for r in reports] == [0, 0, 0, 1, 1, 1]
    assert all(r.path == "patch" and r.samples == 2 and r.seconds > 0 for r in reports)
    assert eng.cache.hits() == 7 and eng.cache.misses() == 5 and eng.cache.evictions() == 3
    assert eng.device_cache()["tasks"] == ["t3", "t0"]
    tiers = {t: r["tier"] for t, r in eng.residency().items()}
    assert tiers == {"t0": "device", "t1": "host", "t2": "host", "t3": "device"}
    # a batch needing more tasks than fit keeps them all while it runs, and reports it
    res = eng.run(torch.randn(4, 3, 32, 32), ["t0", "t1", "t2", "t3"])
    assert res.report.path == "override" and res.report.tasks == ["t0", "t1", "t2", "t3"]
    assert res.report.cache_misses == 2 and res.report.slot_loads == 4
    assert eng.cache.stats()["device_over_cap"] >= 1


def test_pinned_and_in_use_tasks_are_never_evicted(vit):
    pkgs = [random_package(vit, f"t{i}", k=2, seed=i) for i in range(5)]
    eng = Engine(vit, device_tier=True, device_cache_bytes=1, max_slots=2)
    size = max(eng.register(p).nbytes for p in pkgs)
    eng.cache.resize(device_bytes=2 * size)
    eng.pin("t0")
    assert eng.residency()["t0"]["tier"] == "device" and eng.residency()["t0"]["pinned"]
    x = torch.randn(2, 3, 32, 32)
    refs = {p.task_id: reference_forward(vit, p, x) for p in pkgs}
    seen = []

    def watch(mod, inp, out):  # runs inside the forward: the batch's tasks are in use right now
        seen.append({t: r["tier"] for t, r in eng.residency().items()})

    h = eng.modules[next(iter(eng.modules))].register_forward_hook(watch)
    try:
        for tid in ["t1", "t2", "t3", "t4", "t1"]:
            # t0 (pinned) and tid fill the cap; the in-use task must survive its own batch's loads
            out = eng.forward(x, ["t0", tid])[0]
            assert torch.allclose(out[0], refs["t0"][0], atol=1e-5)
            assert torch.allclose(out[1], refs[tid][1], atol=1e-5)
            assert seen[-1]["t0"] == "device" and seen[-1][tid] == "device"
            with eng.cache.use(["t2", "t3"]):  # held by a (simulated) running batch on another path
                eng.forward(x, ["t4", "t4"])
                assert eng.residency()["t2"]["tier"] == eng.residency()["t3"]["tier"] == "device"
    finally:
        h.remove()
    assert eng.residency()["t0"]["tier"] == "device" and eng.residency()["t0"]["slot"] is not None
    assert eng.cache.evictions() > 0
    v0 = eng.task("t0").version
    eng.register(random_package(vit, "t0", k=2, seed=99), replace=True)  # still pinned, back on the device
    assert eng.task("t0").version != v0 and eng.residency()["t0"]["tier"] == "device"
    eng.unpin("t0")
    for tid in ["t1", "t2", "t3"]:
        eng.forward(x, [tid] * 2)
    assert eng.residency()["t0"]["tier"] == "host"


def test_concurrent_registration_and_batches(vit):
    """Batches on several threads while tasks are registered and removed: no half-patched weights."""
    eng = Engine(vit)
    snap = _snapshot(eng)
    stable = [random_package(vit, f"s{i}", k=3, seed=i, tune_bias=True) for i in range(3)]
    for p in stable:
        eng.register(p)
    x = torch.randn(4, 3, 32, 32)
    refs = {p.task_id: reference_forward(vit, p, x) for p in stable}
    errors = []
    stop = threading.Event()

    def runner(seed):
        rng = random.Random(seed)
        try:
            for _ in range(40):
                ids = [rng.choice(list(refs)) for _ in range(4)]
                if rng.random() < 0.5:
                    ids = [ids[0]] * 4
                out = eng.forward(x, ids)[0]
                for i, tid in enumerate(ids):
                    if not torch.allclose(out[i], refs[tid][i], atol=1e-5):
                        errors.append((tid, i))
        except Exception as e:  # noqa: BLE001
            errors.append(e)

    churn_pkgs = [random_package(vit, f"churn{i % 3}", k=2, seed=100 + i) for i in range(60)]

    def churn():
        i = 0
        while not stop.is_set() and i < len(churn_pkgs):
            p = churn_pkgs[i]
            eng.register(p, replace=True)
            if i % 2:
                eng.unregister(p.task_id)
            i += 1

    threads = [threading.Thread(target=runner, args=(s,)) for s in range(3)]
    ch = threading.Thread(target=churn)
    for t in threads + [ch]:
        t.start()
    for t in threads:
        t.join(timeout=120)
    stop.set()
    ch.join(timeout=60)
    assert not errors, errors[:3]
    _assert_base_exact(eng, snap)


def test_sync_from_store(vit, tmp_path):
    from grft_serve.store import DirectoryTaskStore

    store = DirectoryTaskStore(tmp_path)
    a, b = random_package(vit, "a", k=1, seed=1), random_package(vit, "b", k=1, seed=2)
    store.put("a", package_bytes(a))
    store.put("b", package_bytes(b))
    (tmp_path / "bad.grft.safetensors").write_bytes(b"not a package")
    eng = Engine(vit)
    res = eng.sync(store)
    assert sorted(res["added"]) == ["a", "b"] and res["failed"] == ["bad"]
    store.delete("a")
    store.put("b", package_bytes(random_package(vit, "b", k=1, seed=3)), replace=True)
    res = eng.sync(store)
    assert res["removed"] == ["a"] and res["added"] == ["b"]
    assert eng.task("b").version == store.versions()["b"]


# ---------------------------------------------------------------------------------------------
# biases on bias-free modules, bias-only modules, slot tables, store-backed tiers
# ---------------------------------------------------------------------------------------------
def with_all_biases(bb, pkg, seed=0, bias_only=()):
    """``pkg`` with a bias on EVERY patchable module (also where the base has none), and the modules in
    ``bias_only`` reduced to k = 0 with only a bias (what ``fit.bias: all`` trains)."""
    from grft_serve.core.rowop import ModuleDelta
    from grft_serve.core.spec import iter_patchable

    g = torch.Generator().manual_seed(seed)
    mods = dict(iter_patchable(bb, bb.exclude_from_patching()))
    deltas = {}
    for name, m in mods.items():
        d = pkg.deltas.get(name)
        base_b = m.bias.detach().float() if m.bias is not None else torch.zeros(m.weight.shape[0])
        bias = base_b + 0.2 * torch.randn(base_b.shape, generator=g)
        if d is None or name in bias_only:
            dim = 0 if pkg.meta.mode == "row" else 1
            shape = list(m.weight.shape)
            shape[dim] = 0
            d = ModuleDelta(pkg.meta.mode, torch.zeros(0, dtype=torch.long), torch.zeros(shape))
        deltas[name] = ModuleDelta(d.mode, d.indices, d.values, bias)
    pkg.deltas = deltas
    return pkg


@torch.no_grad()
def merged_reference(bb, pkg, x):
    """Logits of ``pkg`` on a deep copy of ``bb`` with weights edited and biases attached."""
    import copy

    net = copy.deepcopy(bb).eval()
    mods = dict(net.named_modules())
    for name, d in pkg.deltas.items():
        m = mods[name]
        m.weight.index_copy_(0 if d.mode == "row" else 1, d.indices, d.values.to(m.weight.dtype))
        if d.bias is not None:
            m.bias = torch.nn.Parameter(d.bias.to(m.weight.dtype).clone())
    return torch.nn.functional.linear(net(x).float(), pkg.head_weight.float(), pkg.head_bias.float())


@pytest.mark.parametrize("case", ["mlp", "llama", "cnn"])
def test_biases_on_bias_free_modules_both_paths(case):
    make, data = CASES[case]
    bb = make()
    x = data(5)
    names = [n for n, _ in iter_patchable_names(bb)]
    pkgs = [with_all_biases(bb, random_package(bb, "rb", mode="row", k=2, seed=1), seed=1, bias_only=names[::3]),
            random_package(bb, "plain", mode="row", k=3, seed=2)]
    if case != "cnn":
        pkgs.append(with_all_biases(bb, random_package(bb, "cb", mode="column", k=2, seed=3), seed=3,
                                    bias_only=names[1::3]))
    refs = [merged_reference(bb, p, x) for p in pkgs]
    with torch.no_grad():
        base_out = bb.eval()(x).clone()
    eng = Engine(bb)
    snap = _snapshot(eng)
    for p in pkgs:
        eng.register(p)
    for p, ref in zip(pkgs, refs):
        for path in ("patch", "override"):
            out = torch.stack(eng.forward(x, [p.task_id] * 5, path=path)[0])
            assert torch.allclose(out, ref, atol=1e-5, rtol=1e-5), (case, p.task_id, path)
    ids = [pkgs[i % len(pkgs)].task_id for i in range(5)]
    mixed = eng.forward(x, ids, path="override")[0]
    for i in range(5):
        single = eng.forward(x[i:i + 1] if not isinstance(x, dict) else {k: v[i:i + 1] for k, v in x.items()},
                             [ids[i]], path="patch")[0][0]
        assert (mixed[i] - single).abs().max() <= 1e-5
    _assert_base_exact(eng, snap)
    # bias-free modules are bias-free again after every patch: the base's outputs are unchanged
    assert all(m.bias is None for n, m in eng.modules.items() if not eng.spec.modules[n].has_bias)
    with torch.no_grad():
        assert torch.equal(eng.backbone(x), base_out)


def iter_patchable_names(bb):
    from grft_serve.core.spec import iter_patchable

    return iter_patchable(bb, bb.exclude_from_patching())


def test_slot_tables_reuse_and_grow_stay_exact(vit):
    """More tasks than slots, k growing after tasks are slotted, row/column/bias mixes: every mixed
    batch equals per-task sequential outputs, and slot loads happen once per task while it stays."""
    eng = Engine(vit, max_slots=4)
    pkgs = [random_package(vit, f"t{i}", mode="row" if i % 3 else "column", k=1 + i % 3, seed=i,
                           tune_bias=i % 2 == 0, n_labels=2 + i % 3) for i in range(9)]
    pkgs.append(random_package(vit, "wide", k=7, seed=50, n_labels=9))  # used late: tables and heads grow
    for p in pkgs:
        eng.register(p)
    x = torch.randn(6, 3, 32, 32)
    seq = {p.task_id: torch.stack(eng.forward(x, [p.task_id] * 6, path="patch")[0]) for p in pkgs}
    rng = random.Random(0)
    ids_all = [p.task_id for p in pkgs]
    for step in range(25):
        ids = [rng.choice(ids_all[:9] if step < 10 else ids_all) for _ in range(6)]
        res = eng.run(x, ids, path="override")
        again = eng.run(x, ids, path="override")
        assert again.report.slot_loads == 0  # its tasks are in the slots now
        out = eng.forward(x, ids, path="override")[0]
        for i, t in enumerate(ids):
            assert out[i].shape == seq[t][i].shape and (out[i] - seq[t][i]).abs().max() <= 1e-5, (step, t)
        assert res.report.slot_loads <= len(set(ids))
    st = eng.stats()
    assert st["slot_evictions"] > 0 and st["slots"] >= 4 and st["slot_bytes"] > 0


def test_store_tier_lazy_reload(vit, tmp_path):
    """A capped host tier drops store-backed tasks and reloads them on the first batch that needs them."""
    from grft_serve.store import DirectoryTaskStore

    store = DirectoryTaskStore(tmp_path)
    pkgs = [random_package(vit, f"s{i}", k=2, seed=i) for i in range(4)]
    for p in pkgs:
        store.put(p.task_id, package_bytes(p))
    eng = Engine(vit, host_cache_bytes=1)
    res = eng.sync(store)
    assert sorted(res["added"]) == ["s0", "s1", "s2", "s3"]
    tiers = {t: r["tier"] for t, r in eng.residency().items()}
    assert list(tiers.values()).count("store") >= 3  # the cap keeps at most the newest
    x = torch.randn(2, 3, 32, 32)
    for p in pkgs:
        r = eng.run(x, [p.task_id] * 2)
        assert r.report.store_loads in (0, 1) and r.versions[0] == eng.task(p.task_id).version
        assert torch.allclose(torch.stack(eng.forward(x, [p.task_id] * 2)[0]), reference_forward(vit, p, x),
                              atol=1e-5)
    assert eng.cache.misses("host") >= 3
    # a task registered from bytes (no store behind it) never leaves the host tier
    eng.register(random_package(vit, "only-here", k=1, seed=9))
    for p in pkgs:
        eng.forward(x, [p.task_id] * 2)
    assert eng.residency()["only-here"]["tier"] in ("host", "device")
    store.delete("s0")
    eng.cache.resize(host_bytes=1)
    with pytest.raises(UnknownTaskError, match="no longer in the store"):
        for _ in range(2):  # s0 is evicted by now or after one more batch of the others
            eng.forward(x, ["s1", "s1"])
            eng.forward(x, ["s0", "s0"])


@pytest.mark.parametrize("case", ["vit", "llama"])
def test_graph_runner_static_path_matches_eager(case):
    """The graph runner's static buffers and static plans (whole slot tables, mask and bias always on,
    batches padded to a bucket) give the eager engine's outputs; on CPU it runs without capturing."""
    make, data = CASES[case]
    bb_a, bb_b = make(), make()
    pkgs = _packages(bb_a) + [with_all_biases(bb_a, random_package(bb_a, "ab", k=2, seed=7), seed=7)]
    eager, graphed = Engine(bb_a), Engine(bb_b, graphs=True)
    snap = _snapshot(graphed)
    for p in pkgs:
        eager.register(p)
        graphed.register(p)
    ids_all = [p.task_id for p in pkgs]
    rng = random.Random(1)
    for n in (1, 3, 5, 3):  # buckets 1, 4, 8, 4 (reused)
        x = data(n)
        for ids in ([ids_all[0]] * n, [ids_all[-1]] * n, [rng.choice(ids_all) for _ in range(n)]):
            for path in ("patch", "override"):
                a = torch.stack(eager.forward(x, ids, path=path)[0])
                b = torch.stack(graphed.forward(x, ids, path=path)[0])
                assert (a - b).abs().max() <= 1e-5, (case, n, ids, path)
    st = graphed.stats()
    assert st["graphs"] >= 4 and st["graph_replays"] > st["graphs"] and st["graph_captures"] == 0
    _assert_base_exact(graphed, snap)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.parametrize("case", ["vit", "llama"])
def test_cuda_graphs_match_eager_and_reference(case):
    """On a GPU: captured graphs (patch and override) equal the eager CUDA engine and the merged
    reference, the base stays bit-exact, and graphs are captured once per (path, bucket)."""
    make, data = CASES[case]
    bb_a, bb_b, bb_ref = make(), make(), make()
    x = data(6)
    pkgs = _packages(bb_ref) + [with_all_biases(bb_ref, random_package(bb_ref, "ab", k=2, seed=7), seed=7)]
    refs = [merged_reference(bb_ref, p, x) for p in pkgs]
    eager = Engine(bb_a, device="cuda")
    graphed = Engine(bb_b, device="cuda", graphs=True)
    snap = _snapshot(graphed)
    for p in pkgs:
        eager.register(p)
        graphed.register(p)
    for _ in range(3):
        for p, ref in zip(pkgs, refs):
            for path in ("patch", "override"):
                g = torch.stack(graphed.forward(x, [p.task_id] * 6, path=path)[0])
                e = torch.stack(eager.forward(x, [p.task_id] * 6, path=path)[0])
                assert torch.allclose(g, ref, atol=1e-4, rtol=1e-4), (p.task_id, path)
                assert torch.allclose(g, e, atol=1e-5, rtol=1e-5), (p.task_id, path)
        ids = [pkgs[i % len(pkgs)].task_id for i in range(6)]
        g = graphed.forward(x, ids)[0]
        for i in range(6):
            assert torch.allclose(g[i], refs[i % len(pkgs)][i], atol=1e-4, rtol=1e-4)
    st = graphed.stats()
    if case == "vit":  # a model whose forward syncs with the host (HF mask checks) falls back to eager
        assert st["graph_failures"] == 0 and st["graph_captures"] >= 2
        assert st["graph_replays"] > st["graph_captures"]
    _assert_base_exact(graphed, snap)


def test_run_reports_and_rejects(mlp):
    eng = _engine_with(mlp, _packages(mlp))
    x = torch.randn(3, 12)
    res = eng.run(x, ["rows", "cols", "rows"])
    assert len(res.logits) == 3 and list(res.infos) == ["rows", "cols"]
    assert res.versions == [eng.task(t).version for t in ["rows", "cols", "rows"]]
    assert [lg.numel() for lg in res.logits] == [len(res.infos[t].meta.labels) for t in ["rows", "cols", "rows"]]
    assert res.report.path == "override" and res.report.tasks == ["rows", "cols"] and res.report.samples == 3
    assert res.report.cache_misses + res.report.cache_hits == 2 and res.report.slot_loads == 2
    assert eng.run(x[:0], []).logits == []
    with pytest.raises(ValueError, match="3 samples but 2"):
        eng.run(x, ["rows", "rows"])
    with pytest.raises(ValueError, match="path"):
        eng.run(x, ["rows"] * 3, path="fast")
    with pytest.raises(UnknownTaskError):
        eng.run(x, ["rows", "nope", "rows"])
    assert eng.stats()["batches"] == 1


@pytest.mark.parametrize("case", ["mlp", "cnn"])
def test_grouped_slot_loads_over_reused_slots(case):
    """Many tasks of one structure written into slots together (one stacked load), into slots that
    held tasks of other structures (columns, biases, bias-only modules): still per-task exact."""
    make, data = CASES[case]
    bb = make()
    names = [n for n, _ in iter_patchable_names(bb)]
    same = [random_package(bb, f"r{i}", k=2, seed=i, n_labels=3) for i in range(10)]
    other = [with_all_biases(bb, random_package(bb, f"o{i}", mode="column" if case == "mlp" else "row", k=1,
                                                seed=40 + i, n_labels=5), seed=40 + i, bias_only=names[:1])
             for i in range(4)]
    eng = _engine_with(bb, same + other, max_slots=4)
    x = data(6)
    seq = {p.task_id: torch.stack(eng.forward(x, [p.task_id] * 6, path="patch")[0]) for p in same + other}
    rng = random.Random(3)
    for step in range(12):
        pool = other if step % 3 == 0 else same
        ids = [rng.choice(pool).task_id for _ in range(5)] + [other[step % 4].task_id]  # always mixed
        res = eng.run(x, ids, path="override")
        for i, t in enumerate(ids):
            assert res.versions[i] == eng.task(t).version
            assert torch.allclose(res.logits[i], seq[t][i], atol=1e-5), (step, t)
        out = eng.forward(x, ids, path="override")[0]
        for i, t in enumerate(ids):
            assert (out[i] - seq[t][i]).abs().max() <= 1e-5, (step, t)
    assert eng.stats()["slot_evictions"] > 0
