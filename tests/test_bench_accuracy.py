"""bench/accuracy.py: every method trains on the smoke setting (tiny random ViT, generated images) and
reports an accuracy, a trainable %, seconds and peak memory; budgets of GPS and LoRA match GRFT's; the
GPS masked weight, the LoRA and full fine-tuning copies are exact and leave the backbone as it was.
(Row/column GRFT training itself is covered by test_train_fit.py.)"""
from __future__ import annotations

import copy
import json
import sys
from pathlib import Path

import pytest
import torch
from conftest import tiny_cnn, tiny_mlp

from grft_serve.core.package import load_package
from grft_train.config import EvalConfig, FitConfig
from grft_train.evaluate import run_eval
from grft_train.select import Selection, eligible_modules, sparse_indices

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from bench.acc_report import mean_se, summarise  # noqa: E402
from bench.accuracy import FAMILIES, main, method_names, run_seed, smoke_setting  # noqa: E402
from bench.baselines import (  # noqa: E402
    full_ft_builder,
    gps_builder,
    lora_builder,
    lora_count,
    lora_rank_for,
    lora_targets,
    sparse_k,
)

peft = pytest.importorskip("peft", reason="LoRA baseline needs the bench extra (pip install .[bench])")


@pytest.fixture(scope="module")
def smoke(tmp_path_factory):
    root = tmp_path_factory.mktemp("acc")
    st = smoke_setting(root / "data")
    recs = run_seed(st, FAMILIES, [1], 0, device="cpu", workdir=root / "runs", threads=1)
    return st, recs


@pytest.mark.timeout(180)
def test_every_method_reports_accuracy_pct_seconds_and_memory(smoke):
    st, recs = smoke
    by = {r["method"]: r for r in recs}
    assert list(by) == method_names(FAMILIES, [1])
    for r in recs:
        assert 0.0 <= r["test_acc"] <= 1.0 and 0.0 <= r["val_acc"] <= 1.0
        assert r["n_test"] == recs[0]["n_test"] and r["n_train"] == recs[0]["n_train"]  # one split for all
        assert r["head_params"] == recs[0]["head_params"] > 0
        assert r["backbone_pct"] == pytest.approx(
            100 * (r["trainable_values"] + r["trainable_biases"]) / r["backbone_params"])
        assert r["fit_s"] > 0 and r["step_s"] >= 0 and r["rss_fit_mb"] > 100
        json.dumps(r)
    assert by["linear"]["backbone_pct"] == 0
    assert by["full"]["backbone_pct"] == pytest.approx(100.0)
    for m in ("grft-row-k1", "grft-column-k1", "gps-k1"):
        assert by[m]["select_s"] > 0 and by[m]["rss_select_mb"] > 100
    # matched budgets: GPS selects as many values as GRFT-row (at least one entry per row), the
    # same biases; LoRA's rank is the one whose count is closest to GRFT-row's values + biases
    row, gps, lora = by["grft-row-k1"], by["gps-k1"], by["lora-k1"]
    assert gps["trainable_biases"] == row["trainable_biases"] > 0
    assert lora["trainable_values"] == lora["lora_params"] and lora["trainable_biases"] == 0
    assert abs(lora["trainable_values"] - (row["trainable_values"] + row["trainable_biases"])) <= \
        lora["lora_params"] / lora["rank"] / 2 or lora["rank"] == 1


def test_summary_mean_se_and_verdicts(smoke):
    _, recs = smoke
    assert mean_se([0.5, 0.7, 0.9]) == pytest.approx((0.7, 0.2 / 3 ** 0.5))
    twice = recs + [dict(r, seed=1, test_acc=r["test_acc"] - 0.1) for r in recs]
    s = summarise(twice)["smoke"]
    row = next(r for r in s["rows"] if r["method"] == "grft-row-k1")
    assert row["seeds"] == 2 and row["test_se"] > 0
    assert any("gps-k1" in v for v in s["verdicts"]) and any("lora-k1" in v for v in s["verdicts"])
    assert any("full fine-tuning" in v for v in s["verdicts"])
    assert {"grft_over_full_fit_s", "grft_over_full_step_s", "select_in_grft_epochs"} <= set(s["cost"])


def test_linear_probe_package_is_head_only_and_evaluates(smoke):
    st, recs = smoke
    lin = next(r for r in recs if r["method"] == "linear")
    pkg_path = Path(lin["package"])
    assert next(r for r in recs if r["method"] == "gps-k1")["package"] is None  # GPS is not packageable
    pkg = load_package(pkg_path)
    assert pkg.deltas == {} and pkg.head_weight.shape[0] == 3
    rep = run_eval(EvalConfig(**st.common, package=str(pkg_path), device="cpu", progress=False))
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
    model = gps_builder(list(idx))(bb, Selection("sparse", idx), 3, FitConfig(progress=False, bias="selected"))
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


def test_lora_and_full_ft_train_copies_with_exact_counts():
    bb = tiny_mlp().eval().requires_grad_(False)
    pristine = copy.deepcopy(bb)
    names = [n for n, _ in eligible_modules(bb)]
    targets = lora_targets(bb, names)
    assert targets == names  # linears only
    per_rank = sum(m.weight.shape[0] + m.weight.shape[1] for _, m in eligible_modules(bb))
    assert lora_count(bb, targets, 3) == 3 * per_rank and lora_rank_for(bb, targets, 2 * per_rank + 1) == 2
    cfg = FitConfig(progress=False)
    model = lora_builder(targets, 2)(bb, Selection("row", {}), 3, cfg)
    trainable = {n: p.numel() for n, p in model.named_parameters() if p.requires_grad and not n.startswith("head.")}
    assert sum(trainable.values()) == 2 * per_rank and all("lora_" in n for n in trainable)
    x = torch.randn(4, 12)
    assert torch.allclose(model.features(x), pristine(x), atol=1e-6)  # LoRA B starts at zero
    full = full_ft_builder(bb, Selection("row", {}), 3, cfg)
    n_full = sum(p.numel() for n, p in full.named_parameters() if p.requires_grad and not n.startswith("head."))
    assert n_full == sum(p.numel() for p in bb.parameters())
    full.features(x).sum().backward()
    assert all(p.grad is None for p in bb.parameters())  # the shared backbone is untouched
    assert all(torch.equal(a, b) for a, b in zip(bb.state_dict().values(), pristine.state_dict().values()))
    assert not any(p.requires_grad for p in bb.parameters())


@pytest.mark.timeout(180)
def test_cli_smoke_writes_jsonl_table_and_plot(tmp_path):
    out, table, plot = tmp_path / "acc.jsonl", tmp_path / "acc.md", tmp_path / "acc.png"
    recs = main(["--smoke", "--methods", "linear,grft-row,gps", "--ks", "1", "--seeds", "0",
                 "--out", str(out), "--table", str(table), "--plot", str(plot)])
    lines = [json.loads(line) for line in out.read_text().splitlines() if line.strip()]
    assert lines == json.loads(json.dumps(recs))
    assert [r["method"] for r in lines] == ["linear", "grft-row-k1", "gps-k1"]
    md = table.read_text()
    assert "gps-k1" in md and "± " in md and plot.stat().st_size > 1000


@pytest.mark.timeout(300)
def test_generation_settings_train_every_method_with_matched_lora(tmp_path):
    """Generation bench on a tiny random LLaMA: base, GRFT row/column, LoRA at GRFT-row's budget and
    full fine-tuning all score exact match / ROUGE-L on one test split; one gradient pass serves
    every seed; summary, table and plot are written."""
    from gen_fixtures import make_tiny_lm

    from bench.acc_gen import GEN_FAMILIES, GenCache, gen_data, plot_gen, render_gen, run_gen_seed, summarise_gen
    from bench.acc_settings import GEN_SETTINGS, Setting, merge

    pytest.importorskip("mathematics_dataset")
    lm = make_tiny_lm(tmp_path / "lm")
    base = GEN_SETTINGS["math"]
    st = Setting("tiny", "tiny LLaMA + add_or_sub",
                 merge(base.common, {"backbone": {"type": "causal_lm", "path": str(lm), "max_length": 48},
                                     "data": {"max_per_class": 24, "max_eval_per_class": 6}}),
                 {"num_batches": 2}, merge(base.fit, {"epochs": 1, "max_steps": 2}), base.full_lr,
                 dict(base.convert, n=40))
    st = gen_data(st, tmp_path)
    assert st.common["data"]["path"].endswith("tiny.jsonl") and (tmp_path / "data" / "tiny.jsonl").is_file()
    cache = GenCache()
    recs = [r for seed in (0, 1) for r in run_gen_seed(st, GEN_FAMILIES, 1, seed, device="cpu", workdir=tmp_path,
                                                       cache=cache)]
    assert len(cache.grads) == 1  # one gradient pass for both seeds
    by = {(r["method"], r["seed"]): r for r in recs}
    assert [m for m, s in by if s == 0] == ["base", "grft-row-k1", "grft-column-k1", "lora-k1", "full"]
    for r in recs:
        assert 0 <= r["exact_match"] <= 1 and 0 <= r["rouge_l"] <= 1 and r["n_test"] == 6
    row, lora = by[("grft-row-k1", 0)], by[("lora-k1", 0)]
    assert row["select_s"] > 0 and by[("base", 0)]["fit_s"] == 0 and by[("full", 0)]["backbone_pct"] == 100
    assert abs(lora["lora_params"] - (row["trainable_values"] + row["trainable_biases"])) <= \
        lora["lora_params"] / lora["rank"] / 2 or lora["rank"] == 1
    s = summarise_gen(recs)["tiny"]
    assert {r["method"]: r["seeds"] for r in s["rows"]}["full"] == 2
    assert any("lora-k1" in v for v in s["verdicts"]) and any("vs base" in v for v in s["verdicts"])
    assert "exact match" in render_gen({"tiny": s}) and plot_gen({"tiny": s}, tmp_path / "g.png").stat().st_size > 1000
