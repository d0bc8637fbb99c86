"""Configuration of the serving app: pydantic models for ``build_app``'s ``args`` (one Serve application).

``AppConfig`` is what a Serve config file's ``applications[].args`` holds; every field is checked
before a replica starts (``extra="forbid"``: a misspelt key is an error, not a silent default).
"""
from __future__ import annotations

from pathlib import Path
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, model_validator

from ..core.backbones import BackboneConfig
from ..core.files import import_object
from ..core.package import DEFAULT_MAX_BYTES
from ..store import DirectoryTaskStore, TaskStore

__all__ = ["StoreConfig", "BackboneDeploymentConfig", "GenerationOptions", "Limits", "AppConfig", "make_store"]


class StoreConfig(BaseModel):
    """Where task packages live. ``path``: a directory (shared between nodes on a cluster).

    ``cls`` (``"package.module:Class"``) plugs in another :class:`~grft_serve.store.TaskStore`
    implementation (e.g. an object-store backend), built as ``Class(**kwargs)``.
    """

    model_config = ConfigDict(extra="forbid")

    path: str = "./tasks"
    cls: str | None = None
    kwargs: dict = {}


class GenerationOptions(BaseModel):
    """The decode loop of a generation backbone (a causal LM: ``type: causal_lm``, zoo ``smollm2_lm``);
    see :mod:`grft_serve.engine.generate`. Ignored by classification backbones."""

    model_config = ConfigDict(extra="forbid")

    decoder: Literal["continuous", "padded"] = Field(
        "continuous", description="continuous batching (sequences join and leave at every step) or static "
                                  "padded batches joined at batch boundaries")
    max_tasks_per_batch: int = Field(8, ge=1, description="tasks decoding at once; requests of further tasks "
                                                          "wait for a task to finish")
    max_requests: int = Field(32, ge=1, description="sequences decoding at once")
    max_batch_tokens: int = Field(512, ge=1, description="tokens per forward (prompt chunks + one per "
                                                         "decoding sequence)")
    kv_cache_tokens: int | None = Field(None, ge=1, description="KV cache size in tokens (default: "
                                                                "max_requests full contexts)")
    page_size: int = Field(64, ge=4, description="tokens per KV cache page")
    max_pending: int = Field(512, ge=1, description="sequences decoding or waiting; a request beyond it is "
                                                    "answered 503 (retry later)")


class BackboneDeploymentConfig(BaseModel):
    """One backbone deployment (one frozen base; tasks carrying its fingerprint are routed here)."""

    model_config = ConfigDict(extra="forbid")

    name: str = Field(pattern=r"^[A-Za-z0-9][A-Za-z0-9_\-]{0,63}$")
    backbone: BackboneConfig
    seed: int | None = Field(None, description="torch.manual_seed before building (random-init models)")
    device: str = Field("auto", description="'cpu', 'cuda', 'cuda:1', or 'auto' (cuda when available)")
    dtype: Literal["float32", "bfloat16", "float16", "auto"] = "auto"
    replicas: int = Field(1, ge=1)
    num_cpus: float = Field(0.5, ge=0)
    num_gpus: float = Field(0.0, ge=0)
    resources: dict[str, float] = Field({}, description="custom Ray resources per replica (place replicas on "
                                                        "the nodes that have them)")
    torch_threads: int | None = Field(1, ge=1, description="torch.set_num_threads in each replica")
    max_batch_size: int = Field(16, ge=1, description="inputs (not requests) per forward")
    batch_wait_timeout_s: float = Field(0.005, ge=0)
    max_ongoing_requests: int | None = Field(None, ge=1, description="default: max(4 * max_batch_size, 32)")
    decode_workers: int = Field(2, ge=1, description="threads decoding and preprocessing inputs in each "
                                                     "replica, beside the forward")
    device_cache_bytes: int = Field(1 << 30, ge=0)
    host_cache_bytes: int | None = Field(None, ge=0, description="cap on the task bytes held on the host "
                                                                 "(packed tasks, LRU); an evicted task is "
                                                                 "reloaded from the store (None: no cap)")
    max_input_pixels: int | None = Field(None, ge=1, description="largest model input (height x width) a "
                                                                 "task's preprocessing may ask for; default "
                                                                 "4x the base's own input size")
    generation: GenerationOptions = GenerationOptions()

    @property
    def task_kind(self) -> str:
        """``classification`` or ``generation`` (from the backbone config, nothing is built)."""
        return self.backbone.task_kind


class Limits(BaseModel):
    """Per-request limits. Everything over a limit is refused (413 as a rule) before it is decoded."""

    model_config = ConfigDict(extra="forbid")

    max_inputs_per_request: int = Field(64, ge=1)
    max_json_values: int | None = Field(None, ge=1, description="values (array elements, object members) a "
                                                                "JSON body may hold, counted before it is "
                                                                "parsed; default 8 x max_inputs_per_request "
                                                                "+ 256")
    max_text_chars: int = Field(4096, ge=1)
    max_image_bytes: int = Field(8 << 20, ge=1)
    max_image_pixels: int = Field(40_000_000, ge=1)
    max_image_aspect_ratio: float = Field(20.0, ge=1, description="longest / shortest side of an image")
    max_jpeg_scans: int = Field(100, ge=1, description="scans (SOS segments) of one JPEG: a progressive "
                                                       "image with thousands of tiny scans costs seconds")
    max_jpeg_scan_pixels: int = Field(600_000_000, ge=1, description="scans x width x height of one JPEG "
                                                                     "(each scan walks every block): 15 "
                                                                     "scans of a 40 MP photo")
    decode_timeout_s: float = Field(5.0, gt=0, description="decoding one image (a deadline "
                                                           "checked between blocks of its data)")
    max_decoded_bytes: int = Field(512 << 20, ge=1, description="width x height x channels summed over a "
                                                                "request's images (after JPEG draft "
                                                                "reduction), before any is decoded")
    max_header_bytes: int = Field(64 << 10, ge=1, description="request line + headers seen by the ingress")
    max_request_bytes: int = Field(64 << 20, ge=1, description="JSON / multipart body of a predict call")
    max_package_bytes: int = Field(DEFAULT_MAX_BYTES, ge=1)
    max_top_k: int = Field(20, ge=1)
    body_idle_timeout_s: float = Field(10.0, gt=0, description="a request body that sends nothing for "
                                                               "this long is answered 408")
    max_tasks: int = Field(10_000, ge=1, description="registered tasks; a registration of a new id beyond "
                                                     "it is refused (409)")
    max_choices: int = Field(8, ge=1, description="generation: completions per request (prompts x n)")
    max_prompt_chars: int = Field(32_768, ge=1, description="generation: characters of a request's prompts or "
                                                            "messages")

    @model_validator(mode="after")
    def _derived(self) -> "Limits":
        if self.max_json_values is None:
            self.max_json_values = 8 * self.max_inputs_per_request + 256
        return self


class AppConfig(BaseModel):
    """``args`` of :func:`build_app`. Tokens are never in the config: only the names of the env vars
    holding them (read in the ingress replica's process; set them on every node, or via the Serve
    config's ``runtime_env.env_vars``)."""

    model_config = ConfigDict(extra="forbid")

    store: StoreConfig = StoreConfig()
    backbones: list[BackboneDeploymentConfig] = Field(min_length=1)
    admin_token_env: str = Field("GRFT_ADMIN_TOKEN", description="env var with the token for register/delete")
    read_token_env: str | None = Field(None, description="env var with a token required for reads/predict "
                                                         "(unset or empty variable: reads are open)")
    limits: Limits = Limits()
    sync_interval_s: float = Field(2.0, gt=0, description="how often replicas drop tasks deleted from the store")
    task_cache_ttl_s: float = Field(0.5, ge=0, description="how long the ingress trusts its store listing")
    ingress_replicas: int = Field(1, ge=1)
    ingress_num_cpus: float = Field(0.1, ge=0)
    ingress_resources: dict[str, float] = Field({}, description="custom Ray resources per ingress replica")
    ingress_max_ongoing_requests: int = Field(256, ge=1)
    metrics_task_label_cap: int = Field(100, ge=0, description="tasks with their own label in the per-task "
                                                               "metrics of each process; the rest are 'other'")


def make_store(cfg: StoreConfig | dict) -> TaskStore:
    if isinstance(cfg, dict):
        cfg = StoreConfig(**cfg)
    if cfg.cls:
        return import_object(cfg.cls)(**cfg.kwargs)
    return DirectoryTaskStore(Path(cfg.path).expanduser())
