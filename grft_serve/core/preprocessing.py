"""The ``preprocessing`` metadata of a task package: how its inputs were prepared in training.

A task is served with exactly the preprocessing it was trained with, and tasks sharing one are
batched together, so this metadata reaches the serving path of every caller: it is validated at
registration against a closed schema (unknown keys, wrong types and out-of-range sizes are refused).

- ``{"kind": "image", "timm_data_config": {...}}`` — a timm eval transform: resize the shortest side
  to ``floor(input_size / crop_pct)`` then crop to ``input_size`` (``[C, H, W]``, at most
  :data:`MAX_INPUT_PX` per side, so the resized image is at most ``MAX_INPUT_PX / MIN_CROP_PCT``);
- ``{"kind": "text", "pooling": "mean" | "last", "max_length": 1..MAX_TEXT_TOKENS}``;
- ``{"kind": "tensor"}``;
- ``{}`` — the backbone's own defaults.
"""
from __future__ import annotations

from typing import Annotated, Any, Literal, Union

from pydantic import BaseModel, ConfigDict, Field, Strict, TypeAdapter, ValidationError, field_validator

__all__ = ["MAX_INPUT_PX", "MAX_TEXT_TOKENS", "MIN_CROP_PCT", "ImagePreprocessing", "TextPreprocessing",
           "TensorPreprocessing", "TimmDataConfig", "validate_preprocessing"]

MAX_INPUT_PX = 1024
MIN_CROP_PCT = 0.5
MAX_TEXT_TOKENS = 8192

_Finite = Annotated[float, Strict(), Field(allow_inf_nan=False)]
_Int = Annotated[int, Strict()]


class _Closed(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class TimmDataConfig(_Closed):
    """The keys of ``timm.data.resolve_data_config`` that an eval transform uses."""

    input_size: list[_Int] = Field(min_length=3, max_length=3, description="[channels, height, width]")
    interpolation: Literal["nearest", "bilinear", "bicubic", "box", "hamming", "lanczos"] = "bilinear"
    mean: list[_Finite] | None = Field(None, min_length=1, max_length=4)
    std: list[Annotated[_Finite, Field(gt=0)]] | None = Field(None, min_length=1, max_length=4)
    crop_pct: Annotated[_Finite, Field(ge=MIN_CROP_PCT, le=1.0)] | None = None
    crop_mode: Literal["center", "squash", "border"] | None = None

    @field_validator("input_size")
    @classmethod
    def _size(cls, v: list[int]) -> list[int]:
        c, h, w = v
        if not 1 <= c <= 4:
            raise ValueError(f"input_size channels must be 1..4, got {c}")
        if not (1 <= h <= MAX_INPUT_PX and 1 <= w <= MAX_INPUT_PX):
            raise ValueError(f"input_size {h}x{w} is outside 1..{MAX_INPUT_PX} px")
        return v


class ImagePreprocessing(_Closed):
    kind: Literal["image"]
    timm_data_config: TimmDataConfig | None = None


class TextPreprocessing(_Closed):
    kind: Literal["text"]
    pooling: Literal["mean", "last"] | None = None
    max_length: Annotated[_Int, Field(ge=1, le=MAX_TEXT_TOKENS)] | None = None


class TensorPreprocessing(_Closed):
    kind: Literal["tensor"]


_ADAPTER = TypeAdapter(Annotated[Union[ImagePreprocessing, TextPreprocessing, TensorPreprocessing],
                                 Field(discriminator="kind")])


def validate_preprocessing(value: Any) -> dict:
    """Return ``value`` unchanged if it is valid preprocessing metadata; raise ``ValueError`` naming
    the first problem otherwise (the message is safe to show to the package's author)."""
    if not isinstance(value, dict):
        raise ValueError(f"preprocessing must be a JSON object, got {type(value).__name__}")
    if not value:
        return value
    try:
        _ADAPTER.validate_python(value)
    except ValidationError as e:
        first = e.errors()[0]
        where = ".".join(str(p) for p in first["loc"] if p not in ("image", "text", "tensor"))
        raise ValueError(f"preprocessing{'.' + where if where else ''}: {first['msg']}") from None
    return value
