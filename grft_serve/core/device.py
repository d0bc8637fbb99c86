"""Where a model runs: ``"auto"`` resolves to CUDA when it is available, otherwise the CPU; the
``"auto"`` dtype is bfloat16 on CUDA and float32 on the CPU."""
from __future__ import annotations

import torch

__all__ = ["resolve_device", "resolve_dtype"]


def resolve_device(name: str | torch.device = "auto") -> torch.device:
    """``name`` as a device (``"auto"``: CUDA if available, else CPU); a CUDA device without CUDA is an error."""
    if str(name) == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    d = torch.device(name)
    if d.type == "cuda" and not torch.cuda.is_available():
        raise RuntimeError(f"device {str(name)!r} requested but CUDA is not available")
    return d


def resolve_dtype(name: str, device: str | torch.device) -> str:
    """The dtype name for ``device`` (``"auto"``: bfloat16 on CUDA, float32 elsewhere)."""
    if name != "auto":
        return name
    return "bfloat16" if torch.device(device).type == "cuda" else "float32"
