"""Every shipped Serve config (deployments/*.yaml) is a valid app config, with the task kinds it says."""
from pathlib import Path

import pytest

from grft_serve.app.config import AppConfig
from grft_serve.core.files import read_yaml_mapping

ROOT = Path(__file__).resolve().parent.parent


@pytest.mark.parametrize("path", sorted((ROOT / "deployments").glob("*.yaml")), ids=lambda p: p.name)
def test_shipped_configs_validate(path):
    apps = read_yaml_mapping(path)["applications"]
    for app in apps:
        assert app["import_path"] == "grft_serve.app:build_app"
        cfg = AppConfig(**app["args"])
        names = [b.name for b in cfg.backbones]
        assert len(set(names)) == len(names)
        for b in cfg.backbones:
            causal = b.backbone.type == "causal_lm" or (b.backbone.type == "zoo" and b.backbone.name.endswith("_lm"))
            assert b.task_kind == ("generation" if causal else "classification"), b.name
