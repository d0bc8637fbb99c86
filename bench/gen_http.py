"""The generation benchmark over HTTP: the same wave through the OpenAI-compatible streaming route.

:func:`http_wave` sends one ``POST /v1/chat/completions`` with ``stream: true`` per request (``model``
= the task id, the base model's id for no task) with the official ``openai`` client, one thread per
request, and stamps every streamed chunk that carries text as it arrives; the completion tokens come
from the final usage chunk (``stream_options.include_usage``). It returns the figures of
:func:`bench.gen_workload.summarize`, so an HTTP wave compares one to one with an in-process wave
of the same config; ``cpu_s`` is None (the server's CPU time is spent in other processes).

Exactly-M-token waves need the server to ignore EOS: pass the server's switch in ``extra_body``
(vLLM's is ``{"ignore_eos": true}``); without one, compare tokens/s over the tokens each wave made.

:func:`start_app` runs grft-serve on a local Ray at 127.0.0.1 with ONE generation backbone (named
``lm``: the base model's id) configured like the in-process generator, and registers the task
packages through ``POST /v1/tasks`` as a user would (:func:`bench.generate` ``--http``).
"""
from __future__ import annotations

import os
import secrets
import sys
import threading
import time
from pathlib import Path
from typing import Sequence

from bench.gen_workload import Timing, paced, summarize
from bench.http_load import free_port, wait_healthy

__all__ = ["BASE_ID", "http_wave", "start_app", "stop_app"]

BASE_ID = "lm"
ROOT = Path(__file__).resolve().parent.parent


def _one(client, model: str, messages: list[dict], new_tokens: int, extra_body: dict | None, t: Timing) -> None:
    try:
        stream = client.chat.completions.create(model=model, messages=messages, max_tokens=new_tokens,
                                                temperature=0.0, stream=True, stream_options={"include_usage": True},
                                                extra_body=extra_body)
        for chunk in stream:
            now = time.perf_counter()
            if chunk.choices:
                c = chunk.choices[0]
                if c.delta is not None and c.delta.content:
                    t.deliveries.append(now)
                if c.finish_reason is not None:
                    t.finish = c.finish_reason
            if chunk.usage is not None:
                t.tokens = chunk.usage.completion_tokens
    except Exception as e:  # noqa: BLE001 - a failed request is counted, the wave goes on
        t.error = f"{type(e).__name__}: {e}"[:300]


def http_wave(base_url: str, model_ids: Sequence[str], messages: Sequence[list[dict]], new_tokens: int, *,
              api_key: str | None = None, arrivals: Sequence[float] | None = None, extra_body: dict | None = None,
              timeout_s: float = 600.0) -> dict:
    """One wave over HTTP: request ``i`` asks model ``model_ids[i]`` to answer ``messages[i]`` with
    ``new_tokens`` tokens (greedy), streamed; all at once, or at ``arrivals`` offsets (seconds)."""
    from openai import OpenAI

    client = OpenAI(base_url=f"{base_url.rstrip('/')}/v1", api_key=api_key or "unused", timeout=timeout_s,
                    max_retries=0)
    timings: list[Timing] = []
    threads: list[threading.Thread] = []
    for i in paced(len(model_ids), arrivals):
        t = Timing(time.perf_counter())
        timings.append(t)
        th = threading.Thread(target=_one, args=(client, model_ids[i], messages[i], new_tokens, extra_body, t),
                              daemon=True)
        th.start()
        threads.append(th)
    for th in threads:
        th.join(timeout_s)
    return summarize(timings, None)


# ---------------------------------------------------------------------------------------------
# the app
# ---------------------------------------------------------------------------------------------
def start_app(backbone: dict, generation: dict, store: str, packages: Sequence[bytes], *, threads: int = 1,
              num_cpus: int = 2) -> str:
    """grft-serve with one generation backbone ``lm`` (``backbone``: its :class:`BackboneConfig` fields;
    ``generation``: its decode loop's options) on a local Ray; ``packages`` registered. Returns the URL."""
    import ray
    import requests
    from ray import serve

    from grft_serve.app import build_app

    os.environ["GRFT_BENCH_ADMIN"] = token = secrets.token_hex(16)  # replicas inherit the driver's environment
    os.environ["PYTHONPATH"] = os.pathsep.join([str(ROOT), *filter(None, [os.environ.get("PYTHONPATH")])])
    config = {"store": {"path": store}, "admin_token_env": "GRFT_BENCH_ADMIN", "ingress_num_cpus": 0.1,
              "backbones": [{"name": BASE_ID, "backbone": backbone, "device": "cpu", "num_cpus": 1,
                             "torch_threads": threads, "generation": generation}]}
    ray.init(address="local", num_cpus=num_cpus, include_dashboard=False, log_to_driver=False,
             configure_logging=False)
    port = free_port()
    serve.start(http_options={"host": "127.0.0.1", "port": port})
    t = time.perf_counter()
    serve.run(build_app(config), name="grft", route_prefix="/")
    url = f"http://127.0.0.1:{port}"
    wait_healthy(f"{url}/healthz")
    for data in packages:
        r = requests.post(f"{url}/v1/tasks", files={"file": ("task.grft.safetensors", data)},
                          headers={"Authorization": f"Bearer {token}"}, timeout=300)
        if r.status_code != 201:
            raise RuntimeError(f"registering a package failed: HTTP {r.status_code} {r.text[:500]}")
    print(f"[bench] app up at {url} with {len(packages)} tasks in {time.perf_counter() - t:.0f} s", file=sys.stderr)
    return url


def stop_app() -> None:
    import ray
    from ray import serve

    if ray.is_initialized():
        serve.shutdown()
        ray.shutdown()
