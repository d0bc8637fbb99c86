"""End-to-end HTTP load test: grft-serve versus a plain one-model Ray Serve app, measured in one run.

Both apps run in ONE Ray instance on 127.0.0.1 and are driven by the same closed-loop HTTP load
(:mod:`bench.http_load`: ``--clients`` threads, a warm-up, then a ``--seconds`` window) giving, per
(system, scenario), ``inputs_per_s``, ``p50_ms``/``p99_ms`` and ``errors`` (``errors_total``:
including warm-up and drain).

What is compared:

- ``plain`` (:mod:`bench.plain_app`): what a user gets by deploying ONE fine-tuned task as an
  ordinary model with Ray Serve: one deployment with a FastAPI ingress, each request decoded (base64
  PNG → PIL → the timm eval transform of the task package's ``preprocessing``, as grft-serve does)
  and run as ONE forward through the task merged into the backbone, then a linear head and top-k.
- ``grft``: grft-serve built with ``grft_serve.app.build_app`` from the same backbone settings, with
  ``--tasks`` packages (default 16) registered over HTTP.

Both get the same replica count, ``num_cpus``/``num_gpus``, device, dtype and torch threads (the
backbone entry of the app config; grft-serve additionally runs its ingress deployment). Scenarios:
``single`` (1 input per request, one task), ``batch`` (16 inputs, one task:
``POST /v1/tasks/{id}/predict``) and ``mixed`` (16 inputs spread over 16 tasks: ``POST
/v1/predict``; a plain app serves one task, so its baseline is the plain ``batch`` figure, i.e.
the same request size as one forward). Every grft figure is also given as a ratio to the plain one:
``ratio_inputs_per_s`` = grft / plain (higher is better), ``ratio_p50``/``ratio_p99`` = grft / plain
latency (lower is better); with ``--rounds R`` every (plain, grft) pair of windows is repeated R times
and each ratio is the median of the R per-round ratios (pairs are adjacent in time, so drifting load
from other processes cancels better). Before timing, the answers of both apps to the same 16 images are
compared (``agree`` = fraction of equal top labels; the plain model IS task 0).

Defaults: deployments/local.yaml's EfficientNet-Lite0 (zoo, offline) at the demo's 64 px
Fashion-MNIST preprocessing, Fashion-MNIST test PNGs (random PNGs when the dataset is missing),
random GRFT packages (k=2 rows per module, 10 labels), 8 clients, 3 s warm-up + 15 s windows.

    python -m bench.serve                          # CPU defaults (~3 min)
    python -m bench.serve --smoke                  # tiny random ViT (deployments/tiny.yaml), short windows
    python -m bench.serve --config deployments/gpu.yaml --clients 32 --out gpu.jsonl
"""

import argparse
import base64
import io
import json
import math
import os
import secrets
import shutil
import sys
import tempfile
import time
from pathlib import Path
from typing import Sequence

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")

ROOT = Path(__file__).resolve().parent.parent
if __package__ in (None, ""):  # run as `python bench/serve.py`: make the repo root importable
    sys.path.insert(0, str(ROOT))

import numpy as np  # noqa: E402
import torch  # noqa: E402
from ray import serve  # noqa: E402

from bench.http_load import free_port, run_window, summarise, wait_healthy  # noqa: E402
from bench.plain_app import PlainModel  # noqa: E402
from bench.records import Records  # noqa: E402

__all__ = ["main", "parse_args"]

SCENARIOS = ("single", "batch", "mixed")
BASELINE = {"single": "single", "batch": "batch", "mixed": "batch"}  # the plain scenario each grft one is compared to


# ---------------------------------------------------------------------------------------------
# setup: config, packages, images
# ---------------------------------------------------------------------------------------------
def load_app_config(path: Path, backbone: str | None) -> tuple[dict, dict]:
    """The app ``args`` of a deployments/*.yaml file reduced to ONE backbone (``backbone`` or the first)."""
    import yaml

    if not path.is_file():
        raise SystemExit(f"bench/serve.py: config file not found: {path}")
    raw = yaml.safe_load(path.read_text()) or {}
    apps = raw.get("applications") if isinstance(raw, dict) else None
    args = dict((apps[0].get("args") or {}) if apps else raw)
    entries = args.get("backbones") or []
    pick = [b for b in entries if backbone is None or b.get("name") == backbone]
    if not pick:
        raise SystemExit(f"bench/serve.py: {path} has no backbone {backbone!r} "
                         f"(backbones: {[b.get('name') for b in entries]})")
    args["backbones"] = [pick[0]]
    return args, pick[0]


def make_packages(spec: dict, n: int, input_size: int | None, k: int) -> tuple[list[bytes], dict]:
    """``n`` random GRFT packages (``k`` rows per module, 10 labels) for the backbone of ``spec``."""
    from grft_serve.core.backbones import load_backbone
    from grft_serve.core.package import package_bytes
    from grft_serve.testing import random_package

    if spec.get("seed") is not None:
        torch.manual_seed(int(spec["seed"]))
    bb = load_backbone(spec["backbone"])
    if bb.kind != "image":
        raise SystemExit(f"bench/serve.py: backbone {spec.get('name')!r} is a {bb.kind} backbone; "
                         "the requests carry PNG images (pick an image backbone with --backbone)")
    prep = bb.preprocessing_meta(input_size=input_size or None)
    pkgs = [package_bytes(random_package(bb, f"bench-{i:02d}", k=k, n_labels=10, seed=i, preprocessing=prep))
            for i in range(n)]
    return pkgs, {"model": bb.model_id, "preprocessing": prep}


def make_images(n: int, smoke: bool) -> tuple[list[str], str]:
    """``n`` base64 PNGs: Fashion-MNIST test images (RGB, as the demo sends them), else random ones."""
    from PIL import Image

    arrays, source = None, "random"
    if not smoke:
        from grft_train.data import fashion_mnist_dir, read_idx

        d = fashion_mnist_dir()
        f = next((d / x for x in ("t10k-images-idx3-ubyte.gz", "t10k-images-idx3-ubyte")
                  if d is not None and (d / x).is_file()), None)
        if f is not None:
            arrays, source = read_idx(f)[:n], "fashion-mnist-t10k"
    if arrays is None:
        g = np.random.default_rng(0)
        arrays = g.integers(0, 256, size=(n, 36, 40, 3) if smoke else (n, 28, 28), dtype=np.uint8)
    out = []
    for a in arrays:
        buf = io.BytesIO()
        Image.fromarray(np.ascontiguousarray(a)).convert("RGB").save(buf, format="PNG")
        out.append(base64.b64encode(buf.getvalue()).decode())
    return out, source


def _bodies(scenario: str, images: list[str], tasks: list[str], batch: int, n: int = 32) -> list[bytes]:
    out = []
    for j in range(n):
        xs = [images[(j * batch + i) % len(images)] for i in range(1 if scenario == "single" else batch)]
        if scenario == "mixed":
            body = {"items": [{"task": tasks[(j * batch + i) % len(tasks)], "input": x} for i, x in enumerate(xs)],
                    "top_k": 5}
        else:
            body = {"inputs": xs, "top_k": 5}
        out.append(json.dumps(body).encode())
    return out


# ---------------------------------------------------------------------------------------------
# run
# ---------------------------------------------------------------------------------------------
def start_apps(args: argparse.Namespace, app_args: dict, spec: dict, packages: list[bytes],
               store: str) -> tuple[str, dict]:
    """ONE local Ray, grft-serve at ``/`` and the plain app at ``/plain``; register the packages."""
    import ray
    import requests

    from grft_serve.app import build_app

    token_env = app_args.get("admin_token_env") or "GRFT_ADMIN_TOKEN"
    os.environ[token_env] = token = secrets.token_hex(16)  # replicas inherit the driver's environment
    os.environ["PYTHONPATH"] = os.pathsep.join([str(ROOT), *filter(None, [os.environ.get("PYTHONPATH")])])
    limits = dict(app_args.get("limits") or {})
    limits["max_inputs_per_request"] = max(int(limits.get("max_inputs_per_request", 64)), args.batch)
    app_args.update(store={"path": store}, admin_token_env=token_env, read_token_env=None, limits=limits)
    need = spec.get("replicas", 1) * 2 * spec.get("num_cpus", 0.5) + app_args.get("ingress_replicas", 1) * \
        app_args.get("ingress_num_cpus", 0.1)
    ray.init(address="local", num_cpus=args.num_cpus or max(2, math.ceil(need)), include_dashboard=False,
             log_to_driver=False, configure_logging=False)
    port = free_port()
    serve.start(http_options={"host": "127.0.0.1", "port": port})
    url = f"http://127.0.0.1:{port}"
    mb = int(spec.get("max_batch_size", 16))
    plain = PlainModel.options(
        num_replicas=int(spec.get("replicas", 1)),
        max_ongoing_requests=spec.get("max_ongoing_requests") or max(4 * mb, 32),
        ray_actor_options={"num_cpus": spec.get("num_cpus", 0.5), "num_gpus": spec.get("num_gpus", 0.0)},
    ).bind(spec, packages[0])
    t = time.perf_counter()
    serve.run(plain, name="plain", route_prefix="/plain")
    serve.run(build_app(app_args), name="grft", route_prefix="/")
    plain_info = wait_healthy(f"{url}/plain/healthz")
    wait_healthy(f"{url}/healthz")
    print(f"[bench] both apps up in {time.perf_counter() - t:.0f} s at {url}", file=sys.stderr)
    t = time.perf_counter()
    for data in packages:
        r = requests.post(f"{url}/v1/tasks", params={"replace": "true"}, headers={"Authorization": f"Bearer {token}"},
                          files={"file": ("task.grft.safetensors", data)}, timeout=300)
        if r.status_code != 201:
            raise RuntimeError(f"registering a package failed: HTTP {r.status_code} {r.text[:500]}")
    print(f"[bench] {len(packages)} tasks registered in {time.perf_counter() - t:.0f} s", file=sys.stderr)
    return url, plain_info


def check_answers(url: str, images: list[str], tasks: list[str], batch: int) -> float:
    """Fraction of equal top labels of plain and grft (task 0) on the same inputs; mixed answers checked."""
    import requests

    xs = images[:batch]
    want = [tasks[i % len(tasks)] for i in range(len(xs))]
    a = requests.post(f"{url}/plain/predict", json={"inputs": xs, "top_k": 1}, timeout=300)
    b = requests.post(f"{url}/v1/tasks/{tasks[0]}/predict", json={"inputs": xs, "top_k": 1}, timeout=300)
    m = requests.post(f"{url}/v1/predict", json={"items": [{"task": t, "input": x} for t, x in zip(want, xs)],
                                                 "top_k": 1}, timeout=300)
    for r in (a, b, m):
        if r.status_code != 200:
            raise RuntimeError(f"{r.url}: HTTP {r.status_code} {r.text[:500]}")
    mixed = m.json()["predictions"]
    if [p["task"] for p in mixed] != want or not all(p.get("version") for p in mixed):
        raise RuntimeError("grft-serve's mixed answers do not name the requested tasks and their versions")
    return sum(p["label"] == q["label"] for p, q in zip(a.json()["predictions"], b.json()["predictions"])) / len(xs)


def measure(url: str, args: argparse.Namespace, images: list[str], tasks: list[str]) -> dict:
    """``--rounds`` rounds; in each, every scenario's plain baseline window, then its grft window (so
    each grft window has a plain one right before it). ``{(system, scenario): [raw window, ...]}``."""
    plain_needed = {BASELINE[s] for s in args.only}
    runs: dict[tuple[str, str], list[dict]] = {}
    for _ in range(args.rounds):
        for sc in SCENARIOS:
            n = 1 if sc == "single" else args.batch
            for system in ("plain", "grft"):
                if sc not in (plain_needed if system == "plain" else args.only):
                    continue
                path = ("/plain/predict" if system == "plain" else "/v1/predict" if sc == "mixed"
                        else f"/v1/tasks/{tasks[0]}/predict")
                load = os.getloadavg()[0]
                raw = run_window(url + path, _bodies(sc, images, tasks, args.batch), n, args.clients, args.warmup,
                                 args.seconds, args.max_requests, args.timeout)
                runs.setdefault((system, sc), []).append({**raw, "loadavg_1m": load})
    return runs


def make_records(runs: dict, common: dict, n_tasks: int) -> list[dict]:
    """One record per (system, scenario); grft ratios are the median over rounds of grft / plain."""
    out = []
    for (system, sc), windows in runs.items():  # plain baseline before the grft figures
        n = windows[0]["n_inputs"]
        rec = {**common, "system": system, "scenario": sc, "inputs_per_request": n,
               "tasks_per_request": min(n, n_tasks) if sc == "mixed" else 1, "rounds": len(windows),
               "loadavg_1m": float(np.mean([w["loadavg_1m"] for w in windows])), **summarise(windows)}
        if system == "grft":
            pairs = [(summarise([g]), summarise([p])) for g, p in zip(windows, runs[("plain", BASELINE[sc])])]

            def ratio(key: str, pairs: list = pairs) -> float | None:
                vals = [g[key] / p[key] for g, p in pairs if p[key]]
                return float(np.median(vals)) if vals else None
            rec.update(baseline=f"plain/{BASELINE[sc]}", ratio_inputs_per_s=ratio("inputs_per_s"),
                       ratio_p50=ratio("p50_ms"), ratio_p99=ratio("p99_ms"))
        out.append(rec)
    return out


def main(argv: Sequence[str] | None = None) -> list[dict]:
    args = parse_args(argv)
    from rich.console import Console

    app_args, spec = load_app_config(Path(args.config), args.backbone)
    torch.set_num_threads(max(int(spec.get("torch_threads") or 1), 1))
    t_setup = time.perf_counter()
    packages, facts = make_packages(spec, args.tasks, args.input_size, args.k)
    tasks = [f"bench-{i:02d}" for i in range(args.tasks)]
    images, source = make_images(max(64, 2 * args.batch), args.smoke)
    out = Records(args.out)
    import ray

    store = tempfile.mkdtemp(prefix="grft-bench-store-")
    try:
        url, plain_info = start_apps(args, app_args, spec, packages, store)
        agree = check_answers(url, images, tasks, args.batch)
        common = {"bench": "serve", "model": facts["model"], "backbone": spec.get("name"),
                  "input_size": facts["preprocessing"]["timm_data_config"]["input_size"][-1],
                  "device": plain_info["device"], "dtype": plain_info["dtype"], "replicas": spec.get("replicas", 1),
                  "num_cpus": spec.get("num_cpus", 0.5), "torch_threads": spec.get("torch_threads", 1),
                  "max_batch_size": spec.get("max_batch_size"),
                  "batch_wait_timeout_s": spec.get("batch_wait_timeout_s"),
                  "clients": args.clients, "seconds": args.seconds, "warmup_s": args.warmup, "images": source,
                  "tasks_registered": len(tasks), "k": args.k, "agree": agree}
        print(f"[bench] setup {time.perf_counter() - t_setup:.0f} s; plain vs grft top-1 agreement on task 0: "
              f"{agree:.3f}", file=sys.stderr)
        for rec in make_records(measure(url, args, images, tasks), common, len(tasks)):
            out.emit(rec)
    finally:
        out.close()
        if ray.is_initialized():
            serve.shutdown()
            ray.shutdown()
        shutil.rmtree(store, ignore_errors=True)
    err = not out.to_file
    render_table(out.items, Console(stderr=err, width=None if (sys.stderr if err else sys.stdout).isatty() else 150))
    return out.items


def render_table(records: list[dict], console) -> None:
    from rich.table import Table

    if not records:
        return
    r0 = records[0]
    t = Table(title=f"grft-serve vs plain Ray Serve: {r0['model']} ({r0['input_size']} px, {r0['device']}, "
                    f"{r0['dtype']}), {r0['clients']} clients, {r0['seconds']:g} s windows",
              caption=f"ratios: grft / plain (mixed vs plain batch); {r0['tasks_registered']} tasks registered; "
                      f"top-1 agreement plain vs grft {r0['agree']:.3f}; images: {r0['images']}")
    for c in ("scenario", "inputs x tasks", "system", "inputs/s", "p50 ms", "p99 ms", "errors (all)",
              "inputs/s ratio", "p50 ratio", "served batch", "load 1m"):
        t.add_column(c, justify="left" if c in ("scenario", "system") else "right")
    for r in records:
        ratio, grft = r.get("ratio_inputs_per_s"), r["system"] == "grft"
        t.add_row(r["scenario"], f"{r['inputs_per_request']} x {r['tasks_per_request']}", r["system"],
                  f"{r['inputs_per_s']:.1f}", f"{r['p50_ms']:.0f}", f"{r['p99_ms']:.0f}",
                  f"{r['errors']} ({r['errors_total']})", f"{100 * ratio:.0f} %" if ratio is not None else "-",
                  f"{r['ratio_p50']:.2f}x" if grft else "-",
                  f"{r['mean_batch_size']:.1f}" if r["mean_batch_size"] is not None else "-", f"{r['loadavg_1m']:.1f}")
    console.print(t)
    for r in records:
        if r["failures"]:
            console.print(f"[red]{r['system']}/{r['scenario']} failures:[/] " + " | ".join(r["failures"]))


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m bench.serve", description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--smoke", action="store_true",
                   help="tiny random ViT (deployments/tiny.yaml), 4 clients, 2 s windows")
    p.add_argument("--config", default=None,
                   help="a deployments/*.yaml app config (default: local.yaml; smoke: tiny.yaml)")
    p.add_argument("--backbone", default=None,
                   help="backbone entry of the config to use (default: its first; must be an image one)")
    p.add_argument("--clients", type=int, default=None, help="concurrent HTTP clients (default 8, smoke 4)")
    p.add_argument("--seconds", type=float, default=None, help="measured window per run (default 15, smoke 2)")
    p.add_argument("--warmup", type=float, default=None, help="warm-up before each window (default 3, smoke 1)")
    p.add_argument("--rounds", type=int, default=1,
                   help="repeat every (plain, grft) pair of windows; ratios are the median over rounds")
    p.add_argument("--max-requests", type=int, default=100_000, help="requests per window at most")
    p.add_argument("--timeout", type=float, default=120.0, help="per-request timeout, seconds")
    p.add_argument("--batch", type=int, default=16, help="inputs per request of batch / mixed")
    p.add_argument("--tasks", type=int, default=16, help="tasks registered (mixed spreads a request over them)")
    p.add_argument("--k", type=int, default=2, help="rows per patchable module of each random package")
    p.add_argument("--input-size", type=int, default=None,
                   help="square input size the packages were 'trained' at (default 64 px as the Fashion-MNIST demo; "
                        "smoke: the model's own); 0: the model's own")
    p.add_argument("--num-cpus", type=int, default=None,
                   help="CPUs of the local Ray (default: max(2, what both apps ask))")
    p.add_argument("--only", default=",".join(SCENARIOS), help=f"comma list of scenarios ({', '.join(SCENARIOS)})")
    p.add_argument("--out", default=None, help="write JSON lines here (default: stdout)")
    a = p.parse_args(argv)
    a.config = a.config or str(ROOT / "deployments" / ("tiny.yaml" if a.smoke else "local.yaml"))
    a.clients = (4 if a.smoke else 8) if a.clients is None else a.clients
    a.seconds = (2.0 if a.smoke else 15.0) if a.seconds is None else a.seconds
    a.warmup = a.warmup if a.warmup is not None else (1.0 if a.smoke else 3.0)
    a.input_size = (None if a.smoke else 64) if a.input_size is None else (a.input_size or None)
    a.only = [s for s in a.only.replace(" ", "").split(",") if s]
    bad = [s for s in a.only if s not in SCENARIOS]
    if bad or not a.only:
        p.error(f"--only: unknown scenario(s) {bad}; choose from {', '.join(SCENARIOS)}")
    if min(a.clients, a.batch, a.tasks, a.max_requests, a.rounds) < 1 or a.seconds <= 0 or a.warmup < 0:
        p.error("--clients, --batch, --tasks, --rounds, --max-requests and --seconds must be positive")
    return a


if __name__ == "__main__":
    main()
