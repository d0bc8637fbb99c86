"""Closed-loop HTTP load generator for bench/serve.py, and the local-server helpers of the HTTP benches.

``C`` client threads (``requests`` sessions), each sending its next request as soon as the previous
one returns, through a warm-up period and then a window of ``S`` seconds (and at most
``max_requests`` requests). Figures count the requests that COMPLETED inside the window:
``inputs_per_s`` = their inputs / ``S``; ``p50_ms``/``p99_ms`` = their latency percentiles (send to
parsed answer); ``errors`` = those that failed (non-200, transport error, wrong answer count);
``errors_total`` = failures over warm-up, window and drain. Several windows (rounds) are summarised
together by pooling: inputs over total seconds, percentiles over all latencies.
"""
import math
import socket
import threading
import time

import numpy as np

__all__ = ["free_port", "run_window", "summarise", "wait_healthy"]


def run_window(url: str, bodies: list[bytes], n_inputs: int, clients: int, warmup_s: float, seconds: float,
               max_requests: int, timeout_s: float) -> dict:
    """Drive ``url`` with ``clients`` closed-loop threads; the raw outcome of the window after ``warmup_s``
    (latencies of the requests that succeeded in it, errors, ...), for :func:`summarise`."""
    import requests

    done: list[tuple[float, float, bool, float | None]] = []  # (sent, finished, ok, mean batch_size)
    failures: list[str] = []
    lock, sent, win = threading.Lock(), [0], [0.0, math.inf]  # window [start, end] set when all clients are up

    def open_window() -> None:
        t0 = time.perf_counter()
        win[:] = [t0 + warmup_s, t0 + warmup_s + seconds]

    start = threading.Barrier(clients + 1, action=open_window)

    def client(c: int) -> None:
        with requests.Session() as s:
            start.wait()
            k = c
            while time.perf_counter() < win[1]:
                with lock:
                    if sent[0] >= max_requests:
                        return
                    sent[0] += 1
                body, k = bodies[k % len(bodies)], k + clients
                a, ok, bs, why = time.perf_counter(), False, None, ""
                try:
                    r = s.post(url, data=body, headers={"Content-Type": "application/json"}, timeout=timeout_s)
                    if r.status_code == 200:
                        preds = r.json().get("predictions", [])
                        ok = len(preds) == n_inputs
                        why = "" if ok else f"{len(preds)} answers for {n_inputs} inputs"
                        sizes = [p["batch_size"] for p in preds if isinstance(p.get("batch_size"), int)]
                        bs = sum(sizes) / len(sizes) if sizes else None
                    else:
                        why = f"HTTP {r.status_code}: {r.text[:200]}"
                except Exception as e:  # noqa: BLE001 - a failed request is counted, not fatal
                    why = f"{type(e).__name__}: {e}"[:200]
                with lock:
                    done.append((a, time.perf_counter(), ok, bs))
                    if why and len(failures) < 5:
                        failures.append(why)

    threads = [threading.Thread(target=client, args=(c,), daemon=True) for c in range(clients)]
    for t in threads:
        t.start()
    start.wait()
    for t in threads:
        t.join(timeout_s + max(win[1] - time.perf_counter(), 0) + 5)
    inside = [d for d in done if win[0] <= d[1] <= win[1]]
    good = [d for d in inside if d[2]]
    return {"seconds": seconds, "n_inputs": n_inputs, "latencies_ms": [(d[1] - d[0]) * 1e3 for d in good],
            "batch_sizes": [d[3] for d in good if d[3] is not None], "errors": len(inside) - len(good),
            "errors_total": sum(not d[2] for d in done), "stuck_clients": sum(t.is_alive() for t in threads),
            "failures": failures}


def summarise(windows: list[dict]) -> dict:
    """Figures of one or more windows of :func:`run_window` taken together (latencies pooled)."""
    lat = np.array([x for w in windows for x in w["latencies_ms"]] or [math.nan])
    n = sum(len(w["latencies_ms"]) for w in windows)
    inputs = sum(len(w["latencies_ms"]) * w["n_inputs"] for w in windows)
    sizes = [x for w in windows for x in w["batch_sizes"]]
    return {"windows": len(windows), "requests": n, "inputs": inputs,
            "inputs_per_s": inputs / sum(w["seconds"] for w in windows),
            "p50_ms": float(np.percentile(lat, 50)), "p99_ms": float(np.percentile(lat, 99)),
            "errors": sum(w["errors"] for w in windows), "errors_total": sum(w["errors_total"] for w in windows),
            "stuck_clients": sum(w["stuck_clients"] for w in windows),
            "failures": [f for w in windows for f in w["failures"]][:5],
            "mean_batch_size": float(np.mean(sizes)) if sizes else None}


def free_port() -> int:
    """A TCP port free on 127.0.0.1 now."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_healthy(url: str, timeout_s: float = 300) -> dict:
    """GET ``url`` until it answers 200 (its JSON), or raise after ``timeout_s``."""
    import requests

    deadline = time.time() + timeout_s
    while True:
        try:
            r = requests.get(url, timeout=10)
            if r.status_code == 200:
                return r.json()
        except requests.RequestException:
            pass
        if time.time() > deadline:
            raise RuntimeError(f"{url} did not become healthy in {timeout_s:.0f} s")
        time.sleep(0.2)
