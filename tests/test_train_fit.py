"""select -> fit -> package -> eval on a tiny random-init timm ViT (CPU, seconds)."""
import copy
import json

import numpy as np
import pytest
import torch
import yaml
from PIL import Image
from typer.testing import CliRunner

from grft_serve.core.backbones import TimmBackbone
from grft_serve.core.package import FingerprintMismatchError, load_package
from grft_train.cli import app
from grft_train.config import EvalConfig, FitConfig, SelectConfig, load_config
from grft_train.data import load_splits
from grft_train.evaluate import load_task_model, package_logits, run_eval
from grft_train.fit import FitError, run_fit
from grft_train.select import run_select

BACKBONE = dict(type="timm", name="test_vit", weights="random", model_kwargs=dict(img_size=32, patch_size=8))


@pytest.fixture(scope="module")
def imgdir(tmp_path_factory):
    root = tmp_path_factory.mktemp("imgs")
    rng = np.random.default_rng(0)
    for c, col in enumerate([(200, 40, 40), (40, 200, 40), (40, 40, 200)]):
        d = root / f"class{c}"
        d.mkdir()
        for i in range(16):
            a = (rng.normal(0, 50, (24, 24, 3)) + np.array(col)).clip(0, 255).astype(np.uint8)
            Image.fromarray(a).save(d / f"{i}.png")
    return root


def _backbone(seed=0):
    torch.manual_seed(seed)
    import timm

    m = timm.create_model("test_vit", num_classes=0, img_size=32, patch_size=8)
    return TimmBackbone("test_vit", model=m).eval().requires_grad_(False)


@pytest.fixture(scope="module")
def trained(imgdir, tmp_path_factory):
    out = tmp_path_factory.mktemp("run")
    common = dict(backbone=BACKBONE, data=dict(format="imagefolder", path=str(imgdir), val_fraction=0.25,
                                               test_fraction=0.25), progress=False, batch_size=12, device="cpu")
    bb = _backbone()
    pristine = copy.deepcopy(bb)
    splits = load_splits(common["data"])
    scfg = SelectConfig(**common, out=str(out / "sel.safetensors"), k=2)
    sel = run_select(scfg, backbone=bb, splits=splits)
    fcfg = FitConfig(**common, selection=str(out / "sel.safetensors"), out_dir=str(out / "fit"), epochs=4,
                     lr=1e-2, task_id="colors", l2_lambda=1e-3)
    res = run_fit(fcfg, backbone=bb, splits=splits)
    return dict(bb=bb, pristine=pristine, sel=sel, res=res, splits=splits, out=out, common=common)


def test_loss_falls_and_outputs_written(trained):
    res = trained["res"]
    h = res.metrics["history"]
    assert h[-1]["train_loss"] < h[0]["train_loss"]
    assert res.metrics["test_acc"] is not None and res.metrics["val_acc"] >= 0.5
    out = trained["out"] / "fit"
    assert (out / "metrics.json").is_file() and (out / "curves.png").is_file()
    m = json.loads((out / "metrics.json").read_text())
    assert 0 < m["trainable_pct"] < 100 and "head parameters" in m["trainable_pct_definition"]
    assert (trained["out"] / "sel.png").is_file()


def test_frozen_backbone_bit_identical_and_only_selected_rows_change(trained):
    bb, pristine, res, sel = trained["bb"], trained["pristine"], trained["res"], trained["sel"]
    a, b = bb.state_dict(), pristine.state_dict()
    assert a.keys() == b.keys()
    for k in a:
        assert torch.equal(a[k], b[k]), f"frozen weight {k} was modified"
    pkg = load_package(res.package_path, base=pristine.describe())
    assert set(pkg.deltas) == set(sel.indices)
    changed_any = False
    for name, d in pkg.deltas.items():
        W = pristine.get_submodule(name).weight
        eff = W.clone()
        eff[d.indices] = d.values
        other = torch.ones(W.shape[0], dtype=torch.bool)
        other[d.indices] = False
        assert torch.equal(eff[other], W[other])  # every non-selected row bit-identical
        assert torch.equal(d.indices, sel.indices[name])
        changed_any |= not torch.equal(eff[d.indices], W[d.indices])
    assert changed_any


def test_package_roundtrip_and_eval_same_logits(trained):
    res, pristine, splits = trained["res"], trained["pristine"], trained["splits"]
    raws = [splits.test[i][0] for i in range(len(splits.test))]
    model = res.model.eval()
    with torch.no_grad():
        train_logits = model(pristine.preprocess(raws)).float()
    bb2 = copy.deepcopy(pristine)
    pkg_logits = package_logits(res.package_path, bb2, raws)
    assert torch.allclose(train_logits, pkg_logits, atol=1e-5, rtol=1e-5)
    # and the same as running a copy of the model with the rows written into its weights
    merged = copy.deepcopy(pristine)
    pkg = load_package(res.package_path, base=pristine.describe())
    with torch.no_grad():
        for name, d in pkg.deltas.items():
            mod = merged.get_submodule(name)
            mod.weight.index_copy_(0, d.indices, d.values)
            if d.bias is not None:
                mod.bias.copy_(d.bias)
        merged_logits = merged(pristine.preprocess(raws)) @ pkg.head_weight.T + pkg.head_bias
    assert torch.allclose(train_logits, merged_logits, atol=1e-4, rtol=1e-4)
    meta = pkg.meta
    assert meta.task_id == "colors" and meta.mode == "row" and meta.k == 2
    assert meta.labels == splits.labels and meta.base_model_id == pristine.model_id
    assert meta.metrics["test_acc"] == res.metrics["test_acc"] and "trainable_pct" in meta.metrics
    assert meta.preprocessing["kind"] == "image"
    rep = run_eval(EvalConfig(**trained["common"], package=str(res.package_path)),
                   backbone=copy.deepcopy(pristine), splits=splits)
    assert rep["accuracy"] == pytest.approx(res.metrics["test_acc"])


def test_run_input_size_is_used_by_every_call_and_recorded_never_set_on_the_backbone(imgdir, tmp_path):
    """``input_size`` is the task's preprocessing: selection views, training batches, val/test, the
    package and eval all use it; the backbone keeps its own data config. The ViT below only runs
    32 px inputs while its data config claims 64 px, so any call that fell back to the backbone's
    default would fail."""
    bb = _backbone()
    bb.data_config = {**bb.data_config, "input_size": (3, 64, 64)}
    before = bb.preprocessing_meta()
    common = dict(backbone=BACKBONE, data=dict(format="imagefolder", path=str(imgdir), val_fraction=0.25,
                                               test_fraction=0.25), progress=False, batch_size=12, device="cpu",
                  input_size=32)
    splits = load_splits(common["data"])
    sel = run_select(SelectConfig(**common, out=str(tmp_path / "s.safetensors"), k=1, heatmap=False),
                     backbone=bb, splits=splits)
    res = run_fit(FitConfig(**common, selection=str(tmp_path / "s.safetensors"), out_dir=str(tmp_path / "f"),
                            epochs=1, augment=True), backbone=bb, splits=splits, selection=sel)
    assert bb.preprocessing_meta() == before
    assert sel.meta["preprocessing"]["timm_data_config"]["input_size"] == [3, 32, 32]
    pkg = load_package(res.package_path, base=bb.describe())
    assert pkg.meta.preprocessing["timm_data_config"]["input_size"] == [3, 32, 32]
    assert pkg.meta.preprocessing["timm_data_config"]["crop_pct"] == 1.0
    rep = run_eval(EvalConfig(**common, package=str(res.package_path)), backbone=bb, splits=splits)
    assert rep["accuracy"] == pytest.approx(res.metrics["test_acc"])
    assert bb.preprocessing_meta() == before


def test_package_rejected_on_other_base(trained):
    other = _backbone(seed=1)
    with pytest.raises(FingerprintMismatchError):
        load_task_model(trained["res"].package_path, other)
    with pytest.raises(FitError, match="fingerprint"):
        run_fit(FitConfig(**trained["common"], selection=str(trained["out"] / "sel.safetensors"),
                          out_dir=str(trained["out"] / "x"), max_steps=1), backbone=other,
                splits=trained["splits"])


def test_column_mode_and_budget(trained, tmp_path):
    bb, splits, common = copy.deepcopy(trained["pristine"]), trained["splits"], trained["common"]
    sel = run_select(SelectConfig(**common, out=str(tmp_path / "c.safetensors"), mode="column", budget=0.01,
                                  heatmap=False), backbone=bb, splits=splits)
    assert sel.meta["selected_fraction"] <= 0.01
    res = run_fit(FitConfig(**common, selection=str(tmp_path / "c.safetensors"), out_dir=str(tmp_path / "f"),
                            epochs=1, max_steps=2, grad_accum=2, tune_bias=False, head_init="zero"),
                  backbone=bb, splits=splits)
    pkg = load_package(res.package_path, base=trained["pristine"].describe())
    assert pkg.meta.mode == "column" and all(d.bias is None for d in pkg.deltas.values())
    raws = [splits.val[i][0] for i in range(4)]
    with torch.no_grad():
        a = res.model.eval()(bb.preprocess(raws))
    assert torch.allclose(a, package_logits(res.package_path, copy.deepcopy(trained["pristine"]), raws), atol=1e-5)
    res.model.close()


def test_sparse_selection_not_packageable(trained, tmp_path):
    bb, splits, common = copy.deepcopy(trained["pristine"]), trained["splits"], trained["common"]
    run_select(SelectConfig(**common, out=str(tmp_path / "s.safetensors"), mode="sparse", k=3, num_batches=1,
                            heatmap=False), backbone=bb, splits=splits)
    with pytest.raises(FitError, match="sparse"):
        run_fit(FitConfig(**common, selection=str(tmp_path / "s.safetensors"), out_dir=str(tmp_path / "f")),
                backbone=bb, splits=splits)


def test_cli_help_lists_commands():
    r = CliRunner().invoke(app, ["--help"])
    assert r.exit_code == 0
    for cmd in ("select", "fit", "eval"):
        assert cmd in r.output
    r = CliRunner().invoke(app, ["fit", "--help"])
    assert r.exit_code == 0 and "l2_last_layers" in r.output and "trainable" in r.output.lower()


def test_cli_end_to_end_yaml(imgdir, tmp_path):
    cfg = {
        "backbone": BACKBONE, "device": "cpu", "batch_size": 12, "threads": 1,
        "data": {"format": "imagefolder", "path": str(imgdir), "max_per_class": 8},
        "select": {"out": str(tmp_path / "sel.safetensors"), "k": 1, "num_batches": 2},
        "fit": {"selection": str(tmp_path / "sel.safetensors"), "out_dir": str(tmp_path / "fit"),
                "task_id": "cli", "epochs": 1},
    }
    y = tmp_path / "run.yaml"
    y.write_text(yaml.safe_dump(cfg))
    run = CliRunner()
    r = run.invoke(app, ["select", "-c", str(y), "-q"])
    assert r.exit_code == 0, r.output
    r = run.invoke(app, ["fit", "-c", str(y), "-q", "--set", "fit.max_steps=2", "--lr", "0.01"])
    assert r.exit_code == 0, r.output
    pkg = tmp_path / "fit" / "cli.grft.safetensors"
    assert pkg.is_file()
    assert load_package(pkg).meta.training_config["lr"] == 0.01
    r = run.invoke(app, ["eval", str(pkg), "-c", str(y), "-q", "--split", "val", "--out", str(tmp_path / "e.json")])
    assert r.exit_code == 0, r.output
    assert json.loads((tmp_path / "e.json").read_text())["split"] == "val"
    r = run.invoke(app, ["fit", "-c", str(y), "--set", "fit.nonsense=1"])
    assert r.exit_code == 2 and "nonsense" in r.output
    r = run.invoke(app, ["eval", str(tmp_path / "missing.grft.safetensors"), "-c", str(y)])
    assert r.exit_code == 1 and "not found" in r.output


def test_config_file_sections(tmp_path):
    p = tmp_path / "c.yaml"
    p.write_text(yaml.safe_dump({"seed": 3, "k": 4, "epochs": 2, "fit": {"epochs": 7}}))
    assert load_config("select", p).k == 4 and load_config("select", p).seed == 3
    assert load_config("fit", p).epochs == 7
    assert load_config("fit", p, {"epochs": 9}).epochs == 9


# ---------------------------------------------------------------------------------------------
# biases, linear probe, row op training path, sweep
# ---------------------------------------------------------------------------------------------
def _mlp_case(tmp_path, bias="all", k=1, **fit_kw):
    """tiny_mlp (one bias-free Linear among three) on separable tensor data, selection + fit."""
    from conftest import tiny_mlp

    from grft_train.data import DataSplits, SampleSet, Source

    bb = tiny_mlp().eval().requires_grad_(False)
    g = torch.Generator().manual_seed(0)
    y = torch.arange(60) % 3
    x = torch.randn(60, 12, generator=g) + 2 * torch.nn.functional.one_hot(y, 12).float()
    src = Source(lambda i: x[i], [str(int(v)) for v in y], "tensor", "mem")
    ds = SampleSet(src, list(range(60)), y.tolist(), ["0", "1", "2"])
    splits = DataSplits(ds.subset(range(36)), ds.subset(range(36, 48)), ds.subset(range(48, 60)), ["0", "1", "2"],
                        "tensor")
    common = dict(progress=False, batch_size=12, device="cpu")
    sel = run_select(SelectConfig(**common, out=str(tmp_path / "s.safetensors"), k=k, heatmap=False),
                     backbone=bb, splits=splits)
    fcfg = FitConfig(**common, selection=str(tmp_path / "s.safetensors"), out_dir=str(tmp_path / "f"), epochs=3,
                     lr=2e-2, bias=bias, **fit_kw)
    return bb, splits, sel, run_fit(fcfg, backbone=bb, splits=splits, selection=sel)


def test_bias_all_trains_every_module_bias_zero_init_on_bias_free(tmp_path):
    from grft_serve.export import MergedTask

    bb, splits, sel, res = _mlp_case(tmp_path, bias="all")
    pristine = copy.deepcopy(bb)
    m, model = res.metrics, res.model
    names = ["net.0", "net.2", "net.4"]  # net.2 is nn.Linear(32, 32, bias=False)
    assert sorted(model.names) == names and bb.get_submodule("net.2").bias is None
    assert m["trainable_biases"] == 32 + 32 + 16 and m["bias"] == "all"
    assert m["trainable_params"] == m["trainable_values"] + m["trainable_biases"] + m["head_params"]
    assert m["trainable_values"] == sum(int(i.numel()) * bb.get_submodule(n).weight.shape[1]
                                        for n, i in sel.indices.items())
    assert model.bias("net.2").abs().sum() > 0  # started at zero, trained
    pkg = load_package(res.package_path, base=bb.describe())
    assert sorted(pkg.deltas) == names and all(d.bias is not None for d in pkg.deltas.values())
    x = torch.stack([splits.test[i][0] for i in range(len(splits.test))])
    with torch.no_grad():
        train_logits = model.eval()(x)
    res.model.close()
    assert torch.allclose(train_logits, package_logits(res.package_path, bb, list(x)), atol=1e-6)
    with torch.no_grad():
        merged = MergedTask(pristine, pkg)(x)
    assert torch.allclose(train_logits, merged, atol=1e-5)
    assert bb.get_submodule("net.2").bias is None  # the frozen backbone got no bias


def test_bias_selected_and_none(tmp_path):
    _, _, sel, res = _mlp_case(tmp_path / "a", bias="selected")
    assert sorted(res.model.names) == sorted(sel.indices)
    # selected modules with a bias of their own keep it trainable; the bias-free one gets none
    assert res.metrics["trainable_biases"] == sum(32 if n == "net.0" else 16 if n == "net.4" else 0
                                                  for n in sel.indices)
    res.model.close()
    _, _, _, res = _mlp_case(tmp_path / "b", bias="none")
    assert res.metrics["trainable_biases"] == 0 and all(res.model.bias(n) is None for n in res.model.names)
    pkg = load_package(res.package_path)
    assert all(d.bias is None for d in pkg.deltas.values())  # an old-style package still loads
    res.model.close()
    assert FitConfig(tune_bias=False).bias == "none" and FitConfig(tune_bias=True).bias == "selected"


def test_linear_probe_computes_features_once(tmp_path):
    from grft_train.select import Selection

    bb, splits, sel, res = _mlp_case(tmp_path / "g", bias="all")
    res.model.close()
    calls = []
    handle = bb.register_forward_hook(lambda mod, inp, out: calls.append(out.shape[0]))
    try:
        probe = run_fit(FitConfig(progress=False, batch_size=12, device="cpu", out_dir=str(tmp_path / "p"), epochs=4,
                                  lr=2e-2, bias="none"),
                        backbone=bb, splits=splits, selection=Selection("row", {}, meta=sel.meta))
    finally:
        handle.remove()
    n = len(splits.train) + len(splits.val) + len(splits.test)
    assert probe.metrics["head_only"] and probe.metrics["trainable_params"] == probe.metrics["head_params"]
    assert sum(calls) == n + 1  # one probe sample + every sample exactly once, whatever the epochs
    h = probe.metrics["history"]
    assert h[-1]["train_loss"] < h[0]["train_loss"]
    pkg = load_package(probe.package_path)
    assert pkg.deltas == {}
    rep = run_eval(EvalConfig(progress=False, batch_size=12, device="cpu", package=str(probe.package_path),
                              split="test"), backbone=bb, splits=splits)
    assert rep["accuracy"] == pytest.approx(probe.metrics["test_acc"])


@pytest.mark.parametrize("mode", ["row", "column"])
@pytest.mark.parametrize("layer", ["linear", "conv", "depthwise"])
def test_training_row_op_matches_merged_weights_and_gradients(mode, layer):
    from torch import nn

    from grft_serve.core.rowop import ModuleDelta, apply_delta

    if mode == "column" and layer == "depthwise":
        pytest.skip("grouped convs are row-only")
    torch.manual_seed(0)
    mod = {"linear": nn.Linear(6, 5), "conv": nn.Conv2d(4, 6, 3, padding=1, bias=False),
           "depthwise": nn.Conv2d(6, 6, 3, padding=1, groups=6)}[layer].requires_grad_(False)
    dim = 0 if mode == "row" else 1
    idx = torch.tensor([1, 3])
    vals = (mod.weight.index_select(dim, idx) + 0.3).requires_grad_(True)
    bias = torch.randn(mod.weight.shape[0], requires_grad=True)
    x = (torch.randn(2, 4, 6) if layer == "linear" else torch.randn(2, 6 if layer == "depthwise" else 4, 5, 5))
    x.requires_grad_(True)
    Wm = mod.weight.index_copy(dim, idx, vals)
    ref = (torch.nn.functional.linear(x, Wm, bias) if layer == "linear"
           else torch.nn.functional.conv2d(x, Wm, bias, 1, 1, 1, mod.groups))
    g = torch.randn_like(ref)
    want = torch.autograd.grad((ref * g).sum(), [x, vals, bias])
    y = mod(x)
    out = apply_delta(mod, x, y, ModuleDelta(mode, idx, vals, bias))
    if y._is_view():  # F.linear on 3-D input: a fresh tensor, so no CopySlices clones in backward
        assert "CopySlices" not in type(out.grad_fn).__name__
    else:
        assert out.data_ptr() == y.data_ptr()  # written in place: no copy of the layer's output
    got = torch.autograd.grad((out * g).sum(), [x, vals, bias])
    assert torch.allclose(out, ref, atol=1e-5)
    for a, b in zip(got, want):
        assert torch.allclose(a, b, atol=1e-5)


def test_cli_sweep_picks_by_val_and_writes_table_plot(imgdir, tmp_path):
    cfg = {
        "backbone": BACKBONE, "device": "cpu", "batch_size": 12, "threads": 1,
        "data": {"format": "imagefolder", "path": str(imgdir), "max_per_class": 6, "val_fraction": 0.25},
        "select": {"num_batches": 1},
        "fit": {"out_dir": str(tmp_path / "fit"), "task_id": "swept", "epochs": 1, "max_steps": 1},
    }
    y = tmp_path / "run.yaml"
    y.write_text(yaml.safe_dump(cfg))
    r = CliRunner().invoke(app, ["sweep", "-c", str(y), "-q", "--k", "1,2", "--l2", "0,1e-3"])
    assert r.exit_code == 0, r.output
    out = json.loads(r.output.strip().splitlines()[-1])
    runs = [json.loads(line) for line in (tmp_path / "fit" / "sweep" / "sweep.jsonl").read_text().splitlines()]
    assert len(runs) == 4 and {(r_["k"], r_["l2_lambda"]) for r_ in runs} == {(1, 0.0), (1, 1e-3), (2, 0.0), (2, 1e-3)}
    best = max(r_["val_acc"] for r_ in runs)
    assert out["best"]["val_acc"] == best and out["runs"] == 4
    pkg = load_package(out["package"])
    assert pkg.meta.task_id == "swept" and pkg.meta.k == out["best"]["k"]
    assert pkg.meta.training_config["l2_lambda"] == out["best"]["l2_lambda"]
    assert (tmp_path / "fit" / "sweep" / "sweep.png").stat().st_size > 1000
    assert "(best)" in (tmp_path / "fit" / "sweep" / "sweep.md").read_text()
    r = CliRunner().invoke(app, ["sweep", "-c", str(y), "-q", "--k", "0,x"])
    assert r.exit_code == 2 and "--k" in r.output
