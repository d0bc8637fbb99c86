"""The backbone registry: families register by name, one door builds any of them."""
import pydantic
import pytest
import torch
from torch import nn

from grft_serve.core.backbones import (
    Backbone,
    BackboneConfig,
    BackboneError,
    ModuleBackbone,
    create_backbone,
    load_backbone,
    register_backbone,
    registered_backbones,
)


def test_builtin_families_are_registered():
    assert {"timm", "hf", "zoo"} <= set(registered_backbones())
    assert load_backbone is create_backbone


def test_a_new_family_is_built_through_the_same_door():
    @register_backbone("test-mlp")
    def _mlp(cfg: BackboneConfig) -> Backbone:
        dim = int(cfg.model_kwargs.get("dim", 4))
        return ModuleBackbone(nn.Sequential(nn.Linear(dim, dim), nn.ReLU()), f"mlp/{dim}", dim)

    bb = create_backbone({"type": "test-mlp", "model_kwargs": {"dim": 6}})
    assert bb.model_id == "mlp/6" and bb(torch.zeros(2, 6)).shape == (2, 6)
    with pytest.raises(ValueError, match="already registered"):
        register_backbone("test-mlp")(lambda cfg: None)


def test_unknown_family_is_a_clear_error():
    with pytest.raises(pydantic.ValidationError, match="unknown backbone type 'nope'; known: .*timm"):
        create_backbone({"type": "nope"})
    with pytest.raises(BackboneError, match="needs a model name"):
        create_backbone({"type": "timm"})
