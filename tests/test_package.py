"""The task package contract: round trip, atomic writes, and every validator case with its own error."""
import json
import os
import pickle
import struct

import pytest
import torch

from grft_serve import package as P
from grft_serve.package import load_package, package_bytes, save_package
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
