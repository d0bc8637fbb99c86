"""Shared by the package tests and the fuzz suites: hypothesis profiles and raw safetensors editing.

Profiles: ``ci`` (default) — ``GRFT_FUZZ_EXAMPLES`` examples per property (150), derandomized so runs
are repeatable and bounded; ``deep`` (``HYPOTHESIS_PROFILE=deep``) — 20x as many, freshly random.
"""
import json
import os
import struct

from hypothesis import HealthCheck, settings

N = int(os.environ.get("GRFT_FUZZ_EXAMPLES", "150"))
_QUIET = [HealthCheck.too_slow, HealthCheck.data_too_large]
settings.register_profile("ci", max_examples=N, deadline=None, derandomize=True, database=None,
                          suppress_health_check=_QUIET)
settings.register_profile("deep", max_examples=20 * N, deadline=None, suppress_health_check=_QUIET)
settings.load_profile(os.environ.get("HYPOTHESIS_PROFILE", "ci"))


def split(data: bytes) -> tuple[dict, bytes]:
    """A safetensors file → (header JSON, data bytes)."""
    n = struct.unpack("<Q", data[:8])[0]
    return json.loads(data[8:8 + n]), data[8 + n:]


def join(header: dict, body: bytes) -> bytes:
    """(header JSON, data bytes) → a safetensors file (header padded to 8 bytes, as the writer does)."""
    h = json.dumps(header).encode()
    h += b" " * (-len(h) % 8)
    return struct.pack("<Q", len(h)) + h + body
