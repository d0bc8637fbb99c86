"""Open Inference Protocol v2 (KServe / Triton) tensors: parse an infer request, build its response.

A GRFT task as an OIP model takes ONE input tensor and gives two outputs::

    input   "images" (image backbones) or "texts" (text backbones)   BYTES [N]
    output  "probabilities"                                            FP32  [N, C]  softmax over the C labels
    output  "labels"                                                   BYTES [N]     the most probable label

JSON tensors carry ``data`` (nested or flat, row-major; BYTES elements are strings: texts, or base64 /
data-URL images). With the *binary tensor data* extension a request or response body is a JSON header
of ``Inference-Header-Content-Length`` bytes followed by raw tensors; a tensor whose ``parameters``
hold ``binary_data_size`` takes the next that many bytes. A binary BYTES tensor is, per element, a
4-byte little-endian length then the bytes (raw image files, or UTF-8 texts). FP32 is little-endian.
Nothing here runs a model: malformed tensors raise :class:`ApiError` (400 framing, 422 contract).

Work is bounded before it is done: the JSON header is held to the request's value budget before it is
parsed (:mod:`.bodies`), a declared ``shape`` larger than the input cap is refused from the header
alone (413 ``too_many_inputs``, whatever the integers' size), and a binary BYTES tensor is unpacked no
further than its declared element count. Probabilities that are not finite are never written (JSON
has no NaN): 422 ``non_finite_result``.
"""
from __future__ import annotations

import json
import struct
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from .bodies import check_json_budget, header_int
from .config import Limits
from .schemas import ApiError

__all__ = ["OUTPUTS", "InferRequest", "input_name", "model_metadata", "parse_infer", "infer_response",
           "pack_bytes", "unpack_bytes"]

OUTPUTS = ("probabilities", "labels")
HEADER = "inference-header-content-length"


def input_name(kind: str) -> str:
    return "images" if kind == "image" else "texts"


def model_metadata(task_id: str, version: str, kind: str, n_labels: int) -> dict:
    return {"name": task_id, "versions": [version], "platform": "grft",
            "inputs": [{"name": input_name(kind), "datatype": "BYTES", "shape": [-1]}],
            "outputs": [{"name": "probabilities", "datatype": "FP32", "shape": [-1, n_labels]},
                        {"name": "labels", "datatype": "BYTES", "shape": [-1]}]}


@dataclass
class InferRequest:
    values: list  # bytes (binary tensor) or JSON values (str expected), row-major
    binary: bool
    outputs: dict[str, bool] = field(default_factory=dict)  # requested output -> as binary data
    id: str | None = None


def _bad(msg: str) -> ApiError:
    return ApiError(400, "bad_tensor", msg)


def _invalid(msg: str) -> ApiError:
    return ApiError(422, "invalid_request", msg)


def unpack_bytes(buf: bytes, max_items: int | None = None) -> list[bytes]:
    """A binary BYTES tensor → its elements (422 as soon as there are more than ``max_items``)."""
    out, pos, n = [], 0, len(buf)
    while pos < n:
        if max_items is not None and len(out) >= max_items:
            raise _invalid(f"binary BYTES tensor holds more than the {max_items} elements its shape declares")
        if pos + 4 > n:
            raise _bad("binary BYTES tensor ends inside an element length")
        (size,) = struct.unpack_from("<I", buf, pos)
        pos += 4
        if pos + size > n:
            raise _bad(f"binary BYTES element {len(out)} declares {size} bytes; only {n - pos} remain")
        out.append(bytes(buf[pos:pos + size]))
        pos += size
    return out


def pack_bytes(items: list[bytes]) -> bytes:
    return b"".join(struct.pack("<I", len(b)) + b for b in items)


def _flatten(data: Any) -> list:
    if not isinstance(data, list):
        return [data]
    out: list = []
    stack = [iter(data)]
    while stack:  # iterative: a deeply nested list cannot exhaust the recursion limit
        for x in stack[-1]:
            if isinstance(x, list):
                stack.append(iter(x))
                break
            out.append(x)
        else:
            stack.pop()
    return out


def _header_and_rest(body: bytes, header_len: str | None, max_inputs: int,
                     max_values: int) -> tuple[Any, memoryview]:
    n = header_int(header_len, "Inference-Header-Content-Length", "bad_tensor")
    if n is None:
        n = len(body)
    elif n > len(body):
        raise _bad(f"Inference-Header-Content-Length is {n} but the body has {len(body)} bytes")
    raw = bytes(memoryview(body)[:n])
    check_json_budget(raw, max_values, max_inputs)
    try:
        head = json.loads(raw)
    except (UnicodeDecodeError, json.JSONDecodeError, RecursionError):
        raise ApiError(400, "bad_json", "the inference request header is not valid JSON") from None
    if not isinstance(head, dict):
        raise _invalid("the inference request must be a JSON object")
    return head, memoryview(body)[n:]


def _shape_size(shape: Any, name: str, cap: int) -> int:
    """Elements a shape declares; 413 when over ``cap`` (Python integers: no overflow)."""
    if not isinstance(shape, list) or not all(isinstance(d, int) and not isinstance(d, bool) and d >= 0
                                              for d in shape):
        raise _invalid(f"input {name!r}: shape must be a list of non-negative integers")
    size = 0 if 0 in shape else 1
    for d in shape:
        size *= d
        if size > cap:
            raise ApiError(413, "too_many_inputs", f"input {name!r} declares shape {str(shape)[:80]}; a request "
                                                   f"carries at most {cap} inputs")
    return size


def _outputs(head: dict) -> dict[str, bool]:
    params = head.get("parameters") or {}
    if not isinstance(params, dict):
        raise _invalid("parameters must be an object")
    default = params.get("binary_data_output", False) is True
    req = head.get("outputs")
    if req is None:
        return {o: default for o in OUTPUTS}
    if not isinstance(req, list) or not req:
        raise _invalid("outputs must be a non-empty list")
    out: dict[str, bool] = {}
    for o in req:
        name = o.get("name") if isinstance(o, dict) else None
        if name not in OUTPUTS:
            raise _invalid(f"unknown output {name!r}; this model has {list(OUTPUTS)}")
        p = o.get("parameters") or {}
        out[name] = p.get("binary_data", default) is True if isinstance(p, dict) else default
    return out


def parse_infer(body: bytes, header_len: str | None, want_input: str, limits: Limits | None = None) -> InferRequest:
    """An infer request body (JSON, or JSON header + binary tensors) → the input values: at most
    ``limits.max_inputs_per_request`` of them, the JSON header within ``limits.max_json_values``."""
    limits = limits or Limits()
    max_inputs = limits.max_inputs_per_request
    head, rest = _header_and_rest(body, header_len, max_inputs, limits.max_json_values)
    inputs = head.get("inputs")
    if not isinstance(inputs, list) or len(inputs) != 1 or not isinstance(inputs[0], dict):
        raise _invalid(f"this model takes exactly one input tensor, {want_input!r}")
    t = inputs[0]
    name = t.get("name")
    if name != want_input:
        raise _invalid(f"unknown input {name!r}; this model takes {want_input!r} (BYTES)")
    if t.get("datatype") != "BYTES":
        raise _invalid(f"input {name!r} must be BYTES, got {t.get('datatype')!r}")
    size = _shape_size(t.get("shape"), name, max_inputs)
    params = t.get("parameters") or {}
    nbin = params.get("binary_data_size") if isinstance(params, dict) else None
    if nbin is not None:
        if not isinstance(nbin, int) or isinstance(nbin, bool) or nbin < 0:
            raise _bad(f"input {name!r}: binary_data_size must be a non-negative integer")
        if nbin != len(rest):
            raise _bad(f"input {name!r} declares {nbin} binary bytes; the body carries {len(rest)}")
        values: list = unpack_bytes(rest, size)
        binary = True
    else:
        if len(rest):
            raise _bad(f"{len(rest)} bytes follow the header but no input declares binary_data_size")
        if "data" not in t:
            raise _invalid(f"input {name!r} has no data")
        values, binary = _flatten(t["data"]), False
    if len(values) != size:
        raise _invalid(f"input {name!r} has {len(values)} elements but shape {t.get('shape')}")
    rid = head.get("id")
    return InferRequest(values, binary, _outputs(head), rid if isinstance(rid, str) else None)


def infer_response(model: str, version: str, probs: np.ndarray, labels: list[str], outputs: dict[str, bool],
                   request_id: str | None = None) -> tuple[bytes, dict[str, str]]:
    """The response body and headers (``Inference-Header-Content-Length`` when any tensor is binary)."""
    if not np.isfinite(probs).all():
        bad = int(np.flatnonzero(~np.isfinite(probs).all(axis=-1))[0]) if probs.ndim > 1 else 0
        raise ApiError(422, "non_finite_result", f"input {bad}: the task's scores are not finite numbers")
    tensors = {"probabilities": ("FP32", list(probs.shape), probs.astype("<f4")),
               "labels": ("BYTES", [len(labels)], labels)}
    out, blobs = [], []
    for name, as_binary in outputs.items():
        dtype, shape, value = tensors[name]
        t: dict[str, Any] = {"name": name, "datatype": dtype, "shape": shape}
        if as_binary:
            blob = value.tobytes() if dtype == "FP32" else pack_bytes([s.encode() for s in value])
            t["parameters"] = {"binary_data_size": len(blob)}
            blobs.append(blob)
        else:
            t["data"] = value.reshape(-1).tolist() if dtype == "FP32" else list(value)
        out.append(t)
    head: dict[str, Any] = {"model_name": model, "model_version": version, "outputs": out}
    if request_id is not None:
        head["id"] = request_id
    js = json.dumps(head, separators=(",", ":"), allow_nan=False).encode()
    if not blobs:
        return js, {"content-type": "application/json"}
    return js + b"".join(blobs), {"content-type": "application/octet-stream",
                                  "inference-header-content-length": str(len(js))}
