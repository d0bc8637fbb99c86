"""Bounded work on request bodies *before* they are parsed: a JSON value budget and strict header integers.

A JSON body costs its parser (and everything after it: model validation, per-item checks) in
proportion to the number of *values* it holds, not to its bytes: ``{"items": [0,0,0,...]}`` packs a
million values into 2 MiB. :func:`check_json_budget` bounds that number before ``json.loads`` runs, in
two passes that never build a Python object per value:

1. **Upper bound, one C pass.** Every array element and object member after the first is preceded
   by a comma, and every container opens with ``[`` or ``{``; so ``V = #',' + #'[' + #'{'`` counted
   over the raw bytes (``bytes.translate`` deleting every other byte) bounds the values from above,
   strings included. A body with ``V <= budget`` is parsed as is — every ordinary request, whose
   images are base64 (no ``,[{``) and whose texts are few.
2. **Exact count, bounded.** Otherwise the structural characters *outside strings* are counted:
   escape pairs (``\\\\``, ``\\"``) are removed (C ``bytes.replace``, only when a backslash occurs),
   then a regex walks ``"[^"]*"`` strings (matched whole, at C speed) and ``, [ {`` tokens, stopping
   as soon as the budget is passed. The Python loop runs at most ``3 * budget + 4`` times, whatever
   the body's size: valid JSON with more than ``2 * budget + 2`` strings already holds more than
   ``budget`` values, so a flood of strings stops it too.

Nesting is bounded by ``json.loads`` itself (``RecursionError`` → 400 ``bad_json``). The budget is
:attr:`~grft_serve.app.config.Limits.max_json_values` (default ``8 × max_inputs_per_request + 256``):
far above what a request within ``max_inputs_per_request`` needs, far below what hurts.

:func:`header_int` parses a length header as ASCII digits only (``str.isdigit`` also accepts ``²``,
which ``int`` refuses).
"""
from __future__ import annotations

import re

from .schemas import ApiError

__all__ = ["check_json_budget", "json_values_over", "header_int"]

_NOT_STRUCTURAL = bytes(b for b in range(256) if b not in b",[{")
_TOKEN = re.compile(rb'"[^"]*"|[,\[{]')
_QUOTE = ord('"')
_DIGITS = re.compile(r"[0-9]{1,19}")


def json_values_over(body: bytes, budget: int) -> bool:
    """Whether the JSON text ``body`` holds more than ``budget`` values (see the module docstring).
    Exact for valid JSON; for invalid JSON it may say True early, and the parser refuses it anyway."""
    if len(body.translate(None, _NOT_STRUCTURAL)) <= budget:
        return False
    if b"\\" in body:
        body = body.replace(b"\\\\", b"").replace(b'\\"', b"")
    values = strings = 0
    for m in _TOKEN.finditer(body):
        if body[m.start()] == _QUOTE:
            strings += 1
            if strings > 2 * budget + 2:
                return True
        else:
            values += 1
            if values > budget:
                return True
    return False


def check_json_budget(body: bytes, budget: int, max_inputs: int) -> None:
    """413 ``too_many_inputs`` for a JSON body over its value budget, before it is parsed."""
    if json_values_over(body, budget):
        raise ApiError(413, "too_many_inputs",
                       f"the JSON body holds more than {budget} values; a request carries at most "
                       f"{max_inputs} inputs")


def header_int(value: str | None, name: str, code: str = "bad_request") -> int | None:
    """A non-negative integer header (``None`` when absent); 400 ``code`` unless it is ASCII digits."""
    if value is None:
        return None
    v = value.strip()
    if not _DIGITS.fullmatch(v):
        raise ApiError(400, code, f"{name} is not a non-negative integer")
    return int(v)
