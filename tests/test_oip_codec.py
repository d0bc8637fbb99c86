"""The OIP v2 tensor codec against the real tritonclient's request encoder and response decoder (no server)."""
from __future__ import annotations

import json
import struct

import numpy as np
import pytest

from grft_serve.app.oip_codec import infer_response, pack_bytes, parse_infer, unpack_bytes
from grft_serve.app.schemas import ApiError

httpclient = pytest.importorskip("tritonclient.http")
from tritonclient.http._utils import _get_inference_request  # noqa: E402


def encode(values, name="images", binary=True, outputs=None):
    inp = httpclient.InferInput(name, [len(values)], "BYTES")
    inp.set_data_from_numpy(np.array(values, dtype=object), binary_data=binary)
    body, json_size = _get_inference_request([inp], "req-1", outputs, 0, False, False, 0, None, None)
    return body, None if json_size is None else str(json_size)


def test_binary_and_json_requests_from_tritonclient():
    imgs = [b"\x89PNG\r\n\x1a\nfake", b"", b"\x00\xff" * 100]
    req = parse_infer(*encode(imgs), "images")
    assert req.binary and req.values == imgs and req.id == "req-1"
    assert req.outputs == {"probabilities": True, "labels": True}  # no outputs named: binary_data_output
    texts = ["a good film", "é ü 漢字"]
    outs = [httpclient.InferRequestedOutput("labels", binary_data=False)]
    req = parse_infer(*encode(texts, "texts", binary=False, outputs=outs), "texts")
    assert not req.binary and req.values == texts and req.outputs == {"labels": False}


def test_response_read_by_tritonclient():
    probs = np.array([[0.1, 0.9], [0.7, 0.3]], dtype=np.float32)
    for binary in (True, False):
        body, headers = infer_response("t", "v1", probs, ["b", "a"], {"probabilities": binary, "labels": binary})
        res = httpclient.InferResult.from_response_body(body, header_length=headers.get(
            "inference-header-content-length") and int(headers["inference-header-content-length"]))
        np.testing.assert_array_equal(res.as_numpy("probabilities"), probs)
        assert [x.decode() if isinstance(x, bytes) else x for x in res.as_numpy("labels")] == ["b", "a"]
        assert res.get_response()["model_version"] == "v1"
    assert "inference-header-content-length" not in infer_response("t", "v", probs, ["b", "a"],
                                                                   {"labels": False})[1]


def test_bytes_tensor_roundtrip_and_framing_errors():
    items = [b"", b"x", b"\x00" * 7]
    assert unpack_bytes(pack_bytes(items)) == items
    with pytest.raises(ApiError) as e:
        unpack_bytes(struct.pack("<I", 10) + b"abc")
    assert e.value.status == 400
    with pytest.raises(ApiError):
        unpack_bytes(b"\x01\x00")


@pytest.mark.parametrize("head, rest, hlen, status", [
    ({"inputs": [{"name": "texts", "datatype": "BYTES", "shape": [1], "data": ["a"]}]}, b"", "x", 400),
    ({"inputs": [{"name": "texts", "datatype": "BYTES", "shape": [1], "data": ["a"]}]}, b"", "999", 400),
    ({"inputs": [{"name": "other", "datatype": "BYTES", "shape": [1], "data": ["a"]}]}, b"", None, 422),
    ({"inputs": [{"name": "texts", "datatype": "FP32", "shape": [1], "data": [1.0]}]}, b"", None, 422),
    ({"inputs": [{"name": "texts", "datatype": "BYTES", "shape": [2], "data": ["a"]}]}, b"", None, 422),
    ({"inputs": [{"name": "texts", "datatype": "BYTES", "shape": [-1], "data": ["a"]}]}, b"", None, 422),
    ({"inputs": [{"name": "texts", "datatype": "BYTES", "shape": [1]}]}, b"", None, 422),
    ({"inputs": []}, b"", None, 422),
    ({"inputs": [{"name": "texts", "datatype": "BYTES", "shape": [1], "data": ["a"]}],
      "outputs": [{"name": "logits"}]}, b"", None, 422),
    ({"inputs": [{"name": "texts", "datatype": "BYTES", "shape": [1],
                  "parameters": {"binary_data_size": 9}}]}, pack_bytes([b"a"]), "H", 400),
    ({"inputs": [{"name": "texts", "datatype": "BYTES", "shape": [1], "data": ["a"]}]}, b"junk", "H", 400),
])
def test_bad_requests(head, rest, hlen, status):
    js = json.dumps(head).encode()
    with pytest.raises(ApiError) as e:
        parse_infer(js + rest, str(len(js)) if hlen == "H" else hlen, "texts")
    assert e.value.status == status, e.value.message


def test_nested_json_data_and_bad_json():
    head = {"inputs": [{"name": "texts", "datatype": "BYTES", "shape": [2, 1], "data": [["a"], ["b"]]}]}
    assert parse_infer(json.dumps(head).encode(), None, "texts").values == ["a", "b"]
    deep = {"inputs": [{"name": "texts", "datatype": "BYTES", "shape": [1], "data": [[[[["x"]]]]]}]}
    assert parse_infer(json.dumps(deep).encode(), None, "texts").values == ["x"]
    with pytest.raises(ApiError) as e:
        parse_infer(b"{nope", None, "texts")
    assert e.value.status == 400
