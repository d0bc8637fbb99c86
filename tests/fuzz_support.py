"""Shared by the package tests and the fuzz suites: hypothesis profiles and raw safetensors editing.

Profiles: ``ci`` (default) — ``GRFT_FUZZ_EXAMPLES`` examples per property (150), derandomized so runs
are repeatable and bounded; ``deep`` (``HYPOTHESIS_PROFILE=deep``) — 20x as many, freshly random.
"""
import json
import os
import struct

from hypothesis import HealthCheck, settings
from hypothesis import strategies as st

N = int(os.environ.get("GRFT_FUZZ_EXAMPLES", "150"))
_QUIET = [HealthCheck.too_slow, HealthCheck.data_too_large]
settings.register_profile("ci", max_examples=N, deadline=None, derandomize=True, database=None,
                          suppress_health_check=_QUIET)
settings.register_profile("deep", max_examples=20 * N, deadline=None, suppress_health_check=_QUIET)
settings.load_profile(os.environ.get("HYPOTHESIS_PROFILE", "ci"))


def damage(draw, data: bytearray, op: str, max_flips: int, max_tail: int) -> bytearray:
    """``data`` damaged in place by ``op``: ``flip`` 1..max_flips random bytes, ``truncate`` at a random
    offset, ``append`` 1..max_tail random bytes; any other op leaves it as it is."""
    if op == "flip":
        for _ in range(draw(st.integers(1, max_flips))):
            data[draw(st.integers(0, len(data) - 1))] = draw(st.integers(0, 255))
    elif op == "truncate":
        del data[draw(st.integers(0, len(data) - 1)):]
    elif op == "append":
        data += draw(st.binary(min_size=1, max_size=max_tail))
    return data


def split(data: bytes) -> tuple[dict, bytes]:
    """A safetensors file → (header JSON, data bytes)."""
    n = struct.unpack("<Q", data[:8])[0]
    return json.loads(data[8:8 + n]), data[8 + n:]


def join(header: dict, body: bytes) -> bytes:
    """(header JSON, data bytes) → a safetensors file (header padded to 8 bytes, as the writer does)."""
    h = json.dumps(header).encode()
    h += b" " * (-len(h) % 8)
    return struct.pack("<Q", len(h)) + h + body
