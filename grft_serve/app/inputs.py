"""Input checks and decoding, shared by the ingress (cheap checks, before anything runs) and the
backbone replicas (the one full decode, in a thread pool beside the forward).

The ingress decodes base64 and reads only image *headers* (format, width, height): anything over a
limit is refused with 413, anything unreadable with 400/422, before a replica sees it. A replica
decodes each accepted image once (:func:`decode_image`); an image whose pixel data turns out broken
fails only its own request.

Limits guard memory, not just bytes: a 100-byte PNG can declare 1 x 20,000 pixels, which a
shortest-side resize would blow up to 64 x 1,280,000; hence the pixel *and* aspect-ratio caps.
"""
from __future__ import annotations

import base64
import binascii
import io
from typing import Any

from .config import Limits
from .schemas import ApiError

__all__ = ["IMAGE_FORMATS", "decode_b64_image", "check_image", "check_text", "decode_image", "check_input"]

# formats Pillow may open: never EPS/PS (Ghostscript) or other exotic plugins
IMAGE_FORMATS = ("PNG", "JPEG", "WEBP", "BMP", "GIF", "TIFF")


def _where(i: int | None) -> str:
    return "" if i is None else f"input {i}: "


def decode_b64_image(s: Any, i: int | None, limits: Limits) -> bytes:
    """A base64 (or ``data:...;base64,``) string → checked image bytes."""
    if not isinstance(s, str):
        raise ApiError(422, "invalid_input", f"{_where(i)}expected a base64 string, got {type(s).__name__}")
    if s.startswith("data:"):
        head, _, s = s.partition(",")
        if ";base64" not in head:
            raise ApiError(400, "bad_base64", f"{_where(i)}data URL is not base64-encoded")
    s = "".join(s.split())
    if len(s) * 3 // 4 > limits.max_image_bytes + 3:
        raise ApiError(413, "image_too_large", f"{_where(i)}image is larger than {limits.max_image_bytes} bytes")
    try:
        data = base64.b64decode(s, validate=True)
    except (binascii.Error, ValueError) as e:
        raise ApiError(400, "bad_base64", f"{_where(i)}not valid base64 ({e})") from None
    return check_image(data, i, limits)


def _open(data: bytes):
    from PIL import Image

    return Image.open(io.BytesIO(data), formats=IMAGE_FORMATS)


def _check_size(w: int, h: int, i: int | None, limits: Limits) -> None:
    if w < 1 or h < 1:
        raise ApiError(422, "not_an_image", f"{_where(i)}image has no pixels ({w}x{h})")
    if w * h > limits.max_image_pixels:
        raise ApiError(413, "image_too_large",
                       f"{_where(i)}image has {w}x{h} pixels; the limit is {limits.max_image_pixels}")
    if max(w, h) / min(w, h) > limits.max_image_aspect_ratio:
        raise ApiError(413, "image_too_large", f"{_where(i)}image is {w}x{h}; the longest side may be at most "
                                               f"{limits.max_image_aspect_ratio:g}x the shortest")


def check_image(data: bytes, i: int | None, limits: Limits) -> bytes:
    """Size, format and header checks without decoding the pixels (cheap: the ingress runs it)."""
    from PIL import Image, UnidentifiedImageError

    if len(data) > limits.max_image_bytes:
        raise ApiError(413, "image_too_large",
                       f"{_where(i)}image is {len(data)} bytes; the limit is {limits.max_image_bytes}")
    if not data:
        raise ApiError(422, "not_an_image", f"{_where(i)}empty image")
    try:
        with _open(data) as img:
            w, h = img.size
    except (UnidentifiedImageError, OSError, SyntaxError, ValueError, TypeError, Image.DecompressionBombError) as e:
        raise ApiError(422, "not_an_image", f"{_where(i)}not a readable {'/'.join(IMAGE_FORMATS)} image "
                                            f"({type(e).__name__})") from None
    _check_size(w, h, i, limits)
    return data


def decode_image(data: bytes, limits: Limits, i: int | None = None):
    """Checked bytes → an RGB PIL image (the one full decode)."""
    from PIL import Image, UnidentifiedImageError

    try:
        with _open(data) as img:
            _check_size(*img.size, i, limits)
            img.load()
            return img.convert("RGB")
    except ApiError:
        raise
    except (UnidentifiedImageError, OSError, SyntaxError, ValueError, TypeError, EOFError, MemoryError,
            Image.DecompressionBombError) as e:
        raise ApiError(422, "not_an_image", f"{_where(i)}image data is broken ({type(e).__name__})") from None


def check_text(s: Any, i: int | None, limits: Limits) -> str:
    if not isinstance(s, str):
        raise ApiError(422, "invalid_input", f"{_where(i)}expected a string, got {type(s).__name__}")
    if len(s) > limits.max_text_chars:
        raise ApiError(413, "text_too_long", f"{_where(i)}text has {len(s)} characters; the limit is "
                                             f"{limits.max_text_chars}")
    try:
        s.encode("utf-8")
    except UnicodeEncodeError:
        raise ApiError(422, "invalid_input", f"{_where(i)}text is not valid Unicode (lone surrogate)") from None
    if "\x00" in s:
        raise ApiError(422, "invalid_input", f"{_where(i)}text contains a NUL character")
    return s


def check_input(kind: str, x: Any, i: int | None, limits: Limits, encoded: bool = True):
    """The ingress check for one JSON input of a backbone of ``kind`` ("image" / "text")."""
    if kind == "image":
        return decode_b64_image(x, i, limits) if encoded else check_image(x, i, limits)
    return check_text(x, i, limits)
