"""``grft-serve``: run the serving app locally and talk to a running one.

- ``grft-serve up deployments/local.yaml``: local Ray sized for a small machine, then the Serve config
  deployed exactly as ``serve run`` deploys it (``http_options`` incl. ``request_timeout_s``,
  ``proxy_location``, ``grpc_options``, ``logging_config``, each application's ``runtime_env`` and
  per-deployment overrides); blocks until Ctrl-C, then shuts down cleanly. A bare app config (the
  ``args`` of ``grft_serve.app:build_app``) is wrapped into a one-application Serve config.
- ``grft-serve register|tasks|predict|delete``: HTTP client commands (``--url`` / ``$GRFT_URL``;
  tokens from ``--token`` or ``$GRFT_ADMIN_TOKEN`` / ``$GRFT_READ_TOKEN``).
- ``grft-serve export``: one task merged into its base, as ONNX.
"""
from __future__ import annotations

import base64
import json
import os
import signal
import sys
import time
from pathlib import Path
from typing import List, Optional

import typer

__all__ = ["app", "main", "serve_config", "text_input"]

if not sys.stderr.isatty():  # logs, not a terminal: no progress frames from transformers / huggingface_hub
    os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")

app = typer.Typer(add_completion=False, no_args_is_help=True, rich_markup_mode="rich",
                  help="Serve many GRFT tasks from one frozen backbone (Ray Serve).")

DEFAULT_URL = "http://127.0.0.1:8000"
APP_IMPORT = "grft_serve.app:build_app"
QuietOpt = typer.Option(False, "--quiet", "-q", metavar="", help="print results and errors only")


def _fail(msg: str, code: int = 1):
    typer.echo(f"error: {msg}", err=True)
    raise typer.Exit(code)


# ---------------------------------------------------------------------------------------------
# up
# ---------------------------------------------------------------------------------------------
def _read_yaml(path: Path, what: str = "config file") -> dict:
    """A YAML (or JSON) mapping from ``path``; a clear CLI error otherwise."""
    from .core.files import ConfigFileError, read_yaml_mapping

    try:
        return read_yaml_mapping(path, what)
    except ConfigFileError as e:
        _fail(str(e))


def serve_config(raw: dict, host: str | None = None, port: int | None = None):
    """The :class:`ray.serve.schema.ServeDeploySchema` of a config file's mapping (a bare app config
    becomes one application ``grft`` at ``/``), with ``host``/``port`` overriding ``http_options``."""
    from pydantic import ValidationError
    from ray.serve.schema import ServeDeploySchema

    if "applications" not in raw:
        raw = {"applications": [{"name": "grft", "route_prefix": "/", "import_path": APP_IMPORT, "args": raw}]}
    raw = dict(raw)
    http = dict(raw.get("http_options") or {})
    http.setdefault("host", "127.0.0.1")
    if host:
        http["host"] = host
    if port:
        http["port"] = port
    raw["http_options"] = http
    try:
        return ServeDeploySchema.model_validate(raw)
    except ValidationError as e:
        _fail(f"invalid Serve config: {e}")


def _admin_tokens(schema, quiet: bool) -> None:
    """Say when an app's admin token variable is set neither here nor in its ``runtime_env.env_vars``
    (replicas of a local Ray inherit this process's environment): task administration is then
    disabled. A secret is never generated and printed (logs keep stdout)."""
    for a in schema.applications:
        if a.import_path != APP_IMPORT:
            continue
        env = (a.args or {}).get("admin_token_env", "GRFT_ADMIN_TOKEN")
        if os.environ.get(env) or env in ((a.runtime_env or {}).get("env_vars") or {}):
            continue
        typer.echo(f"${env} is not set: registering and deleting tasks is disabled (403) until it is set "
                   f"in the serving processes' environment", err=True)


def _wait_running(names: list[str], timeout_s: float) -> None:
    from ray import serve

    t0 = time.time()
    while True:
        apps = serve.status().applications
        states = {n: apps[n].status if n in apps else "NOT_STARTED" for n in names}
        failed = {n: apps[n].message for n, s in states.items() if s in ("DEPLOY_FAILED", "UNHEALTHY")}
        if failed:
            _fail("; ".join(f"application {n!r} failed: {m}" for n, m in failed.items()))
        if all(s == "RUNNING" for s in states.values()):
            return
        if time.time() - t0 > timeout_s:
            _fail(f"applications not running after {timeout_s:.0f} s: {states}")
        time.sleep(1.0)


@app.command()
def up(config: Path = typer.Argument(Path("deployments/local.yaml"), help="Serve config (YAML), as for `serve run`"),
       host: Optional[str] = typer.Option(None, help="HTTP host (default: config's http_options or 127.0.0.1)"),
       port: Optional[int] = typer.Option(None, help="HTTP port (default: config's http_options or 8000)"),
       num_cpus: int = typer.Option(2, help="CPUs for the local Ray instance"),
       num_gpus: Optional[int] = typer.Option(None, help="GPUs for the local Ray instance (default: detect)"),
       address: Optional[str] = typer.Option(None, help="join an existing Ray cluster instead of starting one"),
       wait_s: float = typer.Option(900, help="how long to wait for the applications to be running"),
       quiet: bool = QuietOpt):
    """Start a local Ray (no dashboard), deploy CONFIG like `serve run` does, print the URL, block
    until Ctrl-C."""
    schema = serve_config(_read_yaml(config), host, port)
    _admin_tokens(schema, quiet)
    os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
    from .app.proxy import CALLBACK

    os.environ.setdefault("RAY_SERVE_HTTP_PROXY_CALLBACK_IMPORT_PATH", CALLBACK)  # header cap in the proxy
    import ray
    from ray import serve
    from ray.serve._private import api as serve_api

    init = dict(include_dashboard=False, log_to_driver=not quiet)
    if address:
        ray.init(address=address, **init)
    else:
        ray.init(address="local", num_cpus=num_cpus, num_gpus=num_gpus, **init)  # a Ray of its own
    stop = {"flag": False}

    def _sig(*_):
        stop["flag"] = True
    signal.signal(signal.SIGTERM, _sig)
    try:
        # exactly what `serve run CONFIG` does: start Serve with the config's system options, then
        # hand the whole config (runtime_env, deployment overrides, args) to the controller
        client = serve_api.serve_start(http_options=schema.http_options.model_dump(),
                                       proxy_location=schema.proxy_location,
                                       grpc_options=schema.grpc_options.model_dump(),
                                       controller_options=getattr(schema, "controller_options", None))
        client.deploy_apps(schema, _blocking=False)
        _wait_running([a.name for a in schema.applications], wait_s)
        http = schema.http_options
        url = f"http://{http.host}:{http.port}"
        typer.echo(f"grft-serve is up at {url}  (docs: {url}/docs, health: {url}/healthz). Ctrl-C to stop.")
        while not stop["flag"]:
            time.sleep(0.5)
    except KeyboardInterrupt:
        pass
    finally:
        if not quiet:
            typer.echo("shutting down ...")
        try:
            serve.shutdown()
        finally:
            ray.shutdown()


# ---------------------------------------------------------------------------------------------
# client commands
# ---------------------------------------------------------------------------------------------
UrlOpt = typer.Option(None, "--url", help=f"app URL (default: $GRFT_URL or {DEFAULT_URL})")
TokOpt = typer.Option(None, "--token", help="bearer token (default: $GRFT_ADMIN_TOKEN / $GRFT_READ_TOKEN)")
JsonOpt = typer.Option(False, "--json", metavar="", help="print the raw JSON answer")
# what to do about an error code, in this CLI's terms (the server speaks of request parameters)
_CODE_HINTS = {"task_exists": "add --replace to overwrite it"}


def _url(url: Optional[str]) -> str:
    return (url or os.environ.get("GRFT_URL") or DEFAULT_URL).rstrip("/")


def _headers(token: Optional[str], admin: bool) -> dict:
    tok = token or os.environ.get("GRFT_ADMIN_TOKEN" if admin else "GRFT_READ_TOKEN") \
        or (os.environ.get("GRFT_ADMIN_TOKEN") if not admin else None)
    return {"Authorization": f"Bearer {tok}"} if tok else {}


def _call(method: str, url: str, **kw):
    import requests

    try:
        r = requests.request(method, url, timeout=kw.pop("timeout", 120), **kw)
    except requests.ConnectionError:
        _fail(f"cannot reach {url} (is the app running? see `grft-serve up`)")
    except requests.RequestException as e:
        _fail(f"request to {url} failed: {e}")
    try:
        body = r.json()
    except ValueError:
        body = None
    if r.status_code >= 400:
        err = (body or {}).get("error") if isinstance(body, dict) else None
        if isinstance(err, dict):
            code, text = err.get("code"), str(err.get("message"))
            if code in _CODE_HINTS:
                text = f"{text.split(';')[0]}; {_CODE_HINTS[code]}"
            msg = f"{text} [{code}]"
        else:
            msg = r.text[:500] or r.reason
        _fail(f"HTTP {r.status_code}: {msg}")
    return body


def _params(t: dict) -> str:
    """'N backbone params changed (+ H head = T trainable)': the package's changed backbone values
    and biases, and the training's trainable count (which also counts the new head)."""
    out = f"{t['num_params']:,} backbone params changed"
    m = t.get("metrics") or {}
    if m.get("head_params") is not None:
        out += f" (+ {m['head_params']:,} head = {t['num_params'] + m['head_params']:,} trained)"
    return out


@app.command()
def register(package: Path = typer.Argument(..., help="a .grft.safetensors task package"),
             url: Optional[str] = UrlOpt, token: Optional[str] = TokOpt,
             replace: bool = typer.Option(False, "--replace", metavar="",
                                          help="overwrite a task with the same id (a flag, takes no value)"),
             quiet: bool = QuietOpt):
    """Upload a task package (needs the admin token)."""
    if not package.is_file():
        _fail(f"package not found: {package}")
    with open(package, "rb") as f:
        body = _call("POST", f"{_url(url)}/v1/tasks", params={"replace": "true"} if replace else None,
                     files={"file": (package.name, f, "application/octet-stream")}, headers=_headers(token, True))
    if quiet:
        typer.echo(f"{body['task_id']} {body['version']}")
        return
    typer.echo(f"registered {body['task_id']} version {body['version']} on backbone {body['backbone']} "
               f"({len(body['labels'])} labels, {_params(body)})")


@app.command()
def tasks(url: Optional[str] = UrlOpt, token: Optional[str] = TokOpt, as_json: bool = JsonOpt):
    """List the registered tasks ("backbone params changed": rows/columns and biases the task writes
    into the base; the head is counted apart)."""
    body = _call("GET", f"{_url(url)}/v1/tasks", params={"limit": 1000}, headers=_headers(token, False))
    while body.get("next"):  # the listing is paged
        more = _call("GET", f"{_url(url)}/v1/tasks", params={"limit": 1000, "after": body["next"]},
                     headers=_headers(token, False))
        body = {"tasks": body["tasks"] + more["tasks"], "broken": body["broken"] + more["broken"],
                "next": more.get("next")}
    if as_json:
        typer.echo(json.dumps(body, indent=2))
        return
    if not body["tasks"]:
        typer.echo("no tasks")
        return
    from rich.console import Console
    from rich.table import Table

    table = Table("task", "version", "backbone", "mode", "labels", "backbone params changed", "head params")
    for t in body["tasks"]:
        head = (t.get("metrics") or {}).get("head_params")
        table.add_row(t["task_id"], t["version"], t.get("backbone") or "-", t.get("mode", ""),
                      str(len(t.get("labels", []))), f"{t['num_params']:,}", f"{head:,}" if head is not None else "-")
    Console(width=160).print(table)


@app.command()
def delete(task: str, url: Optional[str] = UrlOpt, token: Optional[str] = TokOpt, quiet: bool = QuietOpt):
    """Delete a task (needs the admin token)."""
    _call("DELETE", f"{_url(url)}/v1/tasks/{task}", headers=_headers(token, True))
    if not quiet:
        typer.echo(f"deleted {task}")


def text_input(task: str, x: str) -> str:
    """A text task's input: an existing file's UTF-8 content, else the argument itself."""
    p = Path(x)
    if not p.is_file():
        return x
    try:
        return p.read_text(encoding="utf-8")
    except UnicodeDecodeError:
        _fail(f"task {task!r} takes text; {x} is a file but not UTF-8 text (pass the text itself, or a text file)")
    except OSError as e:
        _fail(f"cannot read {x}: {e}")


@app.command()
def predict(task: str, inputs: List[str] = typer.Argument(..., help="image files (image tasks); texts or "
                                                                  "UTF-8 text files (text tasks)"),
            url: Optional[str] = UrlOpt, token: Optional[str] = TokOpt,
            top_k: int = typer.Option(3, "--top-k"), as_json: bool = JsonOpt):
    """Predict with one task. Image tasks: each input is an image file, uploaded base64. Text tasks:
    an input naming an existing file sends that file's text, anything else is sent as written."""
    base = _url(url)
    headers = _headers(token, False)
    info = _call("GET", f"{base}/v1/tasks/{task}", headers=headers)
    kind = (info.get("preprocessing") or {}).get("kind")
    payload = []
    for x in inputs:
        if kind == "text":
            payload.append(text_input(task, x))
            continue
        p = Path(x)
        if kind == "image" or p.is_file():
            if not p.is_file():
                _fail(f"task {task!r} takes images; file not found: {x}")
            payload.append(base64.b64encode(p.read_bytes()).decode())
        else:
            payload.append(x)
    body = _call("POST", f"{base}/v1/tasks/{task}/predict", json={"inputs": payload, "top_k": top_k},
                 headers=headers)
    if as_json:
        typer.echo(json.dumps(body, indent=2))
        return
    for x, p in zip(inputs, body["predictions"]):
        alts = ", ".join(f"{t['label']} {t['score']:.3f}" for t in p["top_k"][1:])
        typer.echo(f"{x}: {p['label']} ({p['score']:.3f})" + (f"  [{alts}]" if alts else "") + f"  v{p['version']}")


@app.command()
def export(package: Path = typer.Argument(..., help="a .grft.safetensors task package"),
           out: Path = typer.Option(..., help="ONNX file to write"),
           backbone: Optional[str] = typer.Option(
               None, help="the base: 'zoo:NAME', 'timm:NAME' (random init), 'hf:DIR', or a YAML/JSON file with "
                          "the backbone config (a grft-train run file works); default: the base recorded in "
                          "the package's training config"),
           seed: int = typer.Option(0, help="torch seed of a random-init base (grft-train builds them under 0)"),
           opset: int = typer.Option(18, help="ONNX opset"),
           quiet: bool = QuietOpt):
    """Merge one task into its base and export it to ONNX, checked with onnxruntime; the ONNX
    metadata carries the task's labels, preprocessing and version."""
    import torch

    from .core.backbones import BackboneError, load_backbone
    from .export import export_onnx
    from .core.package import PackageError

    cfg = _backbone_spec(backbone) if backbone else _package_backbone(package)
    try:
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed)
            bb = load_backbone(cfg)
        res = export_onnx(bb, package, out, opset=opset)
    except (BackboneError, PackageError, FileNotFoundError, ValueError, RuntimeError) as e:
        _fail(str(e))
    if quiet:
        res = {k: res[k] for k in ("path", "max_abs_diff")}
    typer.echo(json.dumps(res))


def _backbone_spec(text: str) -> dict:
    kind, _, rest = text.partition(":")
    if kind == "zoo" and rest:
        return {"type": "zoo", "name": rest}
    if kind == "timm" and rest:
        return {"type": "timm", "name": rest, "weights": "random"}
    if kind == "hf" and rest:
        return {"type": "hf", "path": rest}
    cfg = _read_yaml(Path(text), "--backbone (zoo:NAME, timm:NAME, hf:DIR or a config file)")
    return cfg.get("backbone", cfg)


def _package_backbone(package: Path) -> dict:
    """The backbone config recorded in a package's training config."""
    from .core.package import PackageError, peek_meta

    if not package.is_file():
        _fail(f"package not found: {package}")
    try:
        meta = peek_meta(package)
    except PackageError as e:
        _fail(str(e))
    bb = (meta.training_config or {}).get("backbone")
    if not bb:
        _fail(f"{package} records no backbone config (not written by `grft-train fit`): pass --backbone")
    return bb


def main() -> None:  # pragma: no cover
    app()


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
