"""Files the project reads by name: YAML/JSON config mappings and objects named ``module:attr``.

(Atomic publication of written files lives in :mod:`grft_serve.core.atomic`.)
"""
from __future__ import annotations

import importlib
import os
from pathlib import Path
from typing import Any

__all__ = ["ConfigFileError", "import_object", "read_yaml_mapping"]


class ConfigFileError(ValueError):
    """A config file is missing, is not valid YAML, or its top level is not a mapping."""


def read_yaml_mapping(path: str | os.PathLike, what: str = "config file") -> dict:
    """The mapping at the top of the YAML (or JSON) file ``path`` (an empty file reads as ``{}``)."""
    import yaml

    path = Path(path)
    if not path.is_file():
        raise ConfigFileError(f"{what} not found: {path}")
    try:
        raw = yaml.safe_load(path.read_text()) or {}
    except yaml.YAMLError as e:
        raise ConfigFileError(f"cannot parse {path}: {e}") from None
    if not isinstance(raw, dict):
        raise ConfigFileError(f"{path}: the top level must be a mapping")
    return raw


def import_object(path: str) -> Any:
    """The object named by ``"package.module:attr"`` (``attr`` may be dotted)."""
    mod, sep, attr = path.partition(":")
    if not sep or not mod or not attr:
        raise ValueError(f"expected 'module:attribute', got {path!r}")
    obj: Any = importlib.import_module(mod)
    for part in attr.split("."):
        obj = getattr(obj, part)
    return obj
