"""The task package contract: round trip, atomic writes, and every validator case with its own error."""
import json
import os
import pickle
import struct

import pytest
import torch

from fuzz_support import join, split
from grft_serve.core import package as P
from grft_serve.core.package import load_package, package_bytes, save_package
from grft_serve.testing import random_package


@pytest.fixture
def base(vit):
    return vit.describe()


@pytest.fixture
def pkg(vit):
    return random_package(vit, "taskA", k=3, tune_bias=True)


def _rewrite(pkg, tensors=None, meta=None) -> bytes:
    """Serialize with tensors/metadata edited (what a broken or hostile producer could send)."""
    from safetensors.torch import save

    t = pkg.tensors()
    if tensors:
        for k, v in tensors.items():
            if v is None:
                t.pop(k)
            else:
                t[k] = v
    m = json.loads(pkg.meta.model_dump_json())
    if meta:
        m.update(meta)
    return save(t, metadata={"grft": json.dumps(m)})


def test_round_trip(tmp_path, pkg, base):
    path = save_package(pkg, tmp_path / "taskA.grft.safetensors")
    got = load_package(path, base=base)
    assert got.task_id == "taskA" and got.meta.labels == pkg.meta.labels
    assert got.meta.base_fingerprint == base.fingerprint
    assert set(got.deltas) == set(pkg.deltas)
    for name, d in pkg.deltas.items():
        assert torch.equal(got.deltas[name].indices, d.indices)
        assert torch.equal(got.deltas[name].values, d.values)
        assert torch.equal(got.deltas[name].bias, d.bias)
    assert torch.equal(got.head_weight, pkg.head_weight)
    assert got.num_params() == pkg.num_params() > 0


def test_column_round_trip(vit, base):
    pkg = random_package(vit, "cols", mode="column", k=2)
    got = load_package(package_bytes(pkg), base=base)
    assert got.meta.mode == "column"
    name = next(iter(got.deltas))
    assert got.deltas[name].values.shape[1] == 2


def test_atomic_write_leaves_no_half_file(tmp_path, pkg, monkeypatch):
    target = tmp_path / "x.grft.safetensors"
    save_package(pkg, target)
    before = target.read_bytes()

    def boom(*a, **k):
        raise OSError("disk full")

    monkeypatch.setattr(os, "replace", boom)
    other = random_package_like(pkg, "x")
    with pytest.raises(OSError):
        save_package(other, target)
    assert target.read_bytes() == before  # the old file is intact
    assert [p.name for p in tmp_path.iterdir()] == ["x.grft.safetensors"]  # no temp file left


def random_package_like(pkg, task_id):
    pkg2 = P.TaskPackage(pkg.meta.model_copy(update={"task_id": task_id}), pkg.deltas,
                         pkg.head_weight * 2, pkg.head_bias)
    return pkg2


def _err(data, base, cls, match=None, **kw):
    with pytest.raises(cls, match=match) as ei:
        load_package(data, base=base, **kw)
    assert ei.value.status in (400, 409, 413, 422) and ei.value.message
    return ei.value


def test_not_safetensors(base):
    _err(b"hello world, this is not a package", base, P.NotSafetensorsError)
    _err(b"", base, P.NotSafetensorsError)
    _err(struct.pack("<Q", 5) + b"[1,2]", base, P.NotSafetensorsError)


def test_truncated(pkg, base):
    data = package_bytes(pkg)
    _err(data[: len(data) - 10], base, P.TruncatedPackageError, "truncated")
    _err(data[:20], base, P.TruncatedPackageError)


def test_pickle_content(pkg, base, tmp_path):
    _err(pickle.dumps({"a": 1}), base, P.PickleContentError, "pickle")
    torch.save(pkg.tensors(), tmp_path / "t.pt")
    _err((tmp_path / "t.pt").read_bytes(), base, P.PickleContentError)


def test_unknown_format_version(pkg, base):
    _err(_rewrite(pkg, meta={"format_version": 99}), base, P.UnsupportedFormatError, "99")


def test_bad_metadata(pkg, base):
    _err(_rewrite(pkg, meta={"task_id": "../etc/passwd"}), base, P.MetadataError, "task_id")
    _err(_rewrite(pkg, meta={"mode": "diagonal"}), base, P.MetadataError, "mode")


def test_unknown_module(pkg, base):
    name = next(iter(pkg.deltas))
    t = pkg.tensors()
    _err(_rewrite(pkg, {"nope.layer.indices": t[f"{name}.indices"].clone(), "nope.layer.values": t[f"{name}.values"].clone()}),
         base, P.UnknownModuleError, "nope.layer")


def test_shape_mismatch(pkg, base):
    name = next(iter(pkg.deltas))
    v = pkg.tensors()[f"{name}.values"]
    _err(_rewrite(pkg, {f"{name}.values": v[:, :-1].contiguous()}), base, P.ShapeMismatchError, name)
    _err(_rewrite(pkg, {"head.weight": torch.zeros(7, base.feature_dim)}), base, P.ShapeMismatchError, "head")
    _err(_rewrite(pkg, {f"{name}.values": None}), base, P.ShapeMismatchError, "indices and .values")


def test_index_out_of_range_and_duplicates(pkg, base):
    name = next(iter(pkg.deltas))
    n = base.modules[name].out_features
    idx = pkg.tensors()[f"{name}.indices"].clone()
    bad = idx.clone()
    bad[-1] = n + 5
    _err(_rewrite(pkg, {f"{name}.indices": bad}), base, P.InvalidIndicesError, "out of range")
    dup = idx.clone()
    dup[1] = dup[0]
    _err(_rewrite(pkg, {f"{name}.indices": dup}), base, P.InvalidIndicesError, "unique")
    neg = idx.clone()
    neg[0] = -1
    _err(_rewrite(pkg, {f"{name}.indices": neg}), base, P.InvalidIndicesError)


def test_wrong_dtype(pkg, base):
    name = next(iter(pkg.deltas))
    t = pkg.tensors()
    _err(_rewrite(pkg, {f"{name}.indices": t[f"{name}.indices"].float()}), base, P.DtypeError, "indices")
    _err(_rewrite(pkg, {f"{name}.values": t[f"{name}.values"].double()}), base, P.DtypeError, "float64")


def test_nan_inf(pkg, base):
    name = next(iter(pkg.deltas))
    v = pkg.tensors()[f"{name}.values"].clone()
    v[0, 0] = float("nan")
    _err(_rewrite(pkg, {f"{name}.values": v}), base, P.NonFiniteError, "NaN")
    hb = pkg.head_bias.clone()
    hb[0] = float("inf")
    _err(_rewrite(pkg, {"head.bias": hb}), base, P.NonFiniteError, "head.bias")


def test_fingerprint_mismatch(pkg):
    from conftest import tiny_vit

    other = tiny_vit(seed=1).describe()
    e = _err(package_bytes(pkg), other, P.FingerprintMismatchError, "fingerprint")
    assert e.status == 409


def test_oversized(pkg, base, tmp_path):
    data = package_bytes(pkg)
    _err(data, base, P.PackageTooLargeError, max_bytes=len(data) - 1)
    p = tmp_path / "big.grft.safetensors"
    p.write_bytes(data)
    e = _err(p, base, P.PackageTooLargeError, max_bytes=100)
    assert e.status == 413


def test_column_mode_rejected_on_grouped_conv(cnn):
    base = cnn.describe()
    grouped = [n for n, s in base.modules.items() if s.groups > 1][0]
    pkg = random_package(cnn, "c", mode="row", k=1, modules=[grouped])
    t = pkg.tensors()
    s = base.modules[grouped]
    bad = _rewrite(pkg, {f"{grouped}.values": torch.zeros(s.out_features, 1, *s.weight_shape[2:])},
                   meta={"mode": "column"})
    _err(bad, base, P.ShapeMismatchError, "grouped")
    assert t  # the row package itself is valid
    load_package(package_bytes(pkg), base=base)


# ---------------------------------------------------------------------------------------------
# the header: every malformed declaration is a PackageError with a 4xx status, never another exception
# ---------------------------------------------------------------------------------------------
def _edit(data: bytes, fn) -> bytes:
    header, body = split(data)
    out = fn(header)
    return join(header, body) if out is None else out


def _first(header: dict) -> str:
    return next(k for k in header if k != "__metadata__" and not k.startswith("head."))


def _set(key, value):
    def fn(h):
        h[_first(h)][key] = value
    return fn


def _order(h):
    return sorted((k for k in h if k != "__metadata__"), key=lambda k: h[k]["data_offsets"][0])


@pytest.mark.parametrize("edit, cls", [
    (_set("shape", ["3", 2]), P.NotSafetensorsError),
    (_set("shape", [1.5, 2]), P.NotSafetensorsError),
    (_set("shape", [-1, 2]), P.NotSafetensorsError),
    (_set("shape", [True]), P.NotSafetensorsError),
    (_set("shape", "3"), P.NotSafetensorsError),
    (_set("shape", [1] * 40), P.ShapeMismatchError),
    (_set("data_offsets", ["0", 4]), P.NotSafetensorsError),
    (_set("data_offsets", [0]), P.NotSafetensorsError),
    (_set("data_offsets", [-8, 0]), P.NotSafetensorsError),
    (_set("data_offsets", 7), P.NotSafetensorsError),
    (_set("dtype", ["F32"]), P.NotSafetensorsError),
    (_set("dtype", 5), P.NotSafetensorsError),
    (_set("dtype", "C64"), P.DtypeError),
    (_set("extra", 1), P.NotSafetensorsError),
    (lambda h: h.__setitem__(_first(h), [1, 2]), P.NotSafetensorsError),
    (lambda h: h.__setitem__("__metadata__", "grft"), P.NotSafetensorsError),
    (lambda h: h.__setitem__("__metadata__", {"grft": {"task_id": "x"}}), P.NotSafetensorsError),
    (lambda h: h.__setitem__("__metadata__", {"grft": "[1, 2]"}), P.MetadataError),
    (lambda h: h.__setitem__("__metadata__", {"grft": "{not json"}), P.MetadataError),
    (lambda h: h.__setitem__("__metadata__", {"grft": "[" * 100_000}), P.MetadataError),
    (lambda h: h.__setitem__("__metadata__", {"other": "x"}), P.MetadataError),
    (lambda h: h.__setitem__("__metadata__", {"grft": '{"format_version": ' + "9" * 5000 + "}"}), P.MetadataError),
])
def test_malformed_header_is_a_package_error(pkg, base, edit, cls):
    e = _err(_edit(package_bytes(pkg), edit), base, cls)
    assert e.status in (400, 422)


def test_overlapping_gapped_and_trailing_data_regions(pkg, base):
    data = package_bytes(pkg)

    def overlap(h):
        a, b = _order(h)[:2]
        h[b]["data_offsets"] = list(h[a]["data_offsets"])
        h[b]["shape"], h[b]["dtype"] = h[a]["shape"], h[a]["dtype"]
    _err(_edit(data, overlap), base, P.NotSafetensorsError, "overlap")

    def gap(h):
        header, body = h, split(data)[1]
        for k in _order(header):
            header[k]["data_offsets"] = [o + 4 for o in header[k]["data_offsets"]]
        return join(header, b"\0" * 4 + body)
    _err(_edit(data, gap), base, P.NotSafetensorsError, "gap")
    _err(data + b"\0" * 8, base, P.NotSafetensorsError, "after the last tensor")


def test_duplicate_header_keys(pkg, base):
    header, body = split(package_bytes(pkg))
    name = _first(header)
    raw = json.dumps(header)
    dup = raw[:-1] + f', "{name}": ' + json.dumps(header[name]) + "}"
    h = dup.encode() + b" " * (-len(dup) % 8)
    _err(struct.pack("<Q", len(h)) + h + body, base, P.NotSafetensorsError, "repeats")


def test_bomb_declared_in_the_header_is_413(pkg, base):
    def bomb(h):
        name = _first(h)
        h[name]["shape"] = [1 << 20, 1 << 20]
        h[name]["data_offsets"] = [h[name]["data_offsets"][0], h[name]["data_offsets"][0] + 4 * (1 << 40)]
    e = _err(_edit(package_bytes(pkg), bomb), base, P.PackageTooLargeError, "declares")
    assert e.status == 413

    def many(h):  # each tensor under the cap, together over it
        for i in range(40):
            h[f"x{i}.values"] = {"dtype": "F32", "shape": [1 << 22], "data_offsets": [0, 4 << 22]}
    _err(_edit(package_bytes(pkg), many), base, P.PackageTooLargeError, max_bytes=64 << 20)


def test_read_header_from_path_and_bytes_agree(tmp_path, pkg):
    data = package_bytes(pkg)
    p = tmp_path / "t.grft.safetensors"
    p.write_bytes(data)
    a, b = P.read_header(p), P.read_header(data)
    assert a == b and a.size == len(data) and a.meta == pkg.meta
    assert a.num_params == pkg.num_params() > 0
    assert set(a.tensors) == set(pkg.tensors())
    p.write_bytes(data[:-3])
    with pytest.raises(P.TruncatedPackageError):
        P.read_header(p)
    info = P.read_header_info(data)
    assert info == {"meta": json.loads(pkg.meta.model_dump_json()), "num_params": a.num_params, "bytes": len(data)}


# ---------------------------------------------------------------------------------------------
# metadata: labels, empty packages, preprocessing
# ---------------------------------------------------------------------------------------------
def test_duplicate_or_missing_labels(pkg, base):
    _err(_rewrite(pkg, meta={"labels": ["a", "b", "a"]}), base, P.MetadataError, "duplicate label")
    _err(_rewrite(pkg, {"head.weight": torch.zeros(0, base.feature_dim), "head.bias": torch.zeros(0)},
                  meta={"labels": []}), base, P.MetadataError, "labels")
    _err(_rewrite(pkg, meta={"labels": ["a", 2, "c"]}), base, P.MetadataError, "labels")


def test_package_that_changes_nothing_is_refused(vit, base):
    pkg = random_package(vit, "e", k=2)
    empty = {}
    for name, d in pkg.deltas.items():
        empty[f"{name}.indices"] = d.indices[:0].clone()
        empty[f"{name}.values"] = d.values[:0].clone()
    e = _err(_rewrite(pkg, empty), base, P.EmptyPackageError, "changes nothing")
    assert e.status == 422 and e.code == "empty_package"
    # a linear probe (no module entry at all) is a valid package
    probe = P.TaskPackage(pkg.meta, {}, pkg.head_weight, pkg.head_bias)
    got = load_package(package_bytes(probe), base=base)
    assert got.deltas == {} and got.num_params() == 0
    # empty entries beside a real one are dropped
    first = next(iter(pkg.deltas))
    mixed = {k: v for k, v in empty.items() if not k.startswith(first + ".")}
    got = load_package(_rewrite(pkg, mixed), base=base)
    assert list(got.deltas) == [first]


@pytest.mark.parametrize("prep, match", [
    ("image", "JSON object"),
    (["kind", "image"], "JSON object"),
    ({"kind": "image", "resize": 7}, "resize"),
    ({"kind": "text", "max_length": 100_000}, "max_length"),
    ({"kind": "text", "max_length": "128"}, "max_length"),
    ({"kind": "text", "pooling": "max"}, "pooling"),
    ({"kind": "video"}, "video"),
    ({"max_length": 16}, "kind"),
    ({"kind": "image", "timm_data_config": {"input_size": [3, 5000, 5000]}}, "input_size"),
    ({"kind": "image", "timm_data_config": {"input_size": [3, 32, 32], "crop_pct": 0.01}}, "crop_pct"),
    ({"kind": "image", "timm_data_config": {"input_size": [3, 32, 32], "interpolation": "magic"}}, "interpolation"),
    ({"kind": "image", "timm_data_config": {"input_size": [3, 32, 32], "std": [0.5, 0.0, 0.5]}}, "std"),
    ({"kind": "image", "timm_data_config": {"input_size": [3, 32, 32], "mean": [float("nan")] * 3}}, "mean"),
    ({"kind": "image", "timm_data_config": {"input_size": [3, 32, 32], "unknown_key": 1}}, "unknown_key"),
])
def test_bad_preprocessing_is_refused(pkg, base, prep, match):
    e = _err(_rewrite(pkg, meta={"preprocessing": prep}), base, P.PreprocessingError, match)
    assert (e.status, e.code) == (422, "bad_preprocessing")


def test_preprocessing_the_trainers_write_is_accepted(vit, cnn, mlp):
    from grft_serve.core.backbones import HFTextBackbone
    from transformers import BertConfig, BertModel

    cfg = BertConfig(vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                     num_attention_heads=2, max_position_embeddings=64)
    text = HFTextBackbone(None, pooling="last", max_length=512, model=BertModel(cfg), model_id="bert/tiny")
    for bb, size in ((vit, 48), (vit, None), (cnn, None), (mlp, None), (text, None)):
        prep = bb.preprocessing_meta(input_size=size)
        pkg = random_package(bb, "ok", k=1, preprocessing=prep)
        got = load_package(package_bytes(pkg), base=bb.describe())
        assert got.meta.preprocessing == json.loads(json.dumps(prep))
    _rewrite(random_package(mlp, "ok", k=1), meta={"preprocessing": {}})  # the backbone's defaults


def test_one_default_size_limit():
    from grft_serve.engine import Engine
    import inspect

    assert inspect.signature(Engine).parameters["max_package_bytes"].default == P.DEFAULT_MAX_BYTES


# ---------------------------------------------------------------------------------------------
# biases of bias-free modules, bias-only entries
# ---------------------------------------------------------------------------------------------
def test_bias_for_a_module_without_one(mlp):
    base = mlp.describe()
    free = [n for n, s in base.modules.items() if not s.has_bias]
    assert free
    name = free[0]
    s = base.modules[name]
    pkg = random_package(mlp, "b", k=2)
    bias = torch.randn(s.out_features)
    got = load_package(_rewrite(pkg, {f"{name}.bias": bias}), base=base)
    assert torch.equal(got.deltas[name].bias, bias)
    assert got.num_params() == pkg.num_params() + s.out_features
    assert P.read_header(_rewrite(pkg, {f"{name}.bias": bias})).num_params == got.num_params()
    _err(_rewrite(pkg, {f"{name}.bias": torch.randn(s.out_features + 1)}), base, P.ShapeMismatchError, "bias")


@pytest.mark.parametrize("mode", ["row", "column"])
def test_bias_only_entries(cnn, mode):
    """k = 0 with a bias: the module's bias alone is trained (also a grouped conv in column mode)."""
    base = cnn.describe()
    pkg = random_package(cnn, "b", mode=mode, k=1)
    grouped = [n for n, s in base.modules.items() if s.groups > 1 and s.has_bias is False][0]
    s = base.modules[grouped]
    extra = {f"{grouped}.indices": torch.zeros(0, dtype=torch.int64),
             f"{grouped}.values": torch.zeros(s.values_shape(mode, 0)),
             f"{grouped}.bias": torch.randn(s.out_features)}
    got = load_package(_rewrite(pkg, extra), base=base)
    d = got.deltas[grouped]
    assert d.k == 0 and d.bias is not None
    before = pkg.deltas[grouped].values.numel() if grouped in pkg.deltas else 0
    assert got.num_params() == pkg.num_params() - before + s.out_features


def test_reading_is_deterministic_without_created(pkg):
    m = json.loads(pkg.meta.model_dump_json())
    del m["created"]
    from safetensors.torch import save

    data = save(pkg.tensors(), metadata={"grft": json.dumps(m)})
    a, b = P.read_header(data), P.read_header(data)
    assert a.meta.created is None and a == b
