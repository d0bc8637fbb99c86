"""Backbones: frozen feature extractors, built through one registry door.

``create_backbone(cfg)`` (alias ``load_backbone``) looks ``cfg.type`` up among the families
registered with ``@register_backbone``; importing this package loads the built-in families
(``timm``, ``hf``, ``causal_lm``, ``zoo``). Loading never touches the network.
"""
from . import zoo  # noqa: E402  (registers the "zoo" family)
from .base import Backbone, BackboneError, ModuleBackbone
from .causal import CausalLMBackbone
from .hf import HFTextBackbone
from .registry import BackboneConfig, create_backbone, load_backbone, register_backbone, registered_backbones
from .timm import RANDOM_WEIGHTS, TimmBackbone

__all__ = ["Backbone", "BackboneConfig", "BackboneError", "CausalLMBackbone", "HFTextBackbone", "ModuleBackbone",
           "RANDOM_WEIGHTS", "TimmBackbone", "create_backbone", "load_backbone", "register_backbone",
           "registered_backbones", "zoo"]
