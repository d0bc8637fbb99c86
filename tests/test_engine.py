"""The engine: both paths equal a directly edited model, the base stays bit-exact, tiers and threads."""
import random
import threading

import pytest
import torch
from conftest import tiny_cnn, tiny_mlp, tiny_vit

from grft_serve.backbones import HFTextBackbone
from grft_serve.engine import Engine, TaskExistsError, UnknownTaskError
from grft_serve.package import PackageError, package_bytes
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


def test_auto_path_choice_and_counters(mlp):
    eng = Engine(mlp)
    for p in _packages(mlp):
        eng.register(p)
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
        for i in range(n_batches):
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
    eng.device_cache_bytes = 2 * size  # room for two tasks
    x = torch.randn(2, 3, 32, 32)
    refs = {p.task_id: reference_forward(vit, p, x) for p in pkgs}
    for tid in ["t0", "t1", "t0", "t2", "t3", "t0"]:
        out = torch.stack(eng.forward(x, [tid] * 2)[0])
        assert torch.allclose(out, refs[tid], atol=1e-5)
    c = eng.counters
    assert c["cache_hits"] == 1 and c["cache_misses"] == 5 and c["cache_evictions"] == 3
    assert eng.device_cache()["tasks"] == ["t3", "t0"]
    # a batch needing more tasks than fit keeps them all while it runs
    ids = ["t0", "t1", "t2", "t3"] * 1
    out = eng.forward(torch.randn(4, 3, 32, 32), ids)[0]
    assert len(out) == 4
    # each resident task is one contiguous buffer: every tensor is a view into it
    r = eng._dev["t0"]
    lo = r.packed.buf.data_ptr()
    hi = lo + r.packed.buf.numel()
    for d in r.deltas.values():
        for t in (d.indices, d.values):
            assert lo <= t.data_ptr() < hi
    assert lo <= r.head_w.data_ptr() < hi


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


def test_predict_formats_answers(vit):
    from PIL import Image

    eng = Engine(vit)
    p = random_package(vit, "img", k=2, n_labels=4)
    eng.register(p)
    imgs = [Image.new("RGB", (40, 30), (i * 40, 100, 200)) for i in range(3)]
    out = eng.predict(imgs, ["img"] * 3, top_k=2)
    assert len(out) == 3
    for o in out:
        assert o["label"] in p.meta.labels and 0 < o["score"] <= 1
        assert len(o["top_k"]) == 2 and o["top_k"][0]["label"] == o["label"]
        assert o["version"] == eng.task("img").version


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


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_cuda_paths_match_and_base_exact():
    bb = tiny_vit()
    x = torch.randn(8, 3, 32, 32)
    pkgs = _packages(bb)
    refs = [reference_forward(bb, p, x) for p in pkgs]
    eng = Engine(bb, device="cuda", device_cache_bytes=1 << 20)
    snap = _snapshot(eng)
    for p in pkgs:
        eng.register(p)
    for p, ref in zip(pkgs, refs):
        for path in ("patch", "override"):
            out = torch.stack(eng.forward(x, [p.task_id] * 8, path=path)[0])
            assert torch.allclose(out, ref, atol=1e-4, rtol=1e-4)
    _assert_base_exact(eng, snap)


def test_predict_uses_each_tasks_preprocessing(cnn):
    """Tasks trained at different input sizes on one CNN are each served at their own size."""
    from PIL import Image

    from grft_serve.package import PreprocessingMismatchError

    small = random_package(cnn, "small", k=1, seed=1)
    big = random_package(cnn, "big", k=1, seed=2)
    for pkg, size in ((small, 32), (big, 48)):
        cnn.set_input_size(size)
        pkg.meta.preprocessing = cnn.preprocessing_meta()
    cnn.set_input_size(64)
    eng = Engine(cnn)
    eng.register(small)
    eng.register(big)
    imgs = [Image.new("RGB", (50, 40), (30 * i, 90, 160)) for i in range(4)]
    ids = ["small", "big", "small", "big"]
    got = eng.predict(imgs, ids, top_k=3)
    for i, (img, tid) in enumerate(zip(imgs, ids)):
        pkg = small if tid == "small" else big
        x = cnn.preprocess([img], pkg.meta.preprocessing)
        assert x.shape[-1] == (32 if tid == "small" else 48)
        ref = reference_forward(cnn, pkg, x)[0].softmax(-1)
        assert abs(got[i]["score"] - float(ref.max())) < 1e-5
    text = random_package(cnn, "text", k=1, seed=3)
    text.meta.preprocessing = {"kind": "text", "pooling": "mean"}
    with pytest.raises(PreprocessingMismatchError, match="text inputs"):
        eng.register(text)
    assert {t.task_id for t in eng.tasks()} == {"small", "big"}
