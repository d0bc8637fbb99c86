"""Property-based fuzzing of the input decoders (grft_serve.app.inputs).

Every input — any JSON value, any text (lone surrogates and NULs included), base64 and data URLs of
real and corrupted images in every allowed format, extreme sizes and aspect ratios, and formats that
must not be opened — is either accepted (a checked value: text, bytes, an RGB image within the
limits) or refused with an :class:`ApiError` whose status is 4xx and whose body is the project's
error shape. Nothing else may escape. Examples are bounded and derandomized (profiles in
``tests/fuzz_support.py``).
"""
import base64
import io

import pytest
from fuzz_support import damage  # noqa: E402 - also loads the hypothesis profiles
from hypothesis import given
from hypothesis import strategies as st

inputs = pytest.importorskip("grft_serve.app.inputs")
from grft_serve.app.config import Limits  # noqa: E402
from grft_serve.app.schemas import ApiError  # noqa: E402

LIMITS = Limits(max_text_chars=64, max_image_bytes=64 << 10, max_image_pixels=300_000, max_image_aspect_ratio=8.0)
SAVE_FORMATS = ["PNG", "JPEG", "WEBP", "BMP", "GIF", "TIFF"]

json_value = st.recursive(st.none() | st.booleans() | st.integers() | st.floats() | st.text(max_size=8),
                          lambda c: st.lists(c, max_size=3) | st.dictionaries(st.text(max_size=4), c, max_size=3),
                          max_leaves=6)
any_text = st.text(alphabet=st.characters(min_codepoint=0, max_codepoint=0x10FFFF, categories=None), max_size=80)


def outcome(fn, *args):
    """``fn(*args)``: the value, or the ApiError (checked to be a 4xx in the error shape)."""
    try:
        return fn(*args)
    except ApiError as e:
        assert 400 <= e.status < 500, (e.status, e.code, e.message)
        body = e.body()
        assert set(body) == {"error"} and isinstance(body["error"]["code"], str) and body["error"]["message"]
        return e


@st.composite
def images(draw) -> bytes:
    from PIL import Image

    fmt = draw(st.sampled_from(SAVE_FORMATS))
    w = draw(st.integers(1, 64) | st.integers(1, 1200))
    h = draw(st.integers(1, 64) | st.integers(1, 1200))
    mode = draw(st.sampled_from(["RGB", "L", "RGBA", "P", "1"] if fmt not in ("JPEG",) else ["RGB", "L"]))
    if fmt == "WEBP" and mode in ("P", "1"):
        mode = "RGB"
    img = Image.new(mode, (w, h), color=draw(st.integers(0, 255)))
    buf = io.BytesIO()
    img.save(buf, format=fmt)
    how = draw(st.sampled_from(["none", "flip", "truncate", "append"]))
    return bytes(damage(draw, bytearray(buf.getvalue()), how, max_flips=6, max_tail=32))


# formats Pillow knows but the service must never open (EPS would run Ghostscript)
FOREIGN = [b"%!PS-Adobe-3.0 EPSF-3.0\n%%BoundingBox: 0 0 10 10\nshowpage\n",
           b"P6\n2 2\n255\n" + bytes(12), b"GIF87a" + bytes(20), b"\x00\x00\x01\x00\x01\x00" + bytes(40),
           b"<svg xmlns='http://www.w3.org/2000/svg'/>", b"BM" + bytes(60)]


def _check_image_result(got):
    if not isinstance(got, ApiError):
        assert isinstance(got, bytes)


def _check_decoded(got):
    if not isinstance(got, ApiError):
        assert got.mode == "RGB"
        w, h = got.size
        assert 1 <= w * h <= LIMITS.max_image_pixels and max(w, h) <= LIMITS.max_image_aspect_ratio * min(w, h)


@given(any_text | json_value)
def test_fuzz_text(x):
    got = outcome(inputs.check_text, x, 0, LIMITS)
    if not isinstance(got, ApiError):
        assert got == x and len(got) <= LIMITS.max_text_chars
        got.encode("utf-8")  # what the tokenizer needs: never a lone surrogate
        assert "\x00" not in got
    outcome(inputs.check_input, "text", x, 0, LIMITS)


@given(images() | st.sampled_from(FOREIGN) | st.binary(max_size=200))
def test_fuzz_image_bytes(data):
    checked = outcome(inputs.check_image, data, 1, LIMITS)
    _check_image_result(checked)
    _check_decoded(outcome(inputs.decode_image, data, LIMITS, 1))
    if data in FOREIGN and not data.startswith((b"GIF", b"BM")):
        assert isinstance(checked, ApiError)


@given(st.data())
def test_fuzz_base64(data):
    raw = data.draw(images() | st.binary(max_size=100))
    enc = base64.b64encode(raw).decode()
    how = data.draw(st.sampled_from(["plain", "data_url", "not_b64_url", "newlines", "garbage", "json", "cut"]))
    s = {"plain": enc, "data_url": f"data:image/png;base64,{enc}", "not_b64_url": f"data:image/png,{enc}",
         "newlines": "\n".join(enc[i:i + 60] for i in range(0, len(enc), 60)),
         "garbage": data.draw(any_text), "json": data.draw(json_value), "cut": enc[:-1]}[how]
    got = outcome(inputs.decode_b64_image, s, 2, LIMITS)
    _check_image_result(got)
    if not isinstance(got, ApiError):
        _check_decoded(outcome(inputs.decode_image, got, LIMITS, 2))
    outcome(inputs.check_input, "image", s, 2, LIMITS)


def test_known_bad_inputs_are_4xx():
    """The inputs that once failed whole batches: each refused alone, with a 4xx."""
    from PIL import Image

    assert isinstance(outcome(inputs.check_text, "abc\ud800def", 0, LIMITS), ApiError)
    for w, h in ((1, 20_000), (20_000, 1), (1, 9)):
        buf = io.BytesIO()
        Image.new("L", (w, h)).save(buf, format="PNG")
        e = outcome(inputs.check_image, buf.getvalue(), 0, LIMITS)
        assert isinstance(e, ApiError) and e.status == 413
