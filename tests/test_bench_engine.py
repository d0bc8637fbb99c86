"""The engine benchmark runs end to end (tiny CPU config) and reports every (method, T)."""
from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
KEYS = {"method", "tasks", "pct_of_base", "samples_per_s", "batch", "model", "dtype", "device", "k"}


def _bench_main():
    if str(ROOT) not in sys.path:
        sys.path.insert(0, str(ROOT))
    from bench.engine import main

    return main


@pytest.mark.timeout(300)
def test_smoke_bench_reports_every_method_and_task_count(tmp_path):
    out = tmp_path / "bench.jsonl"
    records = _bench_main()(["--smoke", "--tasks", "1,3", "--batch", "6", "--repeats", "2", "--warmup", "0",
                             "--min-time", "0.002", "--k", "2,5", "--later-k-tasks", "3", "--peft",
                             "--many", "40", "--many-batches", "2", "--many-model", "all", "--out", str(out)])
    lines = [json.loads(line) for line in out.read_text().splitlines() if line.strip()]
    assert lines == json.loads(json.dumps(records))
    for rec in lines:
        assert KEYS <= rec.keys(), rec
        assert rec["device"] == "cpu" and rec["batch"] == 6 and rec["k"] in (2, 5)
    models = {r["model"] for r in lines}
    assert len(models) == 2  # tiny ViT and tiny LLaMA
    for model in models:
        rs = [r for r in lines if r["model"] == model]
        got = {(r["method"], r["tasks"], r["k"]) for r in rs}
        for m in ("base", "patch", "override", "peft-lora", "override.plan"):
            for t in (1, 3):
                assert (m, t, 2) in got, (model, m, t)
        assert {("base", 3, 5), ("override", 3, 5)} <= got and ("peft-lora", 3, 5) not in got
        peft = [r for r in rs if r["method"] == "peft-lora"]
        assert all(r["lora_rank"] >= 1 and r["lora_params"] > 0 for r in peft)
        many = {r["method"]: r for r in rs if r["method"].startswith("many.")}
        assert many["many.register"]["registered"] == 40 and many["many.register"]["ms"] > 0
        assert 0.5 < many["many.host"]["host_over_package"] < 1.5
        assert many["many.mixed"]["ratio_to_10_tasks"] > 0 and many["many.mixed"]["slot_loads_per_batch"] > 0
        rs = [r for r in rs if r["k"] == 2]
        for r in rs:
            if r["method"] in ("base", "patch", "override"):
                assert r["pct_of_base"] > 0 and r["samples_per_s"] > 0 and r["ms"] > 0
            if r["method"] == "base":
                assert r["pct_of_base"] == pytest.approx(100.0)
        assert all(0 < r["share_of_override"] for r in rs if r["method"] == "override.plan")
        switch = [r for r in rs if r["method"] == "switch_ms"]
        assert len(switch) == 1 and switch[0]["ms"] > 0
        upload = [r for r in rs if r["method"] == "upload_ms"]
        assert len(upload) == 1 and upload[0]["ms"] is None  # no device tier on CPU


@pytest.mark.timeout(120)
def test_bench_runs_as_a_script(tmp_path):
    """``python bench/engine.py`` (not only ``-m``) works, with JSON lines on stdout."""
    proc = subprocess.run([sys.executable, str(ROOT / "bench" / "engine.py"), "--smoke", "--model", "vit",
                           "--tasks", "2", "--batch", "4", "--repeats", "1", "--warmup", "0", "--min-time", "0.001",
                           "--no-diagnostics"], cwd=tmp_path, capture_output=True, text=True, timeout=110)
    assert proc.returncode == 0, proc.stderr[-3000:]
    lines = [json.loads(x) for x in proc.stdout.splitlines() if x.startswith("{")]
    assert {(r["method"], r["tasks"]) for r in lines} >= {("base", 2), ("patch", 2), ("override", 2)}
    assert "override" in proc.stderr  # the table goes to stderr when the JSON goes to stdout
