"""bench/serve.py: the load generator's accounting over real HTTP, and a smoke run of both apps."""
import json
import subprocess
import sys
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
KEYS = {"bench", "system", "scenario", "inputs_per_request", "tasks_per_request", "requests", "inputs",
        "inputs_per_s", "p50_ms", "p99_ms", "errors", "errors_total", "clients", "seconds", "model", "device",
        "dtype", "replicas", "num_cpus", "agree"}


def _bench(name: str):
    if str(ROOT) not in sys.path:
        sys.path.insert(0, str(ROOT))
    import importlib

    return importlib.import_module(f"bench.{name}")


class _Server(ThreadingHTTPServer):
    daemon_threads = True


def _drive(fail_every: int, bodies: list[bytes], n_inputs: int, **window) -> tuple[dict, int]:
    """``run_window`` against a real HTTP server answering one prediction per input (HTTP 503 on every
    ``fail_every``-th call); returns the figures and how many calls the server saw."""
    seen = {"n": 0}
    lock = threading.Lock()

    class H(BaseHTTPRequestHandler):
        def log_message(self, *a):
            pass

        def do_POST(self):
            body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
            with lock:
                seen["n"] += 1
                fail = fail_every and seen["n"] % fail_every == 0
            out = b'{"error": {"code": "busy", "message": "no"}}' if fail else json.dumps(
                {"predictions": [{"label": "a", "batch_size": 4} for _ in body["inputs"]]}).encode()
            self.send_response(503 if fail else 200)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(out)))
            self.end_headers()
            self.wfile.write(out)

    srv = _Server(("127.0.0.1", 0), H)
    threading.Thread(target=srv.serve_forever, daemon=True).start()
    try:
        load = _bench("http_load")
        raw = load.run_window(f"http://127.0.0.1:{srv.server_address[1]}/predict", bodies, n_inputs, timeout_s=5,
                              **window)
    finally:
        srv.shutdown()
    return load.summarise([raw]), seen["n"]


@pytest.mark.timeout(60)
def test_window_counts_inputs_latency_and_errors_over_http():
    bodies = [json.dumps({"inputs": ["x", "y"], "top_k": 1}).encode()]
    res, calls = _drive(3, bodies, 2, clients=3, warmup_s=0.2, seconds=0.6, max_requests=10_000)
    assert res["requests"] > 0 and res["errors"] > 0 and res["stuck_clients"] == 0
    assert res["inputs"] == 2 * res["requests"]
    assert res["inputs_per_s"] == pytest.approx(res["inputs"] / 0.6)
    assert 0 < res["p50_ms"] <= res["p99_ms"]
    assert res["errors_total"] >= res["errors"]
    # every 3rd call fails, and every call ends in the record (warm-up and drain included)
    assert res["errors_total"] == calls // 3
    assert res["mean_batch_size"] == pytest.approx(4.0)
    assert any("HTTP 503" in f for f in res["failures"])


def test_summarise_pools_windows():
    load = _bench("http_load")
    w1 = {"seconds": 2.0, "n_inputs": 16, "latencies_ms": [10.0, 20.0, 30.0], "batch_sizes": [16, 8], "errors": 1,
          "errors_total": 2, "stuck_clients": 0, "failures": ["HTTP 500: x"]}
    w2 = {**w1, "latencies_ms": [40.0], "batch_sizes": [], "errors": 0, "errors_total": 0, "failures": []}
    res = load.summarise([w1, w2])
    assert res["windows"] == 2 and res["requests"] == 4 and res["inputs"] == 64
    assert res["inputs_per_s"] == pytest.approx(64 / 4.0)
    assert res["p50_ms"] == pytest.approx(25.0) and 30.0 < res["p99_ms"] <= 40.0
    assert (res["errors"], res["errors_total"], res["failures"]) == (1, 2, ["HTTP 500: x"])
    assert res["mean_batch_size"] == pytest.approx(12.0)
    empty = load.summarise([{**w1, "latencies_ms": [], "batch_sizes": []}])
    assert empty["inputs_per_s"] == 0 and empty["mean_batch_size"] is None


def _window(n_requests: int, latency_ms: float, n_inputs: int = 16) -> dict:
    return {"seconds": 1.0, "n_inputs": n_inputs, "latencies_ms": [latency_ms] * n_requests, "batch_sizes": [],
            "errors": 0, "errors_total": 0, "stuck_clients": 0, "failures": [], "loadavg_1m": 1.0}


def test_records_give_median_of_per_round_ratios():
    serve_bench = _bench("serve")
    runs = {("plain", "batch"): [_window(10, 100.0), _window(2, 100.0), _window(10, 100.0)],
            ("grft", "batch"): [_window(5, 200.0), _window(4, 50.0), _window(10, 100.0)],
            ("grft", "mixed"): [_window(20, 100.0), _window(1, 100.0), _window(10, 300.0)]}
    recs = {(r["system"], r["scenario"]): r for r in serve_bench.make_records(runs, {"model": "m"}, n_tasks=16)}
    g = recs[("grft", "batch")]
    assert g["rounds"] == 3 and g["baseline"] == "plain/batch" and g["model"] == "m"
    assert g["ratio_inputs_per_s"] == pytest.approx(1.0)  # per round 0.5, 2.0, 1.0
    assert g["ratio_p50"] == pytest.approx(1.0)  # per round 2.0, 0.5, 1.0
    assert g["inputs_per_s"] == pytest.approx(19 * 16 / 3)  # pooled over the rounds
    m = recs[("grft", "mixed")]
    assert m["baseline"] == "plain/batch" and m["tasks_per_request"] == 16
    assert m["ratio_inputs_per_s"] == pytest.approx(1.0) and m["ratio_p99"] == pytest.approx(1.0)
    assert "ratio_inputs_per_s" not in recs[("plain", "batch")]


@pytest.mark.timeout(60)
def test_window_is_bounded_by_count_and_rejects_bad_options():
    res, calls = _drive(0, [b'{"inputs": ["x"]}'], 1, clients=4, warmup_s=0.0, seconds=1.0, max_requests=7)
    assert calls == 7 and res["requests"] <= 7 and res["errors_total"] == 0
    parse_args = _bench("serve").parse_args
    for bad in (["--only", "nope"], ["--clients", "0"], ["--seconds", "-1"], ["--rounds", "0"]):
        with pytest.raises(SystemExit):
            parse_args(bad)
    assert parse_args(["--only", "mixed"]).only == ["mixed"]


@pytest.mark.slow
@pytest.mark.timeout(600)
def test_smoke_run_reports_both_apps_with_ratios_and_no_errors(tmp_path):
    out = tmp_path / "serve.jsonl"
    proc = subprocess.run([sys.executable, "-m", "bench.serve", "--smoke", "--out", str(out)], cwd=ROOT,
                          capture_output=True, text=True, timeout=580)
    assert proc.returncode == 0, proc.stderr[-4000:]
    recs = [json.loads(x) for x in out.read_text().splitlines() if x.strip()]
    assert {(r["system"], r["scenario"]) for r in recs} == {
        ("plain", "single"), ("grft", "single"), ("plain", "batch"), ("grft", "batch"), ("grft", "mixed")}
    plain = {r["scenario"]: r for r in recs if r["system"] == "plain"}
    for r in recs:
        assert KEYS <= r.keys(), r
        assert r["errors"] == 0 and r["errors_total"] == 0 and r["stuck_clients"] == 0, r["failures"]
        assert r["requests"] > 0 and r["inputs"] == r["requests"] * r["inputs_per_request"]
        assert 0 < r["p50_ms"] <= r["p99_ms"]
        assert r["agree"] == 1.0  # the plain model is task 0 merged: same answers
        assert r["inputs_per_request"] == (1 if r["scenario"] == "single" else 16) and r["rounds"] == 1
        if r["system"] == "grft":
            base = plain[r["baseline"].split("/")[1]]
            assert r["ratio_inputs_per_s"] == pytest.approx(r["inputs_per_s"] / base["inputs_per_s"])
            assert r["ratio_p50"] == pytest.approx(r["p50_ms"] / base["p50_ms"])
    assert {r["tasks_per_request"] for r in recs if r["scenario"] == "mixed"} == {16}
    assert plain["batch"]["inputs_per_request"] == 16
    assert "grft-serve vs plain Ray Serve" in proc.stdout and "mixed" in proc.stdout  # the table went to stdout
