"""``grft-serve``: run the serving app locally and talk to a running one.

- ``grft-serve up deployments/local.yaml``: local Ray sized for a small machine, the app from a Serve
  config file, blocks until Ctrl-C, then shuts down cleanly.
- ``grft-serve register|tasks|predict|delete``: HTTP client commands (``--url`` / ``$GRFT_URL``;
  tokens from ``--token`` or ``$GRFT_ADMIN_TOKEN`` / ``$GRFT_READ_TOKEN``).
"""
from __future__ import annotations

import base64
import json
import os
import secrets
import signal
import sys
import time
from pathlib import Path
from typing import List, Optional

import typer

app = typer.Typer(add_completion=False, no_args_is_help=True,
                  help="Serve many GRFT tasks from one frozen backbone (Ray Serve).")

DEFAULT_URL = "http://127.0.0.1:8000"


def _fail(msg: str, code: int = 1):
    typer.echo(f"error: {msg}", err=True)
    raise typer.Exit(code)


# ---------------------------------------------------------------------------------------------
# up
# ---------------------------------------------------------------------------------------------
def _read_yaml(path: Path, what: str = "config file") -> dict:
    """A YAML (or JSON) mapping from ``path``; a clear CLI error otherwise."""
    import yaml

    if not path.is_file():
        _fail(f"{what} not found: {path}")
    try:
        cfg = yaml.safe_load(path.read_text()) or {}
    except yaml.YAMLError as e:
        _fail(f"cannot parse {path}: {e}")
    if not isinstance(cfg, dict):
        _fail(f"{path}: the top level must be a mapping")
    return cfg


def _load_serve_config(path: Path) -> dict:
    cfg = _read_yaml(path)
    if "applications" not in cfg:  # a bare AppConfig (args of build_app)
        cfg = {"applications": [{"name": "grft", "route_prefix": "/", "import_path": "grft_serve.app:build_app",
                                 "args": cfg}]}
    return cfg


def _import(path: str):
    import importlib

    mod, _, attr = path.partition(":") if ":" in path else path.rpartition(".")
    obj = importlib.import_module(mod)
    for a in attr.split("."):
        obj = getattr(obj, a)
    return obj


@app.command()
def up(config: Path = typer.Argument(Path("deployments/local.yaml"), help="Ray Serve config (YAML)"),
       host: Optional[str] = typer.Option(None, help="HTTP host (default: config's http_options or 127.0.0.1)"),
       port: Optional[int] = typer.Option(None, help="HTTP port (default: config's http_options or 8000)"),
       num_cpus: int = typer.Option(2, help="CPUs for the local Ray instance"),
       num_gpus: Optional[int] = typer.Option(None, help="GPUs for the local Ray instance (default: detect)"),
       address: Optional[str] = typer.Option(None, help="join an existing Ray cluster instead of starting one")):
    """Start a local Ray (no dashboard), run the app(s) of CONFIG, print the URL, block until Ctrl-C."""
    cfg = _load_serve_config(config)
    http = dict(cfg.get("http_options") or {})
    http["host"] = host or http.get("host", "127.0.0.1")
    http["port"] = port or http.get("port", 8000)
    for a in cfg["applications"]:
        env = (a.get("args") or {}).get("admin_token_env", "GRFT_ADMIN_TOKEN")
        if not os.environ.get(env):
            os.environ[env] = secrets.token_urlsafe(24)
            typer.echo(f"${env} was not set; generated an admin token for this run: {os.environ[env]}")
    os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
    import ray
    from ray import serve

    if address:
        ray.init(address=address)
    else:
        ray.init(num_cpus=num_cpus, num_gpus=num_gpus, include_dashboard=False)
    stop = {"flag": False}

    def _sig(*_):
        stop["flag"] = True
    signal.signal(signal.SIGTERM, _sig)
    try:
        serve.start(http_options={k: v for k, v in http.items() if k in ("host", "port", "root_path")})
        for a in cfg["applications"]:
            target = _import(a["import_path"])
            built = target(a.get("args") or {}) if callable(target) and not isinstance(target, serve.Application) \
                else target
            serve.run(built, name=a.get("name", "default"), route_prefix=a.get("route_prefix", "/"))
        url = f"http://{http['host']}:{http['port']}"
        typer.echo(f"grft-serve is up at {url}  (docs: {url}/docs, health: {url}/healthz). Ctrl-C to stop.")
        while not stop["flag"]:
            time.sleep(0.5)
    except KeyboardInterrupt:
        pass
    finally:
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
        msg = f"{err.get('message')} [{err.get('code')}]" if err else (r.text[:500] or r.reason)
        _fail(f"HTTP {r.status_code}: {msg}")
    return body


@app.command()
def register(package: Path = typer.Argument(..., help="a .grft.safetensors task package"),
             url: Optional[str] = UrlOpt, token: Optional[str] = TokOpt,
             replace: bool = typer.Option(False, "--replace", help="overwrite a task with the same id")):
    """Upload a task package (needs the admin token)."""
    if not package.is_file():
        _fail(f"package not found: {package}")
    with open(package, "rb") as f:
        body = _call("POST", f"{_url(url)}/v1/tasks", params={"replace": "true"} if replace else None,
                     files={"file": (package.name, f, "application/octet-stream")}, headers=_headers(token, True))
    typer.echo(f"registered {body['task_id']} version {body['version']} on backbone {body['backbone']} "
               f"({len(body['labels'])} labels, {body['num_params']} params)")


@app.command()
def tasks(url: Optional[str] = UrlOpt, token: Optional[str] = TokOpt,
          as_json: bool = typer.Option(False, "--json", help="print the raw JSON")):
    """List the registered tasks."""
    body = _call("GET", f"{_url(url)}/v1/tasks", headers=_headers(token, False))
    if as_json:
        typer.echo(json.dumps(body, indent=2))
        return
    if not body["tasks"]:
        typer.echo("no tasks")
    for t in body["tasks"]:
        typer.echo(f"{t['task_id']:<32} {t['version']}  {t['backbone'] or '-':<16} {t['mode']:<6} "
                   f"{len(t['labels'])} labels  {t['num_params']} params")


@app.command()
def delete(task: str, url: Optional[str] = UrlOpt, token: Optional[str] = TokOpt):
    """Delete a task (needs the admin token)."""
    _call("DELETE", f"{_url(url)}/v1/tasks/{task}", headers=_headers(token, True))
    typer.echo(f"deleted {task}")


@app.command()
def predict(task: str, inputs: List[str] = typer.Argument(..., help="image files (image tasks) or texts"),
            url: Optional[str] = UrlOpt, token: Optional[str] = TokOpt,
            top_k: int = typer.Option(3, "--top-k"),
            as_json: bool = typer.Option(False, "--json", help="print the raw JSON")):
    """Predict with one task: image paths are uploaded base64, anything else is sent as text."""
    base = _url(url)
    headers = _headers(token, False)
    info = _call("GET", f"{base}/v1/tasks/{task}", headers=headers)
    kind = (info.get("preprocessing") or {}).get("kind")
    payload = []
    for x in inputs:
        p = Path(x)
        if kind == "image" or (kind != "text" and p.is_file()):
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
           backbone: str = typer.Option(..., help="the base: 'zoo:NAME', 'timm:NAME', 'hf:DIR', or a YAML/JSON "
                                                 "file with the backbone config (a grft-train run file works)"),
           out: Path = typer.Option(..., help="ONNX file to write"),
           seed: Optional[int] = typer.Option(None, help="torch seed before building (random-init bases)"),
           opset: int = typer.Option(18, help="ONNX opset")):
    """Merge one task into its base and export it to ONNX, checked with onnxruntime."""
    import torch

    from .backbones import BackboneError, load_backbone
    from .export import export_onnx
    from .package import PackageError

    cfg = _backbone_spec(backbone)
    if seed is not None:
        torch.manual_seed(seed)
    try:
        bb = load_backbone(cfg)
        res = export_onnx(bb, package, out, opset=opset)
    except (BackboneError, PackageError, FileNotFoundError, ValueError, RuntimeError) as e:
        _fail(str(e))
    typer.echo(json.dumps(res))


def _backbone_spec(text: str) -> dict:
    kind, _, rest = text.partition(":")
    if kind in ("zoo", "timm") and rest:
        return {"type": kind, "name": rest}
    if kind == "hf" and rest:
        return {"type": "hf", "path": rest}
    cfg = _read_yaml(Path(text), "--backbone (zoo:NAME, timm:NAME, hf:DIR or a config file)")
    return cfg.get("backbone", cfg)


def main() -> None:  # pragma: no cover
    app()


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
