"""Input checks and decoding, shared by the ingress (cheap checks, before anything runs) and the
backbone replicas (the one full decode, in a thread pool beside the forward).

The ingress decodes base64 and reads only image *headers* (format, width, height): anything over a
limit is refused with 413, anything unreadable with 400/422, before a replica sees it. A replica
decodes each accepted image once (:func:`decode_image`); an image whose pixel data turns out broken
fails only its own request.

Limits guard memory, not just bytes: a 100-byte PNG can declare 1 x 20,000 pixels, which a
shortest-side resize would blow up to 64 x 1,280,000; hence the pixel *and* aspect-ratio caps.

Limits guard decode *time* too. A progressive JPEG may repeat scans (SOS segments) at will, and each
scan's entropy decoding walks every block of the image however few bytes it has: 16,000 scans of a
few bytes each cost 10-20 s of libjpeg work in 200 KB, 100 scans of a flat 4000 x 4000 image 6 s in
68 KB. Scans are counted from the markers before anything is decoded, and both the scans
(``max_jpeg_scans``) and scans x pixels (``max_jpeg_scan_pixels``) are capped (an upper bound with
one ``bytes.count``, an exact walk over the segments only past it). The decode itself runs under a
deadline (``decode_timeout_s``) and a cancel flag, checked by the file object Pillow reads from
between blocks of at most :data:`DECODE_BLOCK` bytes: a slow or abandoned decode stops at the next
block (a decoder that takes its whole input in one call, e.g. WebP, is bounded by the pixel caps).

The replica decodes in two steps: :func:`open_image` reads a header, checks it and applies
``Image.draft`` (JPEG: DCT scaling by 1/2, 1/4 or 1/8 while decoding, never below the shortest side the
task's preprocessing resizes to), so the request's decoded bytes are known, and capped, before any
pixel is decoded; :func:`load_image` then decodes one image.
"""
from __future__ import annotations

import base64
import binascii
import io
import math
import threading
import time
from typing import Any

from .config import Limits
from .schemas import ApiError

__all__ = ["IMAGE_FORMATS", "DECODE_BLOCK", "decode_b64_image", "check_image", "check_text", "decode_image",
           "open_image", "load_image", "decoded_bytes", "jpeg_scans", "check_input"]

# formats Pillow may open: never EPS/PS (Ghostscript) or other exotic plugins
IMAGE_FORMATS = ("PNG", "JPEG", "WEBP", "BMP", "GIF", "TIFF")
DECODE_BLOCK = 16 << 10  # bytes handed to a decoder between two deadline checks
_SOS = b"\xff\xda"


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


class _Reader(io.BytesIO):
    """The bytes Pillow decodes from; once armed, every read first checks the deadline and the cancel flag."""

    deadline: float | None = None
    cancel: threading.Event | None = None

    def read(self, n: int | None = -1) -> bytes:
        if self.deadline is not None:
            if self.cancel is not None and self.cancel.is_set():
                raise _Aborted("cancelled")
            if time.monotonic() > self.deadline:
                raise _Aborted("deadline")
        return super().read(n)


class _Aborted(Exception):
    """A decode stopped between two blocks (not an OSError: Pillow lets it through)."""


def _open(data: bytes):
    from PIL import Image

    return Image.open(_Reader(data), formats=IMAGE_FORMATS)


def jpeg_scans(data: bytes, stop: int) -> int:
    """Scans (SOS segments) of a JPEG, counted up to ``stop + 1``: the segments are walked by their
    lengths, the entropy-coded data after each scan header skipped to its next marker (``FF 00`` is a
    stuffed byte, ``FF D0..D7`` a restart marker; neither ends it)."""
    if data.count(_SOS) <= stop:  # every scan starts with FF DA: an upper bound in one pass
        return data.count(_SOS)
    n, i, scans = len(data), 2, 0
    while i + 1 < n and scans <= stop:
        if data[i] != 0xFF:
            i = data.find(b"\xff", i)
            if i < 0:
                break
            continue
        m = data[i + 1]
        if m == 0xFF:  # fill byte
            i += 1
        elif m == 0x00 or m == 0x01 or 0xD0 <= m <= 0xD8:  # stuffed byte, TEM, RSTn, SOI: no length
            i += 2
        elif m == 0xD9:  # EOI
            break
        else:
            scans += m == 0xDA
            i += 2 + int.from_bytes(data[i + 2:i + 4], "big")
    return scans


def _check_jpeg(data: bytes, w: int, h: int, i: int | None, limits: Limits) -> None:
    """Scans at most ``max_jpeg_scans``, and scans x pixels at most ``max_jpeg_scan_pixels``: a scan's
    entropy decoding walks every block of the image however few bytes it has (413 otherwise)."""
    cap = min(limits.max_jpeg_scans, limits.max_jpeg_scan_pixels // (w * h))
    scans = jpeg_scans(data, cap)
    if scans > cap:
        raise ApiError(413, "image_too_complex", f"{_where(i)}JPEG has more than {cap} scans; the limits are "
                                                 f"{limits.max_jpeg_scans} scans and {limits.max_jpeg_scan_pixels} "
                                                 "scans x pixels")


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
            w, h, fmt = *img.size, img.format
    except (UnidentifiedImageError, OSError, SyntaxError, ValueError, TypeError, Image.DecompressionBombError) as e:
        raise ApiError(422, "not_an_image", f"{_where(i)}not a readable {'/'.join(IMAGE_FORMATS)} image "
                                            f"({type(e).__name__})") from None
    _check_size(w, h, i, limits)
    if fmt == "JPEG":
        _check_jpeg(data, w, h, i, limits)
    return data


_BROKEN = (OSError, SyntaxError, ValueError, TypeError, EOFError, MemoryError)


def open_image(data: bytes, limits: Limits, i: int | None = None, min_side: int | None = None):
    """Checked bytes → an opened, not yet decoded image: header checks (size, JPEG scans) and, with
    ``min_side``, ``Image.draft`` down to no less than that shortest side."""
    from PIL import Image

    try:
        img = _open(data)
        _check_size(*img.size, i, limits)
        if img.format == "JPEG":
            _check_jpeg(data, *img.size, i, limits)
        if min_side and min(img.size) >= 2 * min_side:
            w, h = img.size
            s = min_side / min(w, h)
            img.draft("RGB", (max(1, math.ceil(w * s)), max(1, math.ceil(h * s))))
        img.decodermaxblock = DECODE_BLOCK
        return img
    except ApiError:
        raise
    except (*_BROKEN, Image.DecompressionBombError) as e:
        raise ApiError(422, "not_an_image", f"{_where(i)}image data is broken ({type(e).__name__})") from None


def decoded_bytes(img) -> int:
    """Bytes an opened image decodes to (after its draft): width x height x bands."""
    return img.size[0] * img.size[1] * len(img.getbands())


def load_image(img, limits: Limits, i: int | None = None, cancel: threading.Event | None = None):
    """An image from :func:`open_image` → RGB, decoded within ``decode_timeout_s`` (413) unless ``cancel``
    is set (408: the caller went away)."""
    from PIL import Image

    reader = img.fp
    if isinstance(reader, _Reader):
        reader.cancel, reader.deadline = cancel, time.monotonic() + limits.decode_timeout_s
    try:
        with img:
            img.load()
            return img if img.mode == "RGB" else img.convert("RGB")
    except _Aborted as e:
        if str(e) == "cancelled":
            raise ApiError(408, "cancelled", f"{_where(i)}the request was cancelled") from None
        raise ApiError(413, "image_too_complex", f"{_where(i)}image took more than {limits.decode_timeout_s:g} s "
                                                 "to decode") from None
    except (*_BROKEN, Image.DecompressionBombError) as e:
        raise ApiError(422, "not_an_image", f"{_where(i)}image data is broken ({type(e).__name__})") from None


def decode_image(data: bytes, limits: Limits, i: int | None = None, min_side: int | None = None,
                 cancel: threading.Event | None = None):
    """Checked bytes → an RGB PIL image (the one full decode: :func:`open_image` + :func:`load_image`)."""
    return load_image(open_image(data, limits, i, min_side), limits, i, cancel)


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
