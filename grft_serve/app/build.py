"""The Serve application builder: ``import_path: grft_serve.app:build_app`` with ``args`` = AppConfig.

The servers are plain classes; this is the one place that turns them into Serve deployments (one
per backbone plus the FastAPI ingress) with the options from the config.
"""
from __future__ import annotations

import os
from pathlib import Path

from ray import serve

from ..core.files import read_yaml_mapping
from .api import api
from .config import AppConfig, make_store
from .ingress import Ingress
from .generation import GenerationServer
from .replica import BackboneServer

__all__ = ["build_app", "app_from_config"]

IngressDeployment = serve.deployment(name="Ingress")(serve.ingress(api)(Ingress))
BackboneDeployment = serve.deployment(name="Backbone")(BackboneServer)
GenerationDeployment = serve.deployment(name="Generation")(GenerationServer)


def build_app(args: dict | AppConfig | None) -> serve.Application:
    """Serve application builder (``args``: :class:`AppConfig` fields)."""
    cfg = args if isinstance(args, AppConfig) else AppConfig.model_validate(dict(args or {}))
    names = [b.name for b in cfg.backbones]
    if len(set(names)) != len(names):
        raise ValueError(f"backbone names must be unique, got {names}")
    if not cfg.store.cls:  # replicas may run in another working directory: pin the path now
        cfg.store.path = str(Path(os.path.expandvars(cfg.store.path)).expanduser().resolve())
    make_store(cfg.store)  # fail fast on a bad store path / class
    store, limits = cfg.store.model_dump(), cfg.limits.model_dump()
    handles = {}
    for b in cfg.backbones:
        generation = b.task_kind == "generation"
        # a generation call holds its slot for a whole stream: admit up to the decoder's own queue
        ongoing = b.max_ongoing_requests or (b.generation.max_pending if generation else max(4 * b.max_batch_size, 32))
        handles[b.name] = (GenerationDeployment if generation else BackboneDeployment).options(
            name=f"Backbone-{b.name}", num_replicas=b.replicas, max_ongoing_requests=ongoing,
            ray_actor_options={"num_cpus": b.num_cpus, "num_gpus": b.num_gpus, "resources": b.resources},
            # the ingress logs each HTTP request; its internal calls to a backbone need no second line
            logging_config={"enable_access_log": False},
        ).bind(b.model_dump(mode="json"), store, limits, cfg.sync_interval_s, cfg.metrics_task_label_cap)
    return IngressDeployment.options(
        num_replicas=cfg.ingress_replicas, max_ongoing_requests=cfg.ingress_max_ongoing_requests,
        ray_actor_options={"num_cpus": cfg.ingress_num_cpus, "resources": cfg.ingress_resources},
    ).bind(cfg.model_dump(mode="json"), handles)


def app_from_config(path: str | os.PathLike, name: str | None = None) -> serve.Application:
    """Build the app from a Serve config file (its first application, or the one called ``name``)."""
    cfg = read_yaml_mapping(path)
    apps = cfg.get("applications") or [{"name": "grft", "args": cfg}]
    a = next((a for a in apps if name is None or a.get("name") == name), None)
    if a is None:
        raise ValueError(f"no application {name!r} in {path}")
    return build_app(a.get("args") or {})
