"""The generation benchmark over HTTP: the same wave through the OpenAI-compatible streaming route.

:func:`http_wave` sends one ``POST /v1/chat/completions`` with ``stream: true`` per request (``model``
= the task id, the base model's id for no task) with the official ``openai`` client, one thread per
request, and stamps every streamed chunk that carries text as it arrives; the completion tokens come
from the final usage chunk (``stream_options.include_usage``). It returns the figures of
:func:`bench.gen_workload.summarize`, so an HTTP wave compares one to one with an in-process wave
of the same config; ``cpu_s`` is None (the server's CPU time is spent in other processes).

Exactly-M-token waves need the server to ignore EOS: pass the server's switch in ``extra_body``
(vLLM's is ``{"ignore_eos": true}``); without one, compare tokens/s over the tokens each wave made.
"""
from __future__ import annotations

import threading
import time
from typing import Sequence

from bench.gen_workload import Timing, summarize

__all__ = ["http_wave"]


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
    t0 = time.perf_counter()
    for i, (model, msgs) in enumerate(zip(model_ids, messages)):
        if arrivals is not None:
            wait = t0 + arrivals[i] - time.perf_counter()
            if wait > 0:
                time.sleep(wait)
        t = Timing(time.perf_counter())
        timings.append(t)
        th = threading.Thread(target=_one, args=(client, model, msgs, new_tokens, extra_body, t), daemon=True)
        th.start()
        threads.append(th)
    for th in threads:
        th.join(timeout_s)
    return summarize(timings, None)
