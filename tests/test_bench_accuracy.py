"""bench/accuracy.py: every method trains on the smoke setting (tiny random ViT, generated images) and
reports an accuracy and a trainable %; the GPS-sparse masked weight is exact and leaves the backbone
as it was. (Row/column GRFT training itself is covered by test_train_fit.py.)"""
from __future__ import annotations

import copy
import json
import sys
from pathlib import Path

import pytest
import torch

from grft_serve.package import load_package
from grft_train.config import EvalConfig, FitConfig
from grft_train.evaluate import run_eval
from grft_train.select import Selection, eligible_modules, sparse_indices

from conftest import tiny_cnn, tiny_mlp

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from bench.accuracy import (METHODS, build_sparse_model, main, run_setting, smoke_setting,  # noqa: E402
                            sparse_k, verdict)


@pytest.fixture(scope="module")
def smoke(tmp_path_factory):
    root = tmp_path_factory.mktemp("acc")
    st = smoke_setting(root / "data")
    recs = run_setting(st, METHODS, device="cpu", workdir=root / "runs", threads=1, param_budget=0.01)
    return st, recs


@pytest.mark.timeout(120)
def test_every_method_reports_accuracy_and_trainable_pct(smoke):
    st, recs = smoke
    by = {r["method"]: r for r in recs}
    assert list(by) == list(METHODS)
    n_test = recs[0]["n_test"]
    for r in recs:
        assert 0.0 <= r["test_acc"] <= 1.0 and 0.0 <= r["val_acc"] <= 1.0
        assert r["n_test"] == n_test and r["n_train"] == recs[0]["n_train"]  # one split for all
        assert r["head_params"] == recs[0]["head_params"] > 0
        assert r["backbone_pct"] == pytest.approx(
            100 * (r["selected_values"] + r["tuned_biases"]) / r["backbone_params"])
        assert r["total_pct"] == pytest.approx(r["backbone_pct"] + r["head_pct"])
        json.dumps(r)
    assert by["linear"]["backbone_pct"] == 0 and by["linear"]["modules"] == 0
    for m in ("grft-row", "grft-column", "gps-sparse"):
        assert by[m]["selected_values"] > 0 and by[m]["modules"] > 0
    assert by["grft-row"]["package"] and by["gps-sparse"]["package"] is None  # GPS is not packageable
    assert len(verdict(recs)) == 2  # grft-row and grft-column vs linear


def test_linear_probe_package_is_head_only_and_evaluates(smoke):
    st, recs = smoke
    lin = next(r for r in recs if r["method"] == "linear")
    pkg = load_package(lin["package"])
    assert pkg.deltas == {} and pkg.head_weight.shape[0] == 3
    rep = run_eval(EvalConfig(**st.common, package=lin["package"], device="cpu", progress=False))
    assert rep["accuracy"] == pytest.approx(lin["test_acc"]) and rep["n"] == lin["n_test"]


def test_sparse_k_fits_budget():
    shapes = {"a": (4, 10), "b": (8, 3, 3, 3)}  # rows of 10 and 27 entries
    assert sparse_k(shapes, 12 * 2) == 2
    assert sparse_k(shapes, 1) == 1  # never below one entry per row
    assert sparse_k(shapes, 10 ** 6) == 27  # capped by the longest row


@pytest.mark.parametrize("make", [tiny_mlp, tiny_cnn], ids=["mlp", "cnn"])
def test_sparse_model_equals_merged_weights_and_restores_backbone(make):
    bb = make().eval().requires_grad_(False)  # frozen, as build_backbone leaves it
    pristine = copy.deepcopy(bb)
    x = torch.randn(2, 12) if make is tiny_mlp else torch.randn(2, *bb.data_config["input_size"])
    g = torch.Generator().manual_seed(0)
    idx = {n: sparse_indices(torch.randn(m.weight.shape, generator=g), 2) for n, m in eligible_modules(bb)}
    model = build_sparse_model(bb, Selection("sparse", idx), 3, FitConfig(progress=False))
    merged = copy.deepcopy(pristine)
    with torch.no_grad():
        for n in model.names:
            model.value(n).add_(torch.randn(model.value(n).shape, generator=g))
            W = merged.get_submodule(n).weight
            W.copy_(W.flatten(1).scatter(1, idx[n], model.value(n)).view_as(W))
            if model.bias(n) is not None:
                model.bias(n).add_(1.0)
                merged.get_submodule(n).bias.copy_(model.bias(n))
    out = model.features(x)
    assert torch.allclose(out, merged(x), atol=1e-5)
    assert not torch.allclose(out, pristine(x), atol=1e-3)
    # gradients reach exactly the [out, k] values (GPS's masked gradient), nothing of the backbone
    out.pow(2).sum().backward()
    for n in model.names:
        assert model.value(n).grad is not None and model.value(n).grad.shape == idx[n].shape
    assert all(p.grad is None for p in bb.parameters())
    model.close()
    assert all("forward" not in vars(m) for m in bb.modules())
    assert torch.equal(bb(x), pristine(x))
    a, b = bb.state_dict(), pristine.state_dict()
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


@pytest.mark.timeout(120)
def test_cli_smoke_writes_jsonl_and_table(tmp_path, capsys):
    out = tmp_path / "acc.jsonl"
    recs = main(["--smoke", "--methods", "linear,gps-sparse", "--out", str(out)])
    lines = [json.loads(line) for line in out.read_text().splitlines() if line.strip()]
    assert lines == json.loads(json.dumps(recs)) and [r["method"] for r in lines] == ["linear", "gps-sparse"]
    assert "gps-sparse" in capsys.readouterr().out  # the table
