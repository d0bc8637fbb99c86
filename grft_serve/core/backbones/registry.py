"""The backbone registry: one door (:func:`create_backbone`) that looks a family up by name.

Each family module (``timm``, ``hf``, ``zoo``) registers a factory ``BackboneConfig -> Backbone``
with :func:`register_backbone`; this module never imports a family, so families depend on the
registry and never the reverse. Importing :mod:`grft_serve.core.backbones` loads the built-in
families.
"""
from __future__ import annotations

from typing import TYPE_CHECKING, Callable, Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator

from .base import BackboneError

if TYPE_CHECKING:
    from .base import Backbone

__all__ = ["BackboneConfig", "BackboneFactory", "create_backbone", "load_backbone", "register_backbone",
           "registered_backbones"]

BackboneFactory = Callable[["BackboneConfig"], "Backbone"]
TaskKindOf = Callable[["BackboneConfig"], str]
_FAMILIES: dict[str, BackboneFactory] = {}
_TASK_KINDS: dict[str, TaskKindOf] = {}


def register_backbone(family: str, task_kind: str | TaskKindOf = "classification"
                      ) -> Callable[[BackboneFactory], BackboneFactory]:
    """Decorator: make ``factory`` the builder of backbone configs with ``type: family``.

    ``task_kind`` says, without building anything, which task packages the family's backbones serve
    (``classification`` or ``generation``), or computes it from the config (a zoo name)."""
    def deco(factory: BackboneFactory) -> BackboneFactory:
        if family in _FAMILIES and _FAMILIES[family] is not factory:
            raise ValueError(f"backbone family {family!r} is already registered")
        _FAMILIES[family] = factory
        _TASK_KINDS[family] = task_kind if callable(task_kind) else (lambda cfg, k=task_kind: k)
        return factory
    return deco


def registered_backbones() -> tuple[str, ...]:
    """Names of the registered backbone families (the values ``BackboneConfig.type`` accepts)."""
    return tuple(_FAMILIES)


class BackboneConfig(BaseModel):
    """How to build a backbone. ``type`` names a registered family; the built-in ones are

    - ``timm``: ``name`` (any timm model) and ``weights`` (a local file; ``random`` for a randomly
      initialised model, on purpose) or ``checkpoint``;
    - ``hf``: ``path`` (local transformers directory), ``pooling`` (mean|last), ``max_length``
      (tokens per input, default 128) — a classification body;
    - ``causal_lm``: ``path`` (local transformers causal-LM directory), ``max_length`` (the context
      window, default 2048 capped at the model's positions) — a generation base;
    - ``zoo``: ``name`` of a real pretrained backbone that ships offline in a package
      (``efficientnet_lite0``, ``minilm``, ``smollm2``, ``smollm2_lm``), see
      :mod:`grft_serve.core.backbones.zoo`.
    """

    model_config = ConfigDict(extra="forbid")

    type: str = "timm"
    name: str | None = None
    weights: str | None = None
    checkpoint: str | None = None
    path: str | None = None
    pooling: Literal["mean", "last"] = "mean"
    max_length: int | None = Field(None, ge=1, description="tokens per input (hf: default 128) or the context "
                                                         "window (causal_lm: default 2048)")
    model_kwargs: dict = {}

    @property
    def task_kind(self) -> str:
        """``classification`` or ``generation``: what the backbone this config builds serves."""
        return _TASK_KINDS[self.type](self)

    @field_validator("type")
    @classmethod
    def _known_family(cls, v: str) -> str:
        if v not in _FAMILIES:
            raise ValueError(f"unknown backbone type {v!r}; known: {', '.join(_FAMILIES) or 'none'}")
        return v


def create_backbone(cfg: BackboneConfig | dict) -> Backbone:
    """Build a backbone from a :class:`BackboneConfig` (or a dict of its fields) by its family."""
    if isinstance(cfg, dict):
        cfg = BackboneConfig(**cfg)
    factory = _FAMILIES.get(cfg.type)
    if factory is None:  # a config built before its family was unregistered/never loaded
        raise BackboneError(f"unknown backbone type {cfg.type!r}; known: {', '.join(_FAMILIES)}")
    return factory(cfg)


load_backbone = create_backbone
