"""The generation benchmark runs end to end on a tiny causal LM and reports every method, sanely."""
from __future__ import annotations

import json
import math
import sys
from pathlib import Path

import pytest
from gen_fixtures import make_tiny_lm

ROOT = Path(__file__).resolve().parents[1]
R, M = 4, 3


def _bench_main():
    if str(ROOT) not in sys.path:
        sys.path.insert(0, str(ROOT))
    from bench.generate import main

    return main


@pytest.mark.timeout(300)
def test_smoke_bench_reports_every_method_with_sane_figures(tmp_path):
    model = make_tiny_lm(tmp_path / "lm", initializer_range=0.3)
    out, table = tmp_path / "gen.jsonl", tmp_path / "gen.md"
    records = _bench_main()(["--smoke", "--model", str(model), "--requests", str(R), "--new-tokens", str(M),
                             "--tasks", "1,2", "--out", str(out), "--table", str(table)])
    lines = [json.loads(line) for line in out.read_text().splitlines() if line.strip()]
    assert lines == json.loads(json.dumps(records))
    got = {(r["decoder"], r["workload"], r["method"]) for r in lines}
    for d in ("continuous", "padded"):
        for m in ("base", "tasks=1", "tasks=2", "tasks=2 no-keep"):
            assert (d, "burst", m) in got
        assert {(d, "staggered", "base"), (d, "staggered", "tasks=2")} <= got
    assert {("hf-generate", "burst", "base"), ("hf-generate", "burst", "tasks=2")} <= got
    for r in lines:
        assert r["tokens"] == R * M and r["tokens_ok"] and not r["errors"], r
        assert r["requests"] == R and r["new_tokens"] == M and r["rounds"] == 1
        for key in ("tokens_per_s", "cpu_ms_per_token", "ttft_ms_p50", "ttft_ms_p99", "itl_ms_p50", "itl_ms_p99",
                    "pct_of_base", "pct_of_base_cpu"):
            assert math.isfinite(r[key]) and r[key] > 0, (key, r)
        assert r["ttft_ms_p50"] <= r["ttft_ms_p99"] and r["itl_ms_p50"] <= r["itl_ms_p99"]
        if r["method"] == "base":
            assert r["pct_of_base"] == 100.0
    by = {(r["decoder"], r["workload"], r["method"]): r for r in lines}
    for d in ("continuous", "padded"):
        top = by[(d, "burst", "tasks=2")]
        assert math.isfinite(top["x_peft"]) and math.isfinite(top["x_no_keep"]) and top["x_no_keep_cpu"] > 0
        assert by[(d, "burst", "tasks=2 no-keep")]["same_tokens_as_keep"] is True
        assert by[(d, "burst", "tasks=2 no-keep")]["keep_gathers"] is False
    assert by[("continuous", "staggered", "tasks=2")]["ttft_p50_padded_over_continuous"] > 0
    peft = by[("hf-generate", "burst", "tasks=2")]
    assert peft["lora_rank"] >= 1 and peft["lora_params"] > 0 and peft["task_params"] > 0
    text = table.read_text()
    assert text.count("\n| ") == len(lines) + 1  # header + one row per record
    assert "PEFT LoRA rank" in text


@pytest.mark.slow
@pytest.mark.timeout(600)
def test_http_mode_streams_the_same_wave_through_the_app(tmp_path):
    pytest.importorskip("ray.serve")
    pytest.importorskip("openai")
    model = make_tiny_lm(tmp_path / "lm", initializer_range=0.3)
    out = tmp_path / "http.jsonl"
    records = _bench_main()(["--smoke", "--http", "--model", str(model), "--requests", str(R), "--new-tokens",
                             str(M), "--tasks", "2", "--workloads", "burst", "--out", str(out)])
    by = {r["method"]: r for r in records}
    assert set(by) == {"in-process", "http tasks=2"}
    for r in records:
        assert r["tokens"] == R * M and r["tokens_ok"] and not r["errors"], r
        assert r["baseline"] == "continuous/burst/in-process"
    http = by["http tasks=2"]
    assert 0 < http["pct_of_base"] and math.isfinite(http["tokens_per_s"]) and http["cpu_ms_per_token"] is None
    assert http["ttft_ms_p50"] > 0 and http["itl_ms_p50"] > 0
