"""A bias:all task on a Conv->BN backbone (no conv biases): stored per module, equal to merged weights
and to its ONNX export."""
import numpy as np
import pytest
import torch

from grft_train.config import FitConfig
from grft_train.evaluate import package_logits


@pytest.mark.slow
def test_bias_all_package_on_cnn_merges_and_exports_to_onnx(tmp_path):
    """Conv→BN backbone without conv biases: the zero-initialised biases a bias:all task trains are
    stored per module (k=0 modules included) and equal merged weights, also through ONNX."""
    pytest.importorskip("onnxruntime")
    import onnxruntime as ort
    from conftest import tiny_cnn

    from grft_serve.core.package import save_package
    from grft_serve.export import export_onnx, merge_task
    from grft_train.fit import build_task_model, make_package, used_modules
    from grft_train.select import Selection, eligible_modules

    bb = tiny_cnn().eval().requires_grad_(False)
    spec = bb.describe()
    x = torch.randn(2, *bb.data_config["input_size"], generator=torch.Generator().manual_seed(1))
    used = used_modules(bb, x)
    conv_names = [n for n, _ in eligible_modules(bb, mode="column")]
    sel = Selection("column", {n: torch.tensor([0]) for n in conv_names[:3]},
                    meta={"base_fingerprint": spec.fingerprint, "base_model_id": spec.model_id})
    cfg = FitConfig(progress=False, bias="all", task_id="cnn-bias")
    model = build_task_model(bb, sel, 3, cfg, modules=used)
    assert set(model.names) == set(used) and any(bb.get_submodule(n).bias is None for n in used)
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for p in model.parameters():
            if p.requires_grad:
                p.add_(0.05 * torch.randn(p.shape, generator=g))
        want = model.eval()(x)
    model.close()
    pkg = make_package(model, sel, spec, cfg, {}, bb.preprocessing_meta(), {"labels": ["a", "b", "c"]})
    assert sum(1 for d in pkg.deltas.values() if d.k == 0 and d.bias is not None) == len(used) - 3
    path = save_package(pkg, tmp_path / "cnn.grft.safetensors")
    with torch.no_grad():
        assert torch.allclose(merge_task(bb, path)(x), want, atol=1e-4)
        assert torch.allclose(package_logits(path, bb, list(x)), want, atol=1e-5)
    res = export_onnx(bb, path, tmp_path / "cnn.onnx")
    sess = ort.InferenceSession(str(tmp_path / "cnn.onnx"), providers=["CPUExecutionProvider"])
    got = sess.run(None, {"pixel_values": x.numpy()})[0]
    assert res["max_abs_diff"] < 1e-4 and np.abs(got - want.numpy()).max() < 1e-4
