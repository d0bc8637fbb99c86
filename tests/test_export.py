"""A task merged into its base and exported to ONNX gives the engine's logits under onnxruntime."""
import json

import numpy as np
import onnxruntime as ort
import pytest
import torch
from conftest import tiny_vit
from typer.testing import CliRunner

from grft_serve.cli import app
from grft_serve.core.package import FingerprintMismatchError, save_package
from grft_serve.engine import Engine
from grft_serve.export import export_onnx, merge_task
from grft_serve.testing import random_package


def test_merged_and_onnx_match_engine(tmp_path):
    bb = tiny_vit()
    pkg = random_package(bb, "onnx-task", mode="row", k=3, tune_bias=True, seed=5)
    path = save_package(pkg, tmp_path / "t.grft.safetensors")
    res = export_onnx(bb, path, tmp_path / "t.onnx")
    assert res["max_abs_diff"] < 1e-4 and res["labels"] == pkg.meta.labels
    x = torch.randn(5, 3, 32, 32)  # another batch size than the export example: dynamic axis
    sess = ort.InferenceSession(str(tmp_path / "t.onnx"), providers=["CPUExecutionProvider"])
    got = sess.run(None, {"pixel_values": x.numpy()})[0]
    with torch.no_grad():
        merged = merge_task(bb, path)(x)
    eng = Engine(bb)
    eng.register(path)
    served = torch.stack(eng.forward(x, ["onnx-task"] * 5)[0])
    assert np.abs(got - served.numpy()).max() < 1e-4
    assert torch.allclose(merged, served, atol=1e-5)


def test_onnx_metadata_and_file_modes(tmp_path):
    """The ONNX file says what it serves (labels, preprocessing, task version); written files are
    readable by other users as the umask allows (0644 under 022, 0640 under 027), not mkstemp's 0600."""
    import os
    import stat

    import onnx

    from grft_serve.store import content_version

    bb = tiny_vit()
    old = os.umask(0o022)
    try:
        pkg = random_package(bb, "meta-task", mode="row", k=2, seed=2)
        path = save_package(pkg, tmp_path / "m.grft.safetensors")
        export_onnx(bb, path, tmp_path / "m.onnx")
        assert stat.S_IMODE(path.stat().st_mode) == 0o644
        assert stat.S_IMODE((tmp_path / "m.onnx").stat().st_mode) == 0o644
        os.umask(0o027)
        export_onnx(bb, path, tmp_path / "m2.onnx")
        assert stat.S_IMODE((tmp_path / "m2.onnx").stat().st_mode) == 0o640
    finally:
        os.umask(old)
    props = {p.key: p.value for p in onnx.load(str(tmp_path / "m.onnx")).metadata_props}
    assert json.loads(props["grft.labels"]) == pkg.meta.labels
    assert json.loads(props["grft.preprocessing"]) == json.loads(json.dumps(pkg.meta.preprocessing))
    assert props["grft.task_version"] == content_version(path.read_bytes())
    assert props["grft.task_id"] == "meta-task" and props["grft.base_fingerprint"] == bb.describe().fingerprint
    assert not list(tmp_path.glob(".*.tmp"))


def test_text_export_and_cli_errors(tmp_path):
    from transformers import BertConfig, BertModel, BertTokenizer

    from grft_serve.core.backbones import HFTextBackbone

    d = tmp_path / "bert"
    d.mkdir()
    (d / "vocab.txt").write_text("\n".join(["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", "an", "example",
                                            "input", "a", "second", ",", "somewhat", "longer", "text", "."]))
    torch.manual_seed(0)
    BertModel(BertConfig(vocab_size=15, hidden_size=32, num_hidden_layers=1, num_attention_heads=2,
                         intermediate_size=64, max_position_embeddings=32)).save_pretrained(str(d))
    BertTokenizer(str(d / "vocab.txt")).save_pretrained(str(d))
    bb = HFTextBackbone(d)
    pkg = random_package(bb, "txt", mode="column", k=2, seed=1)
    path = save_package(pkg, tmp_path / "txt.grft.safetensors")
    r = CliRunner().invoke(app, ["export", str(path), "--backbone", f"hf:{d}", "--out", str(tmp_path / "x.onnx")])
    assert r.exit_code == 0, r.output
    assert json.loads(r.output.strip().splitlines()[-1])["inputs"] == ["input_ids", "attention_mask"]
    # a package for another base is refused and nothing is written
    other = save_package(random_package(tiny_vit(), "v", k=1), tmp_path / "v.grft.safetensors")
    with pytest.raises(FingerprintMismatchError):
        export_onnx(bb, other, tmp_path / "y.onnx")
    r = CliRunner().invoke(app, ["export", str(other), "--backbone", f"hf:{d}", "--out", str(tmp_path / "y.onnx")])
    assert r.exit_code == 1 and "fingerprint" in r.output
    assert not (tmp_path / "y.onnx").exists() and not list(tmp_path.glob(".y.onnx*"))


def test_generation_package_is_refused_with_a_clear_error(tmp_path):
    from gen_fixtures import make_task, make_tiny_lm

    from grft_serve.core.backbones.causal import CausalLMBackbone

    bb = CausalLMBackbone(make_tiny_lm(tmp_path / "lm"))
    path = save_package(make_task(bb, "gen-task", seed=1), tmp_path / "gen.grft.safetensors")
    with pytest.raises(ValueError, match="generation task"):
        merge_task(bb, path)
    r = CliRunner().invoke(app, ["export", str(path), "--backbone", str(_lm_config(tmp_path)),
                                 "--out", str(tmp_path / "g.onnx")])
    assert r.exit_code == 1 and "generation task" in r.output, r.output
    assert not (tmp_path / "g.onnx").exists()


def _lm_config(tmp_path):
    p = tmp_path / "lm.yaml"
    p.write_text(f"backbone: {{type: causal_lm, path: {tmp_path / 'lm'}}}\n")
    return p
