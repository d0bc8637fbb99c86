"""The Ray Serve application: one FastAPI ingress + one deployment per frozen backbone.

::

    HTTP ──► Ingress (FastAPI: auth, limits, input decoding, routing by base fingerprint)
               │ one handle call per input
               ▼
             Backbone "<name>" replicas (one Engine each; @serve.batch dynamic batching:
               concurrent inputs for different tasks share ONE forward — override path —
               single-task batches use the patch path)
               ▲
             task store (a directory, shared between nodes on a cluster) ◄── register / delete

Use as a Serve application builder::

    applications:
      - name: grft
        route_prefix: /
        import_path: grft_serve.app:build_app
        args: {store: {path: ./tasks}, backbones: [{name: vit, backbone: {type: timm, name: ...}}]}

Consistency: a registration is fully validated by the target backbone deployment, then written to the
store atomically; the store is the source of truth. Every predict call carries the task version the
ingress resolved from the store; a backbone replica whose engine holds another version (or does not
know the task) syncs from the store before running the batch. So a task registered once is answered
by every replica, deterministically, and every answer states the version it was computed with. A
background sync (``sync_interval_s``) also drops deleted tasks from replicas' memory.
"""
import asyncio
import base64
import binascii
import hmac
import importlib
import io
import json
import logging
import os
import struct
import threading
import time
from pathlib import Path
from typing import Any, Literal

from fastapi import FastAPI, File, Form, Query, Request, UploadFile
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, PlainTextResponse
from pydantic import BaseModel, ConfigDict, Field, ValidationError
from ray import serve

from . import metrics as M
from .backbones import BackboneConfig
from .package import PackageError, PackageTooLargeError, peek_meta
from .store import DirectoryTaskStore, TaskExistsError, TaskNotFoundError, TaskStore

log = logging.getLogger("grft_serve.app")

API_VERSION = "v1"


# =============================================================================================
# configuration
# =============================================================================================
class StoreConfig(BaseModel):
    """Where task packages live. ``path``: a directory (shared between nodes on a cluster).

    ``cls`` (``"package.module:Class"``) plugs in another :class:`~grft_serve.store.TaskStore`
    implementation (e.g. an object-store backend), built as ``Class(**kwargs)``.
    """

    model_config = ConfigDict(extra="forbid")

    path: str = "./tasks"
    cls: str | None = None
    kwargs: dict = {}


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
    torch_threads: int | None = Field(1, ge=1, description="torch.set_num_threads in each replica")
    max_batch_size: int = Field(16, ge=1)
    batch_wait_timeout_s: float = Field(0.005, ge=0)
    max_ongoing_requests: int | None = Field(None, ge=1, description="default: max(4 * max_batch_size, 32)")
    device_cache_bytes: int = Field(1 << 30, ge=0)


class Limits(BaseModel):
    model_config = ConfigDict(extra="forbid")

    max_inputs_per_request: int = Field(64, ge=1)
    max_text_chars: int = Field(4096, ge=1)
    max_image_bytes: int = Field(8 << 20, ge=1)
    max_image_pixels: int = Field(40_000_000, ge=1)
    max_package_bytes: int = Field(256 << 20, ge=1)
    max_top_k: int = Field(20, ge=1)


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
    sync_interval_s: float = Field(2.0, gt=0, description="background store sync period of backbone replicas")
    task_cache_ttl_s: float = Field(0.5, ge=0, description="how long the ingress trusts its store listing")
    ingress_replicas: int = Field(1, ge=1)
    ingress_num_cpus: float = Field(0.1, ge=0)
    ingress_max_ongoing_requests: int = Field(256, ge=1)


def make_store(cfg: StoreConfig | dict) -> TaskStore:
    if isinstance(cfg, dict):
        cfg = StoreConfig(**cfg)
    if cfg.cls:
        mod, _, attr = cfg.cls.partition(":")
        return getattr(importlib.import_module(mod), attr)(**cfg.kwargs)
    return DirectoryTaskStore(Path(cfg.path).expanduser())


# =============================================================================================
# helpers shared by both deployments
# =============================================================================================
def read_meta_header(store: TaskStore, task_id: str) -> dict:
    """A stored package's metadata and size facts from its safetensors header only (cheap)."""
    p = store.path(task_id) if isinstance(store, DirectoryTaskStore) else None
    if p is not None:
        with open(p, "rb") as f:
            head = f.read(8)
            (n,) = struct.unpack("<Q", head) if len(head) == 8 else (0,)
            if n < 2 or n > 100_000_000:
                raise ValueError("not a safetensors file")
            header = json.loads(f.read(n))
            size = os.fstat(f.fileno()).st_size
    else:
        data = store.get(task_id)
        (n,) = struct.unpack("<Q", data[:8])
        header = json.loads(data[8:8 + n])
        size = len(data)
    meta = json.loads((header.get("__metadata__") or {})["grft"])
    n_params = 0
    for name, info in header.items():
        if name != "__metadata__" and not name.startswith("head.") and name.endswith((".values", ".bias")):
            c = 1
            for s in info["shape"]:
                c *= int(s)
            n_params += c
    return {"meta": meta, "num_params": n_params, "bytes": size}


class _FingerprintView:
    """A store filtered to the tasks of one base fingerprint (and not known to be broken)."""

    def __init__(self, store: TaskStore, fingerprint: str):
        self.store, self.fingerprint = store, fingerprint
        self._fp: dict[tuple[str, str], str | None] = {}  # (task, version) -> fingerprint
        self.bad: set[tuple[str, str]] = set()

    def versions(self) -> dict[str, str]:
        out = {}
        for tid, v in self.store.versions().items():
            key = (tid, v)
            if key in self.bad:
                continue
            if key not in self._fp:
                try:
                    self._fp[key] = read_meta_header(self.store, tid)["meta"].get("base_fingerprint")
                except Exception:  # noqa: BLE001 - unreadable: not ours
                    self._fp[key] = None
            if self._fp[key] == self.fingerprint:
                out[tid] = v
        if len(self._fp) > 4 * max(len(out), 256):
            self._fp.clear()
        return out

    def get(self, task_id: str) -> bytes:
        return self.store.get(task_id)


class ApiError(Exception):
    def __init__(self, status: int, code: str, message: str, **extra):
        super().__init__(message)
        self.status, self.code, self.message, self.extra = status, code, message, extra

    def response(self) -> JSONResponse:
        headers = {"WWW-Authenticate": "Bearer"} if self.status == 401 else None
        return JSONResponse({"error": {"code": self.code, "message": self.message, **self.extra}},
                            status_code=self.status, headers=headers)


def _replica_id() -> str:
    try:
        ctx = serve.get_replica_context()
        rid = getattr(ctx, "replica_id", None)
        return getattr(rid, "unique_id", None) or getattr(ctx, "replica_tag", "") or str(os.getpid())
    except Exception:  # noqa: BLE001 - outside Serve
        return str(os.getpid())


# =============================================================================================
# backbone deployment
# =============================================================================================
_DTYPES = {"float32": "float32", "bfloat16": "bfloat16", "float16": "float16"}


@serve.deployment(name="Backbone", max_ongoing_requests=64)
class BackboneServer:
    """Owns one :class:`~grft_serve.engine.Engine`; batches single-input predict calls."""

    def __init__(self, spec: dict, store: dict, limits: dict, sync_interval_s: float = 2.0):
        import torch

        from .backbones import load_backbone
        from .engine import Engine

        self.spec = BackboneDeploymentConfig(**spec)
        self.limits = Limits(**limits)
        self.name = self.spec.name
        self.tags = {"backbone": self.name}
        if self.spec.torch_threads:
            torch.set_num_threads(self.spec.torch_threads)
        device = self.spec.device
        if device == "auto":
            device = "cuda" if torch.cuda.is_available() else "cpu"
        dtype = self.spec.dtype
        if dtype == "auto":
            dtype = "bfloat16" if device.startswith("cuda") else "float32"
        if self.spec.seed is not None:
            torch.manual_seed(self.spec.seed)
        backbone = load_backbone(self.spec.backbone)
        self.engine = Engine(backbone, device=device, dtype=getattr(torch, dtype),
                             device_cache_bytes=self.spec.device_cache_bytes,
                             max_package_bytes=self.limits.max_package_bytes)
        self.kind = backbone.kind
        self.store = make_store(store)
        self.view = _FingerprintView(self.store, self.engine.spec.fingerprint)
        self.replica = _replica_id()
        self._sync_lock = threading.RLock()
        self._last_counters = dict(self.engine.counters)
        self.last_sync: dict = {}
        self.sync()
        self._predict_batch.set_max_batch_size(self.spec.max_batch_size)
        self._predict_batch.set_batch_wait_timeout_s(self.spec.batch_wait_timeout_s)
        self._stop = threading.Event()
        self._interval = sync_interval_s
        threading.Thread(target=self._sync_loop, name="grft-sync", daemon=True).start()

    # -- store sync -----------------------------------------------------------------------------
    def sync(self) -> dict:
        with self._sync_lock:
            want = self.view.versions()
            res = self.engine.sync(self.store, want)
            for tid in res["failed"]:
                self.view.bad.add((tid, want[tid]))
                log.warning("backbone %s: stored task %r (version %s) failed validation; skipped",
                            self.name, tid, want[tid])
            self.last_sync = {**res, "at": time.time()}
            M.inc("grft_syncs", 1, self.tags)
            M.set_gauge("grft_tasks_loaded", len(self.engine.tasks()), self.tags)
            return res

    def _sync_loop(self) -> None:
        while not self._stop.wait(self._interval):
            try:
                self.sync()
            except Exception:  # noqa: BLE001 - keep syncing
                log.exception("background sync failed")

    def __del__(self):
        stop = getattr(self, "_stop", None)
        if stop is not None:
            stop.set()

    # -- small RPCs -------------------------------------------------------------------------------
    def info(self) -> dict:
        bb = self.engine.backbone
        return {"name": self.name, "kind": self.kind, "model_id": self.engine.spec.model_id,
                "fingerprint": self.engine.spec.fingerprint, "feature_dim": self.engine.spec.feature_dim,
                "max_length": getattr(bb, "max_length", None), "device": str(self.engine.device),
                "dtype": str(self.engine.dtype).replace("torch.", ""), "replicas": self.spec.replicas,
                "max_batch_size": self.spec.max_batch_size, "batch_wait_timeout_s": self.spec.batch_wait_timeout_s}

    def stats(self) -> dict:
        return {"replica": self.replica, "engine": self.engine.stats(), "device_cache": self.engine.device_cache(),
                "tasks": {t.task_id: t.version for t in self.engine.tasks()}, "last_sync": self.last_sync,
                "metrics": M.snapshot()}

    async def validate(self, data: bytes) -> dict:
        """Fully validate a package against this base (nothing is registered)."""
        def run():
            try:
                pkg = self.engine.validate(data)
            except PackageError as e:
                return {"ok": False, "status": e.status, "code": e.code, "message": e.message}
            return {"ok": True, "num_params": pkg.num_params(), "meta": json.loads(pkg.meta.model_dump_json())}
        return await asyncio.to_thread(run)

    # -- predict --------------------------------------------------------------------------------
    async def predict(self, item: dict) -> dict:
        """``item``: ``{"task", "version", "input" (str text | bytes image), "top_k"}`` → one answer."""
        return await self._predict_batch(item)

    @serve.batch(max_batch_size=16, batch_wait_timeout_s=0.005)
    async def _predict_batch(self, items: list[dict]) -> list[dict]:
        return await asyncio.to_thread(self._run_batch, items)

    def _decode(self, x: Any):
        if self.kind == "image":
            from PIL import Image

            img = Image.open(io.BytesIO(x))
            img.load()
            return img.convert("RGB")
        return x

    def _run_batch(self, items: list[dict]) -> list[dict]:
        t0 = time.perf_counter()
        out: list[dict | None] = [None] * len(items)
        with self._sync_lock:  # no background sync between the version check and the forward
            have = {t.task_id: t.version for t in self.engine.tasks()}
            if any(have.get(it["task"]) != it.get("version") for it in items):
                self.sync()
                have = {t.task_id: t.version for t in self.engine.tasks()}
            ok_idx, raws = [], []
            for i, it in enumerate(items):
                if it["task"] not in have:
                    out[i] = _err(404, "unknown_task", f"unknown task {it['task']!r}")
                    continue
                try:
                    raws.append(self._decode(it["input"]))
                    ok_idx.append(i)
                except Exception as e:  # noqa: BLE001 - the ingress checked it; be safe anyway
                    out[i] = _err(422, "bad_input", f"cannot decode input: {e}")
            if ok_idx:
                tids = [items[i]["task"] for i in ok_idx]
                k = max(int(items[i].get("top_k", 5)) for i in ok_idx)
                before = dict(self.engine.counters)
                try:
                    res = self.engine.predict(raws, tids, top_k=k)
                except Exception as e:  # noqa: BLE001 - fail this batch's requests, not the replica
                    log.exception("batch failed")
                    res = [_err(500, "internal", f"{type(e).__name__}: {e}")] * len(ok_idx)
                after = self.engine.counters
                for i, r in zip(ok_idx, res):
                    if "error" not in r:
                        r = {**r, "top_k": r["top_k"][: int(items[i].get("top_k", 5))],
                             "backbone": self.name, "replica": self.replica,
                             "batch_size": len(ok_idx), "batch_tasks": len(set(tids))}
                    out[i] = r
                path = "patch" if after["patch_batches"] > before["patch_batches"] else "override"
                M.inc("grft_batches", 1, {**self.tags, "path": path})
                M.observe("grft_batch_size", len(ok_idx), self.tags)
                M.observe("grft_tasks_per_batch", len(set(tids)), self.tags)
                M.inc("grft_predict_inputs", len(ok_idx), self.tags)
                for c in ("cache_hits", "cache_misses", "cache_evictions"):
                    M.inc(f"grft_{c}", after[c] - self._last_counters.get(c, 0), self.tags)
                self._last_counters = dict(after)
                M.set_gauge("grft_device_cache_bytes", self.engine.stats()["device_cache_bytes"], self.tags)
        M.observe("grft_batch_latency_ms", (time.perf_counter() - t0) * 1e3, self.tags)
        return out  # type: ignore[return-value]


def _err(status: int, code: str, message: str) -> dict:
    return {"error": {"status": status, "code": code, "message": message}}


# =============================================================================================
# API models (OpenAPI)
# =============================================================================================
class ErrorBody(BaseModel):
    code: str = Field(description="machine-readable error code, e.g. unknown_task, bad_base64, shape_mismatch")
    message: str = Field(description="what was wrong")


class ErrorResponse(BaseModel):
    error: ErrorBody


class TaskOut(BaseModel):
    model_config = ConfigDict(extra="allow")

    task_id: str
    version: str = Field(description="content hash of the package (first 16 hex digits of SHA-256)")
    backbone: str | None = Field(description="backbone deployment serving it (null: no backbone has its base)")
    base_model_id: str
    base_fingerprint: str
    mode: str
    labels: list[str]
    num_params: int = Field(description="backbone parameters the task changes (head excluded)")
    bytes: int
    metrics: dict = {}
    preprocessing: dict = {}
    created: float | None = None


class TaskList(BaseModel):
    tasks: list[TaskOut]


class TopK(BaseModel):
    label: str
    score: float


class Prediction(BaseModel):
    task: str
    version: str = Field(description="version of the task that computed this answer")
    label: str
    score: float
    top_k: list[TopK]
    backbone: str
    replica: str = Field(description="id of the backbone replica that answered")
    batch_size: int = Field(description="inputs in the forward that computed this answer (dynamic batching)")
    batch_tasks: int = Field(description="distinct tasks in that forward (>1: override path)")


class PredictResponse(BaseModel):
    predictions: list[Prediction]


class PredictRequest(BaseModel):
    model_config = ConfigDict(extra="forbid")

    inputs: list[Any] = Field(description="texts (text tasks) or base64 / data-URL encoded images (image tasks)")
    top_k: int = Field(5, ge=1)


class PredictItem(BaseModel):
    model_config = ConfigDict(extra="forbid")

    task: str
    input: Any = Field(description="a text, or a base64 / data-URL encoded image, matching the task's backbone")


class BatchPredictRequest(BaseModel):
    model_config = ConfigDict(extra="forbid")

    items: list[PredictItem]
    top_k: int = Field(5, ge=1)


_ERR = {"model": ErrorResponse}
_ERRORS_READ = {401: _ERR, 403: _ERR}
_ERRORS_PREDICT = {400: _ERR, 401: _ERR, 403: _ERR, 404: _ERR, 413: _ERR, 415: _ERR, 422: _ERR}

DESCRIPTION = """
Serve many GRFT fine-tuned tasks from one frozen backbone per base model.

* **Tasks** are uploaded as `.grft.safetensors` packages; each is routed to the backbone whose base
  fingerprint it carries, validated there, and stored (the store is the source of truth: every
  replica answers for a task once it is registered; registrations survive restarts).
* **Predict** calls are batched by Ray Serve across requests and tasks: one forward per batch.
* **Auth**: `Authorization: Bearer <token>`. Register/delete need the admin token (env var named by
  `admin_token_env`); reads need the read token when `read_token_env` names a set variable.
* **Errors** are JSON `{"error": {"code", "message"}}` with a 4xx status; a rejected request changes nothing.
"""

api = FastAPI(title="grft-serve", version="0.1.0", description=DESCRIPTION)


@api.exception_handler(ApiError)
async def _api_error(_: Request, exc: ApiError):
    return exc.response()


@api.exception_handler(Exception)
async def _internal_error(_: Request, exc: Exception):
    log.exception("unhandled error", exc_info=exc)
    return ApiError(500, "internal", f"{type(exc).__name__}: {exc}").response()


@api.exception_handler(RequestValidationError)
async def _validation_error(_: Request, exc: RequestValidationError):
    errs = exc.errors()
    first = errs[0] if errs else {}
    loc = ".".join(str(x) for x in first.get("loc", ()))
    return ApiError(422, "invalid_request", f"{loc}: {first.get('msg', 'invalid request')}").response()


@api.middleware("http")
async def _count_requests(request: Request, call_next):
    t0 = time.perf_counter()
    status = 500
    try:
        resp = await call_next(request)
        status = resp.status_code
        return resp
    finally:
        route = request.scope.get("route")
        endpoint = getattr(route, "path", None) or "unmatched"
        M.inc("grft_requests", 1, {"endpoint": endpoint, "method": request.method, "status": str(status)})
        M.observe("grft_request_latency_ms", (time.perf_counter() - t0) * 1e3, {"endpoint": endpoint})


def _b64_image(s: Any, i: int, limits: Limits) -> bytes:
    if not isinstance(s, str):
        raise ApiError(422, "invalid_input", f"input {i}: expected a base64 string, got {type(s).__name__}")
    if s.startswith("data:"):
        head, _, s = s.partition(",")
        if ";base64" not in head:
            raise ApiError(400, "bad_base64", f"input {i}: data URL is not base64-encoded")
    s = "".join(s.split())
    if len(s) * 3 // 4 > limits.max_image_bytes + 3:
        raise ApiError(413, "image_too_large", f"input {i}: image is larger than {limits.max_image_bytes} bytes")
    try:
        data = base64.b64decode(s, validate=True)
    except (binascii.Error, ValueError) as e:
        raise ApiError(400, "bad_base64", f"input {i}: not valid base64 ({e})") from None
    return _check_image(data, i, limits)


def _check_image(data: bytes, i: int, limits: Limits) -> bytes:
    from PIL import Image, UnidentifiedImageError

    if len(data) > limits.max_image_bytes:
        raise ApiError(413, "image_too_large",
                       f"input {i}: image is {len(data)} bytes; the limit is {limits.max_image_bytes}")
    if not data:
        raise ApiError(422, "not_an_image", f"input {i}: empty image")
    try:
        with Image.open(io.BytesIO(data)) as img:
            w, h = img.size
            if w * h > limits.max_image_pixels:
                raise ApiError(413, "image_too_large",
                               f"input {i}: image has {w}x{h} pixels; the limit is {limits.max_image_pixels}")
            img.verify()
    except ApiError:
        raise
    except (UnidentifiedImageError, OSError, SyntaxError, ValueError, Image.DecompressionBombError) as e:
        raise ApiError(422, "not_an_image", f"input {i}: not a readable image ({type(e).__name__})") from None
    return data


def _check_text(s: Any, i: int, limits: Limits) -> str:
    if not isinstance(s, str):
        raise ApiError(422, "invalid_input", f"input {i}: expected a string, got {type(s).__name__}")
    if len(s) > limits.max_text_chars:
        raise ApiError(413, "text_too_long", f"input {i}: text has {len(s)} characters; the limit is "
                                             f"{limits.max_text_chars}")
    return s


def _pyd_error(e: ValidationError) -> ApiError:
    first = e.errors()[0]
    loc = ".".join(str(x) for x in first.get("loc", ()))
    return ApiError(422, "invalid_request", f"{loc}: {first.get('msg')}" if loc else first.get("msg", "invalid"))


def _local_metrics_port() -> int | None:
    import ray

    try:
        node = ray.get_runtime_context().get_node_id()
        for n in ray.nodes():
            if n.get("NodeID") == node:
                return n.get("MetricsExportPort")
    except Exception:  # noqa: BLE001
        return None
    return None


# =============================================================================================
# ingress deployment
# (serve.ingress serialises the FastAPI app when the class is decorated: every module-level helper
#  the endpoints use must be defined ABOVE this point)
# =============================================================================================
@serve.deployment(name="Ingress")
@serve.ingress(api)
class Ingress:
    def __init__(self, config: dict, backbones: dict):
        self.cfg = AppConfig(**config)
        self.limits = self.cfg.limits
        self.handles = backbones  # name -> DeploymentHandle
        self.store = make_store(self.cfg.store)
        self._info: dict[str, dict] | None = None
        self._info_lock = asyncio.Lock()
        self._tasks: dict[str, dict] = {}  # task -> {"version", "meta", "num_params", "bytes"}
        self._scanned = 0.0
        self._scan_lock = threading.Lock()

    # -- backbones ------------------------------------------------------------------------------
    async def backbones(self) -> dict[str, dict]:
        if self._info is None:
            async with self._info_lock:
                if self._info is None:
                    infos = await asyncio.gather(*(h.info.remote() for h in self.handles.values()))
                    self._info = {i["name"]: i for i in infos}
        return self._info

    async def _backbone_for(self, fingerprint: str | None) -> str | None:
        for name, info in (await self.backbones()).items():
            if info["fingerprint"] == fingerprint:
                return name
        return None

    # -- auth -------------------------------------------------------------------------------------
    def _check(self, request: Request, env: str, what: str) -> None:
        want = os.environ.get(env, "")
        if not want:
            raise ApiError(403, "admin_disabled", f"{what} is disabled: no token configured (set ${env} "
                                                  "in the serving processes' environment)")
        got = request.headers.get("authorization", "")
        if not got:
            raise ApiError(401, "unauthorized", f"{what} needs 'Authorization: Bearer <token>'")
        scheme, _, tok = got.partition(" ")
        if scheme.lower() != "bearer" or not hmac.compare_digest(tok.strip().encode(), want.encode()):
            raise ApiError(403, "forbidden", f"invalid token for {what}")

    def _admin(self, request: Request) -> None:
        self._check(request, self.cfg.admin_token_env, "task administration")

    def _reader(self, request: Request) -> None:
        env = self.cfg.read_token_env
        if not env or not os.environ.get(env):
            return
        admin = os.environ.get(self.cfg.admin_token_env, "")
        tok = request.headers.get("authorization", "").partition(" ")[2].strip()
        if admin and tok and hmac.compare_digest(tok.encode(), admin.encode()):
            return
        self._check(request, env, "reading")

    # -- task listing (the store is the source of truth) -------------------------------------------
    def _scan(self, force: bool = False) -> dict[str, dict]:
        with self._scan_lock:
            if not force and time.monotonic() - self._scanned < self.cfg.task_cache_ttl_s:
                return self._tasks
            versions = self.store.versions()
            new = {}
            for tid, v in versions.items():
                cur = self._tasks.get(tid)
                if cur is not None and cur["version"] == v:
                    new[tid] = cur
                    continue
                try:
                    new[tid] = {"version": v, **read_meta_header(self.store, tid)}
                except Exception:  # noqa: BLE001 - vanished or unreadable file
                    continue
            self._tasks = new
            self._scanned = time.monotonic()
            return new

    async def _tasks_now(self, force: bool = False) -> dict[str, dict]:
        return await asyncio.to_thread(self._scan, force)

    async def _task_out(self, tid: str, t: dict) -> dict:
        m = t["meta"]
        return {"task_id": tid, "version": t["version"], "backbone": await self._backbone_for(m.get("base_fingerprint")),
                "base_model_id": m.get("base_model_id", ""), "base_fingerprint": m.get("base_fingerprint", ""),
                "mode": m.get("mode", ""), "labels": m.get("labels", []), "num_params": t["num_params"],
                "bytes": t["bytes"], "metrics": m.get("metrics", {}), "preprocessing": m.get("preprocessing", {}),
                "created": m.get("created")}

    async def _resolve(self, tid: str) -> tuple[str, str]:
        """(backbone, version) of a stored task; 404 if unknown, 409 if no backbone has its base."""
        tasks = await self._tasks_now()
        t = tasks.get(tid)
        if t is None:
            t = (await self._tasks_now(force=True)).get(tid)
        if t is None:
            raise ApiError(404, "unknown_task", f"unknown task {tid!r}")
        bb = await self._backbone_for(t["meta"].get("base_fingerprint"))
        if bb is None:
            raise ApiError(409, "no_backbone", f"task {tid!r} needs base {t['meta'].get('base_model_id')} "
                                               "which no backbone of this app serves")
        return bb, t["version"]

    # -- endpoints: meta ----------------------------------------------------------------------------
    @api.get("/healthz", summary="Liveness/readiness", tags=["ops"])
    async def healthz(self) -> dict:
        """`200 {"status": "ok", ...}` once every backbone deployment answered; `503` otherwise."""
        try:
            infos = await asyncio.wait_for(self.backbones(), timeout=10)
        except Exception as e:  # noqa: BLE001
            raise ApiError(503, "unavailable", f"backbones not ready: {e}") from None
        tasks = await self._tasks_now()
        return {"status": "ok", "backbones": {n: {k: i[k] for k in ("kind", "model_id", "fingerprint", "device")}
                                              for n, i in infos.items()}, "tasks": len(tasks)}

    @api.get("/v1/backbones", summary="Backbones of this app, with one replica's engine stats", tags=["ops"],
             responses=_ERRORS_READ)
    async def list_backbones(self, request: Request) -> dict:
        self._reader(request)
        infos = await self.backbones()
        stats = await asyncio.gather(*(self.handles[n].stats.remote() for n in infos))
        return {"backbones": [{**infos[n], "stats": s} for n, s in zip(infos, stats)]}

    @api.get("/metrics", summary="Prometheus metrics (grft_* of this node)", tags=["ops"],
             response_class=PlainTextResponse)
    async def metrics(self, all: bool = Query(False, description="all Ray metrics, not only grft_*")):
        """Proxies this node's Ray metrics endpoint. On a cluster, scrape each node's Ray metrics
        port (``ray_grft_*`` series) instead."""
        port = await asyncio.to_thread(_local_metrics_port)
        if not port:
            raise ApiError(503, "metrics_unavailable", "this node exports no Ray metrics port")
        import urllib.request

        def fetch():
            with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5) as r:
                return r.read().decode()
        try:
            text = await asyncio.to_thread(fetch)
        except Exception as e:  # noqa: BLE001
            raise ApiError(503, "metrics_unavailable", f"cannot read Ray metrics on port {port}: {e}") from None
        if not all:
            text = "\n".join(ln for ln in text.splitlines() if "grft_" in ln.split("{")[0]) + "\n"
        return PlainTextResponse(text, media_type="text/plain; version=0.0.4")

    # -- endpoints: tasks -----------------------------------------------------------------------------
    @api.post("/v1/tasks", status_code=201, response_model=TaskOut, summary="Register a task package",
              tags=["tasks"], responses={400: _ERR, 401: _ERR, 403: _ERR, 409: _ERR, 413: _ERR, 422: _ERR})
    async def register(self, request: Request,
                       file: UploadFile = File(description="a .grft.safetensors task package"),
                       replace: bool = Query(False, description="overwrite an existing task with the same id"),
                       replace_form: bool | None = Form(None, alias="replace",
                                                        description="same as the query flag")):
        """Validates the package against the backbone whose fingerprint it carries, then stores it
        atomically. `409` when the id exists (without `replace`) or no backbone serves its base; the
        validator's errors surface as `400` (not safetensors / pickle / truncated), `409` (fingerprint),
        `413` (too large) or `422` (metadata, shapes, indices, dtypes, non-finite values)."""
        self._admin(request)
        replace = bool(replace or replace_form)
        status = "error"
        try:
            out = await self._register(request, file, replace)
            status = "ok"
            return out
        finally:
            M.inc("grft_registrations", 1, {"op": "register", "status": status})

    async def _register(self, request: Request, file: UploadFile, replace: bool) -> dict:
        limit = self.limits.max_package_bytes
        data = await file.read(limit + 1)
        if len(data) > limit:
            raise ApiError(413, PackageTooLargeError.code, f"package is larger than the limit of {limit} bytes")
        try:
            meta = await asyncio.to_thread(peek_meta, data, limit)
        except PackageError as e:
            raise ApiError(e.status, e.code, e.message) from None
        bb = await self._backbone_for(meta.base_fingerprint)
        if bb is None:
            names = ", ".join(f"{n} ({i['model_id']}, {i['fingerprint']})" for n, i in (await self.backbones()).items())
            raise ApiError(409, "base_fingerprint_mismatch",
                           f"package was trained on base {meta.base_model_id} with fingerprint "
                           f"{meta.base_fingerprint}; no backbone of this app has it (serving: {names})")
        tid = meta.task_id
        exists = tid in await self._tasks_now(force=True)
        if exists and not replace:
            raise ApiError(409, "task_exists", f"task {tid!r} is already registered; pass replace=true to overwrite")
        res = await self.handles[bb].validate.remote(data)
        if not res["ok"]:
            raise ApiError(res["status"], res["code"], res["message"])
        try:
            version = await asyncio.to_thread(self.store.put, tid, data, replace)
        except TaskExistsError as e:
            raise ApiError(409, "task_exists", str(e.args[0] if e.args else e)) from None
        info = {"version": version, "meta": res["meta"], "num_params": res["num_params"], "bytes": len(data)}
        with self._scan_lock:
            self._tasks = {**self._tasks, tid: info}
        log.info("registered task %s version %s on backbone %s", tid, version, bb)
        return await self._task_out(tid, info)

    @api.get("/v1/tasks", response_model=TaskList, summary="List tasks", tags=["tasks"], responses=_ERRORS_READ)
    async def list_tasks(self, request: Request):
        self._reader(request)
        tasks = await self._tasks_now(force=True)
        return {"tasks": [await self._task_out(t, v) for t, v in sorted(tasks.items())]}

    @api.get("/v1/tasks/{task_id}", response_model=TaskOut, summary="One task's metadata", tags=["tasks"],
             responses={**_ERRORS_READ, 404: _ERR})
    async def get_task(self, task_id: str, request: Request):
        self._reader(request)
        t = (await self._tasks_now(force=True)).get(task_id)
        if t is None:
            raise ApiError(404, "unknown_task", f"unknown task {task_id!r}")
        return await self._task_out(task_id, t)

    @api.delete("/v1/tasks/{task_id}", summary="Delete a task", tags=["tasks"],
                responses={401: _ERR, 403: _ERR, 404: _ERR})
    async def delete_task(self, task_id: str, request: Request) -> dict:
        """Removes the package from the store; replicas stop answering for it at once (the ingress
        resolves every predict against the store) and free its memory at their next sync."""
        self._admin(request)
        try:
            await asyncio.to_thread(self.store.delete, task_id)
        except (TaskNotFoundError, ValueError):
            M.inc("grft_registrations", 1, {"op": "delete", "status": "error"})
            raise ApiError(404, "unknown_task", f"unknown task {task_id!r}") from None
        with self._scan_lock:
            self._tasks = {k: v for k, v in self._tasks.items() if k != task_id}
        M.inc("grft_registrations", 1, {"op": "delete", "status": "ok"})
        return {"deleted": task_id}

    # -- endpoints: predict ---------------------------------------------------------------------------
    @api.post("/v1/tasks/{task_id}/predict", response_model=PredictResponse, summary="Predict with one task",
              tags=["predict"], responses=_ERRORS_PREDICT, openapi_extra={"requestBody": {"required": True, "content": {
                  "application/json": {"schema": PredictRequest.model_json_schema()},
                  "multipart/form-data": {"schema": {"type": "object", "properties": {
                      "files": {"type": "array", "items": {"type": "string", "format": "binary"},
                                "description": "image files (image tasks) or UTF-8 text files"},
                      "top_k": {"type": "integer", "default": 5}}}}}}})
    async def predict_task(self, task_id: str, request: Request):
        """JSON `{"inputs": [...], "top_k": 5}` (texts, or base64 / data-URL images) or a multipart
        upload of image files (any field name). One answer per input, in order."""
        self._reader(request)
        bb, version = await self._resolve(task_id)
        kind = (await self.backbones())[bb]["kind"]
        ctype = request.headers.get("content-type", "")
        inputs: list[Any]
        if ctype.startswith("multipart/form-data"):
            inputs, top_k = await self._multipart_inputs(request, kind)
        else:
            try:
                body = await request.json()
            except Exception:  # noqa: BLE001
                raise ApiError(400, "bad_json", "request body is not valid JSON (or use multipart/form-data)") from None
            try:
                req = PredictRequest.model_validate(body)
            except ValidationError as e:
                raise _pyd_error(e) from None
            inputs, top_k = req.inputs, req.top_k
            self._check_count(len(inputs))
            inputs = [self._decode_input(kind, x, i) for i, x in enumerate(inputs)]
        top_k = self._check_top_k(top_k)
        items = [{"task": task_id, "version": version, "input": x, "top_k": top_k} for x in inputs]
        return {"predictions": await self._dispatch([bb] * len(items), items)}

    @api.post("/v1/predict", response_model=PredictResponse, summary="Predict a batch of items for many tasks",
              tags=["predict"], responses=_ERRORS_PREDICT)
    async def predict_many(self, body: BatchPredictRequest, request: Request):
        """`{"items": [{"task": id, "input": ...}, ...], "top_k": 5}`: items for different tasks (and
        backbones) are batched together with all concurrent traffic. All items are checked before any
        runs; one bad item rejects the request."""
        self._reader(request)
        self._check_count(len(body.items))
        top_k = self._check_top_k(body.top_k)
        bbs, items = [], []
        kinds = await self.backbones()
        for i, it in enumerate(body.items):
            try:
                bb, version = await self._resolve(it.task)
            except ApiError as e:
                raise ApiError(e.status, e.code, f"item {i}: {e.message}") from None
            bbs.append(bb)
            items.append({"task": it.task, "version": version, "input": self._decode_input(kinds[bb]["kind"], it.input, i),
                          "top_k": top_k})
        return {"predictions": await self._dispatch(bbs, items)}

    # -- predict helpers ---------------------------------------------------------------------------------
    def _check_count(self, n: int) -> None:
        if n == 0:
            raise ApiError(422, "no_inputs", "no inputs given")
        if n > self.limits.max_inputs_per_request:
            raise ApiError(413, "too_many_inputs",
                           f"{n} inputs in one request; the limit is {self.limits.max_inputs_per_request}")

    def _check_top_k(self, k: Any) -> int:
        try:
            k = int(k)
        except (TypeError, ValueError):
            raise ApiError(422, "invalid_request", f"top_k must be an integer, got {k!r}") from None
        if k < 1:
            raise ApiError(422, "invalid_request", "top_k must be >= 1")
        return min(k, self.limits.max_top_k)

    def _decode_input(self, kind: str, x: Any, i: int):
        if kind == "image":
            return _b64_image(x, i, self.limits)
        return _check_text(x, i, self.limits)

    async def _multipart_inputs(self, request: Request, kind: str) -> tuple[list, Any]:
        clen = request.headers.get("content-length")
        cap = self.limits.max_inputs_per_request * self.limits.max_image_bytes + (1 << 20)
        if clen and clen.isdigit() and int(clen) > cap:
            raise ApiError(413, "too_large", f"request body is {clen} bytes; the limit is {cap}")
        try:
            form = await request.form(max_files=self.limits.max_inputs_per_request + 1,
                                      max_fields=self.limits.max_inputs_per_request + 8)
        except Exception as e:  # noqa: BLE001 - starlette raises on malformed / too many parts
            msg = str(getattr(e, "detail", e))
            code = 413 if "maximum" in msg.lower() or "too many" in msg.lower() else 400
            raise ApiError(code, "too_many_inputs" if code == 413 else "bad_multipart",
                           f"cannot read the multipart body: {msg}") from None
        top_k: Any = 5
        inputs = []
        try:
            for key, v in form.multi_items():
                if key == "top_k" and isinstance(v, str):
                    top_k = v
                    continue
                if isinstance(v, str):
                    if kind == "text" and key in ("inputs", "input", "text", "texts"):
                        inputs.append(v)
                    continue
                data = await v.read(self.limits.max_image_bytes + 1)
                inputs.append(data if kind == "image" else data.decode("utf-8", errors="replace"))
        finally:
            await form.close()
        self._check_count(len(inputs))
        out = []
        for i, x in enumerate(inputs):
            out.append(_check_image(x, i, self.limits) if kind == "image" else _check_text(x, i, self.limits))
        return out, top_k

    async def _dispatch(self, bbs: list[str], items: list[dict]) -> list[dict]:
        res = await asyncio.gather(*(self.handles[b].predict.remote(it) for b, it in zip(bbs, items)))
        for i, r in enumerate(res):
            if "error" in r:
                e = r["error"]
                raise ApiError(e["status"], e["code"], f"item {i}: {e['message']}" if len(res) > 1 else e["message"])
        return res


# =============================================================================================
# application builder
# =============================================================================================
def build_app(args: dict) -> serve.Application:
    """Serve application builder: ``import_path: grft_serve.app:build_app`` with ``args`` = :class:`AppConfig`."""
    cfg = AppConfig.model_validate(dict(args or {}))
    names = [b.name for b in cfg.backbones]
    if len(set(names)) != len(names):
        raise ValueError(f"backbone names must be unique, got {names}")
    if not cfg.store.cls:  # replicas may run in another working directory: pin the path now
        cfg.store.path = str(Path(os.path.expandvars(cfg.store.path)).expanduser().resolve())
    store = cfg.store.model_dump()
    make_store(cfg.store)  # fail fast on a bad store path / class
    limits = cfg.limits.model_dump()
    handles = {}
    for b in cfg.backbones:
        handles[b.name] = BackboneServer.options(
            name=f"Backbone-{b.name}", num_replicas=b.replicas,
            max_ongoing_requests=b.max_ongoing_requests or max(4 * b.max_batch_size, 32),
            ray_actor_options={"num_cpus": b.num_cpus, "num_gpus": b.num_gpus},
        ).bind(b.model_dump(mode="json"), store, limits, cfg.sync_interval_s)
    return Ingress.options(
        num_replicas=cfg.ingress_replicas, max_ongoing_requests=cfg.ingress_max_ongoing_requests,
        ray_actor_options={"num_cpus": cfg.ingress_num_cpus},
    ).bind(cfg.model_dump(mode="json"), handles)


def app_from_config(path: str | os.PathLike, name: str | None = None) -> serve.Application:
    """Build the app from a Serve config file (its first application, or the one called ``name``)."""
    import yaml

    cfg = yaml.safe_load(Path(path).read_text()) or {}
    apps = cfg.get("applications") or [{"name": "grft", "args": cfg}]
    a = next((a for a in apps if name is None or a.get("name") == name), None)
    if a is None:
        raise ValueError(f"no application {name!r} in {path}")
    return build_app(a.get("args") or {})
