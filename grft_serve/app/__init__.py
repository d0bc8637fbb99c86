"""The Ray Serve application: one FastAPI ingress + one deployment per frozen backbone.

::

    HTTP ──► Ingress (auth + size from headers, input checks, routing by base fingerprint)
               │ ONE call per request and backbone, carrying all of its inputs
               ▼
             Backbone "<name>" replicas (one Engine each): decode + preprocess in a thread pool,
               @serve.batch by inputs across concurrent requests, one forward per batch
               (single task: patch path; several: override path)
               ▲
             task store (a directory, shared between nodes on a cluster) ◄── register / delete

Layout: :mod:`.config` (pydantic models), :mod:`.schemas` (API models, the one error type),
:mod:`.inputs` (base64 / image / text checks and the one decode), :mod:`.bodies` (the JSON value
budget before parsing), :mod:`.guard` (auth, body limits), :mod:`.proxy` (the header cap),
:mod:`.index` (the task index), :mod:`.prepare` (a request's decode + preprocessing, in slices),
:mod:`.runnable` (can the base run a task's preprocessing), :mod:`.replica` (the backbone server, a
plain class), :mod:`.api` + :mod:`.ingress` (FastAPI routes), :mod:`.build` (``build_app``).
"""
from .build import app_from_config, build_app
from .config import AppConfig, BackboneDeploymentConfig, Limits, StoreConfig, make_store
from .ingress import Ingress
from .replica import BackboneServer
from .schemas import ApiError

__all__ = ["build_app", "app_from_config", "AppConfig", "BackboneDeploymentConfig", "Limits", "StoreConfig",
           "make_store", "Ingress", "BackboneServer", "ApiError"]
