"""Both CLIs as a user runs them (subprocesses, output piped like a log file): training from an
ImageFolder with split folders and from a local Hugging Face ``datasets`` directory, eval and ONNX
export without a run file (the package records its base and data), logs without progress frames, the
dataset summary, and the grft-serve papercuts that need no server."""
import json
import os
import subprocess
import sys

import numpy as np
import pytest
from PIL import Image

ENV = dict(os.environ, HF_HUB_OFFLINE="1", HF_DATASETS_OFFLINE="1", TOKENIZERS_PARALLELISM="false",
           OMP_NUM_THREADS="1")
VIT = {"type": "timm", "name": "vit_tiny_patch16_224", "weights": "random",
       "model_kwargs": {"img_size": 32, "patch_size": 8, "depth": 2}}
COLOURS = {"red": (220, 30, 30), "blue": (30, 30, 220)}


def _img(colour, seed):
    rng = np.random.default_rng(seed)
    a = (rng.normal(0, 25, (20, 20, 3)) + np.array(colour)).clip(0, 255).astype(np.uint8)
    return Image.fromarray(a)


def _split_folders(root, sizes=(("train", 12), ("val", 4), ("test", 4))):
    for split, n in sizes:
        for c, col in COLOURS.items():
            (root / split / c).mkdir(parents=True)
            for i in range(n):
                _img(col, hash((split, c, i)) % 1000).save(root / split / c / f"{i}.png")
    return root


def _run_file(tmp_path, data: dict, task: str) -> str:
    import yaml

    cfg = {"backbone": VIT, "data": data, "batch_size": 8, "threads": 1, "device": "cpu",
           "select": {"out": str(tmp_path / "sel.safetensors"), "k": 2, "num_batches": 2},
           "fit": {"selection": str(tmp_path / "sel.safetensors"), "task_id": task, "out_dir": str(tmp_path / "fit"),
                   "epochs": 2, "lr": 0.01, "head_lr": 0.05}}
    p = tmp_path / "run.yaml"
    p.write_text(yaml.safe_dump(cfg))
    return str(p)


def cli(*args, tool="grft_train", ok=True, cwd=None):
    """Run ``python -m TOOL ARGS`` with stdout/stderr piped (not a terminal)."""
    r = subprocess.run([sys.executable, "-m", tool, *args], capture_output=True, text=True, env=ENV, cwd=cwd,
                       timeout=600)
    if ok:
        assert r.returncode == 0, r.stderr[-3000:]
    return r


def _last_json(out: str) -> dict:
    return json.loads(out.strip().splitlines()[-1])


def test_train_from_split_folders_eval_and_export_without_config(tmp_path):
    root = _split_folders(tmp_path / "photos")
    run = _run_file(tmp_path, {"format": "imagefolder", "path": str(root)}, "colours")
    s = cli("select", "-c", run)
    assert "split folders train/ val/ test/" in s.stderr  # detected and reported
    assert "| red " in s.stderr and "| total " in s.stderr  # the summary table
    f = cli("fit", "-c", run)
    for out in (s, f):
        assert "\r" not in out.stderr + out.stdout  # no progress frames in logs
    assert f.stderr.count("epoch 1:") == 1 and f.stderr.count("epoch 2:") == 1  # one line per epoch
    assert "kept epoch" in f.stderr
    res = _last_json(f.stdout)
    pkg = res["package"]
    assert res["test_acc"] is not None and os.path.isfile(pkg)
    metrics = json.load(open(tmp_path / "fit" / "metrics.json"))
    assert metrics["n_train"] == 24 and metrics["n_val"] == 8 and metrics["n_test"] == 8
    # eval with no run file: base, data and preprocessing come from the package
    e = cli("eval", pkg, cwd=tmp_path)
    rep = json.loads(e.stdout)
    assert rep["n"] == 8 and rep["accuracy"] == pytest.approx(res["test_acc"])
    # --quiet: only the JSON
    q = cli("eval", pkg, "--quiet", "--split", "val")
    assert q.stderr.strip() == "" and json.loads(q.stdout)["n"] == 8
    # export with no --backbone: the package's base; the ONNX metadata carries labels and preprocessing
    x = cli("export", pkg, "--out", str(tmp_path / "colours.onnx"), tool="grft_serve.cli")
    meta = _last_json(x.stdout)["metadata"]
    assert json.loads(meta["grft.labels"]) == ["blue", "red"]
    assert json.loads(meta["grft.preprocessing"])["timm_data_config"]["input_size"] == [3, 32, 32]


def test_train_from_hf_datasets_directory(tmp_path):
    datasets = pytest.importorskip("datasets")
    feats = datasets.Features({"img": datasets.Image(), "colour": datasets.ClassLabel(names=list(COLOURS))})

    def part(n, off):
        rows = [(_img(col, off + i), j) for i in range(n) for j, col in enumerate(COLOURS.values())]
        return datasets.Dataset.from_dict({"img": [r[0] for r in rows], "colour": [r[1] for r in rows]},
                                          features=feats)

    datasets.DatasetDict({"train": part(12, 0), "validation": part(4, 100), "test": part(4, 200)}) \
        .save_to_disk(str(tmp_path / "hf"))
    run = _run_file(tmp_path, {"format": "hf_datasets", "path": str(tmp_path / "hf"), "label_column": "colour"},
                    "hf-colours")
    s = cli("select", "-c", run)
    assert "Hugging Face splits train val test" in s.stderr
    f = cli("fit", "-c", run)
    res = _last_json(f.stdout)
    assert os.path.isfile(res["package"]) and res["test_acc"] is not None
    metrics = json.load(open(tmp_path / "fit" / "metrics.json"))
    assert (metrics["n_train"], metrics["n_val"], metrics["n_test"]) == (24, 8, 8)


def test_data_errors_are_cli_errors(tmp_path):
    root = _split_folders(tmp_path / "p", sizes=(("train", 1), ("test", 2)))
    run = _run_file(tmp_path, {"format": "imagefolder", "path": str(root)}, "few")
    r = cli("select", "-c", run, ok=False)
    assert r.returncode == 1 and "need at least 2 samples" in r.stderr and "Traceback" not in r.stderr
    run = _run_file(tmp_path, {"format": "imagefolder", "path": str(_split_folders(tmp_path / "ok"))}, "w")
    r = cli("select", "-c", run, "--set", "backbone.weights=null", ok=False)
    assert r.returncode == 1 and "has no weights" in r.stderr and "Traceback" not in r.stderr


def test_samples_command_writes_inputs(tmp_path):
    root = _split_folders(tmp_path / "p")
    run = _run_file(tmp_path, {"format": "imagefolder", "path": str(root)}, "s")
    r = cli("samples", "-c", run, "-n", "3", "--out", str(tmp_path / "samples"))
    files = _last_json(r.stdout)["files"]
    assert len(files) == 3 and all(os.path.isfile(f) and f.endswith(".png") for f in files)
    assert Image.open(files[0]).size == (20, 20)


def test_serve_config_like_serve_run(tmp_path):
    """`grft-serve up` reads a Serve config with Ray's own schema: http_options (request timeout),
    runtime_env and per-deployment overrides are kept; a bare app config is wrapped."""
    from grft_serve.cli import serve_config

    raw = {"http_options": {"port": 8123, "request_timeout_s": 7},
           "applications": [{"name": "grft", "route_prefix": "/", "import_path": "grft_serve.app:build_app",
                             "runtime_env": {"env_vars": {"GRFT_ADMIN_TOKEN": "t"}},
                             "deployments": [{"name": "Ingress", "num_replicas": 2}], "args": {}}]}
    s = serve_config(raw, port=9000)
    assert s.http_options.port == 9000 and s.http_options.request_timeout_s == 7
    assert s.http_options.host == "127.0.0.1"
    app = s.applications[0]
    assert app.runtime_env["env_vars"]["GRFT_ADMIN_TOKEN"] == "t" and app.deployments[0].num_replicas == 2
    bare = serve_config({"store": {"path": "x"}})
    assert bare.applications[0].import_path == "grft_serve.app:build_app"
    assert bare.applications[0].args == {"store": {"path": "x"}}


def test_serve_cli_help_and_flags():
    from typer.testing import CliRunner

    from grft_serve.cli import app

    r = CliRunner().invoke(app, ["register", "--help"], env={"COLUMNS": "120"})
    line = next(x for x in r.output.splitlines() if "--replace" in x)
    assert "<bool>" not in line and "a flag" in line  # help no longer suggests `--replace <bool>`
    r = CliRunner().invoke(app, ["register", "missing.grft.safetensors", "--replace"])
    assert r.exit_code == 1 and "package not found" in r.output


@pytest.mark.slow
def test_up_deploys_like_serve_run(tmp_path):
    """`grft-serve up CONFIG` honours what `serve run CONFIG` honours: the app's runtime_env (the admin
    token exists only there), a per-deployment override (2 backbone replicas where the args say 1) and
    http_options; SIGTERM shuts it down cleanly."""
    import base64
    import signal
    from concurrent.futures import ThreadPoolExecutor

    import requests
    import torch
    import yaml
    from app_fixtures import free_port, png_bytes

    from grft_serve.core.backbones import load_backbone
    from grft_serve.core.package import save_package
    from grft_serve.testing import random_package

    port = free_port()
    args = {"store": {"path": str(tmp_path / "store")}, "admin_token_env": "GRFT_UPTEST_ADMIN",
            "backbones": [{"name": "vit", "backbone": VIT, "seed": 7, "device": "cpu", "replicas": 1,
                           "num_cpus": 0.1, "max_batch_size": 4, "batch_wait_timeout_s": 0.001}],
            "ingress_num_cpus": 0.1}
    cfg = {"http_options": {"host": "127.0.0.1", "port": port, "request_timeout_s": 120},
           "applications": [{"name": "grft", "route_prefix": "/", "import_path": "grft_serve.app:build_app",
                             "runtime_env": {"env_vars": {"GRFT_UPTEST_ADMIN": "only-in-runtime-env"}},
                             "deployments": [{"name": "Backbone-vit", "num_replicas": 2}], "args": args}]}
    (tmp_path / "serve.yaml").write_text(yaml.safe_dump(cfg))
    env = {k: v for k, v in ENV.items() if k != "GRFT_UPTEST_ADMIN"}
    proc = subprocess.Popen([sys.executable, "-m", "grft_serve.cli", "up", str(tmp_path / "serve.yaml"),
                             "--num-cpus", "2", "--quiet"], stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                            text=True, env=env, cwd=tmp_path)
    try:
        lines = []
        for line in proc.stdout:
            lines.append(line)
            if "is up at" in line or len(lines) > 400:
                break
        assert any(f"127.0.0.1:{port}" in x for x in lines), "".join(lines)[-3000:]
        url = f"http://127.0.0.1:{port}"
        with torch.random.fork_rng():
            torch.manual_seed(7)
            bb = load_backbone(VIT)
        path = save_package(random_package(bb, "uptask", seed=3), tmp_path / "uptask.grft.safetensors")
        with open(path, "rb") as f:
            r = requests.post(f"{url}/v1/tasks", files={"file": f}, timeout=120,
                              headers={"Authorization": "Bearer only-in-runtime-env"})
        assert r.status_code == 201, r.text
        from typer.testing import CliRunner

        from grft_serve.cli import app as serve_cli

        again = CliRunner().invoke(serve_cli, ["register", str(path), "--url", url, "--token", "only-in-runtime-env"])
        assert again.exit_code == 1 and "already registered" in again.output
        assert "add --replace to overwrite" in again.output  # names the CLI flag
        img = base64.b64encode(png_bytes(1)).decode()

        def call(_):
            r = requests.post(f"{url}/v1/tasks/uptask/predict", json={"inputs": [img]}, timeout=120)
            return r.json()["predictions"][0]["replica"]

        with ThreadPoolExecutor(8) as ex:
            replicas = set(ex.map(call, range(48)))
        assert len(replicas) == 2, replicas
    finally:
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(timeout=120)
        except subprocess.TimeoutExpired:
            proc.kill()
            raise
    assert proc.returncode == 0


def test_predict_text_task_reads_text_files(tmp_path):
    """A text task's input naming a file sends the file's text; a binary file is a clear error."""
    import typer

    from grft_serve.cli import text_input

    (tmp_path / "review.txt").write_text("a fine film", encoding="utf-8")
    (tmp_path / "photo.png").write_bytes(b"\x89PNG\r\n\x1a\n\x00\xff\xfe")
    assert text_input("t", str(tmp_path / "review.txt")) == "a fine film"
    assert text_input("t", "just some words") == "just some words"
    with pytest.raises(typer.Exit):
        text_input("t", str(tmp_path / "photo.png"))
