"""The generation benchmark's workload: random generation tasks, fixed-length chat prompts, waves of
requests through a :class:`~grft_serve.engine.TextGenerator`, and what a wave is worth.

A *wave* is R requests of exactly M new tokens each (greedy, EOS ignored), all submitted at once
(``burst``) or at seeded Poisson arrival times (``staggered``). Every request keeps a
:class:`Timing`: when it was submitted and when each of its deliveries reached the caller — for the
in-process wave the moments the decode thread hands a :class:`~grft_serve.engine.StreamEvent` to the
sink; for PEFT's ``generate`` the moments its streamer sees a step; over HTTP the moments a streamed
chunk arrives. :func:`summarize` turns the timings of a wave into the figures every method reports:

- ``tokens_per_s``: output tokens / wall time from the first submit to the last delivery;
- ``ttft``: time to first token (first delivery − submit), per request;
- ``itl``: inter-token latency, the gaps between a request's consecutive deliveries (one delivery
  is normally one token; a token whose text is an incomplete UTF-8 character is delivered with
  the next one, which is what a streaming client sees — vLLM's benchmark measures ITL per chunk too);
- ``cpu_ms_per_token``: the process's CPU time over the wave (every thread: the decode loop, the
  sinks, the caller) / output tokens. With one torch thread this is what the work costs, and other
  processes on a shared machine inflate it far less than the wall clock.
"""
from __future__ import annotations

import random
import threading
import time
from dataclasses import dataclass, field, replace
from typing import Iterator, Sequence

import numpy as np

from grft_serve.core import package as P
from grft_serve.core.generation import GenerationMeta
from grft_serve.engine import StreamEvent, TextGenerator
from grft_serve.testing import random_package

__all__ = ["Timing", "arrival_offsets", "chat_messages", "generation_packages", "inprocess_wave", "latency_summary",
           "paced", "summarize", "task_mix", "warm_up"]


# ---------------------------------------------------------------------------------------------
# tasks and prompts
# ---------------------------------------------------------------------------------------------
def generation_packages(backbone, n: int, k: int, seed: int = 0, prefix: str = "gen",
                        eos_token_ids: Sequence[int] = ()) -> list[P.TaskPackage]:
    """``n`` random generation tasks (``kind: generation``, chat format, no head) with ``k`` rows on
    every patchable linear — what a trained GRFT task looks like to the decode loop. ``eos_token_ids``:
    the ids that end their completions (empty: the tokenizer's EOS)."""
    spec = backbone.describe()
    gm = GenerationMeta(format="chat", eos_token_ids=list(eos_token_ids))
    out = []
    for i in range(n):
        pkg = random_package(backbone, f"{prefix}{i:02d}", k=k, n_labels=1, seed=seed + i)
        meta = P.PackageMeta(task_id=pkg.task_id, kind="generation", base_model_id=spec.model_id,
                             base_fingerprint=spec.fingerprint, mode=pkg.meta.mode, k=k,
                             preprocessing=backbone.preprocessing_meta(), generation=gm)
        out.append(P.TaskPackage(meta, pkg.deltas, None, None))
    return out


def chat_messages(n: int, seed: int = 0) -> list[list[dict]]:
    """``n`` one-turn chats of the same shape ("What is 47 plus 38?": two-digit numbers, so every
    prompt renders to the same number of tokens)."""
    g = random.Random(seed)
    return [[{"role": "user", "content": f"What is {g.randint(10, 99)} plus {g.randint(10, 99)}?"}]
            for _ in range(n)]


def task_mix(task_ids: Sequence[str], n_tasks: int, requests: int) -> list[str | None]:
    """The task of each request: round-robin over the first ``n_tasks`` tasks (0: the base model)."""
    if n_tasks == 0:
        return [None] * requests
    return [task_ids[i % n_tasks] for i in range(requests)]


def arrival_offsets(requests: int, interval_s: float, seed: int = 0) -> list[float]:
    """Seeded Poisson arrivals: offsets (seconds from the wave's start) with exponential gaps of
    mean ``interval_s``; the first request arrives at 0. The same schedule for every method."""
    g = np.random.default_rng(seed)
    gaps = g.exponential(interval_s, size=max(requests - 1, 0))
    return [0.0, *np.cumsum(gaps).tolist()][:requests]


def paced(n: int, arrivals: Sequence[float] | None = None) -> Iterator[int]:
    """``0 .. n-1``, each yielded at its arrival offset (seconds after the first) when ``arrivals`` is
    given, else at once."""
    t0 = time.perf_counter()
    for i in range(n):
        if arrivals is not None:
            wait = t0 + arrivals[i] - time.perf_counter()
            if wait > 0:
                time.sleep(wait)
        yield i


# ---------------------------------------------------------------------------------------------
# timings
# ---------------------------------------------------------------------------------------------
@dataclass
class Timing:
    """One request of a wave: submit time, delivery times (``time.perf_counter``), tokens produced."""

    submit: float
    deliveries: list[float] = field(default_factory=list)
    tokens: int = 0
    finish: str | None = None
    error: str | None = None


def _pct(values: Sequence[float], q: float) -> float | None:
    return float(np.percentile(values, q)) if len(values) else None


def summarize(timings: Sequence[Timing], cpu_s: float | None) -> dict:
    """The figures of one wave (see the module docstring); times in ms except ``wall_s``/``cpu_s``
    (None: not measured here)."""
    ends = [t.deliveries[-1] for t in timings if t.deliveries]
    tokens = sum(t.tokens for t in timings)
    wall = (max(ends) - min(t.submit for t in timings)) if ends else float("nan")
    ttft = [1e3 * (t.deliveries[0] - t.submit) for t in timings if t.deliveries]
    itl = [1e3 * g for t in timings for g in np.diff(t.deliveries)]
    return {"tokens": tokens, "wall_s": wall, "cpu_s": cpu_s, "tokens_per_s": tokens / wall if wall > 0 else None,
            "cpu_ms_per_token": 1e3 * cpu_s / tokens if tokens and cpu_s is not None else None,
            "ttft_ms": ttft, "itl_ms": itl, "deliveries": sum(len(t.deliveries) for t in timings),
            "errors": [t.error or t.finish for t in timings if t.error or t.finish not in ("length", None)]}


def latency_summary(samples: Sequence[float], name: str) -> dict:
    """``{name}_p50`` and ``{name}_p99`` of pooled samples (ms)."""
    return {f"{name}_p50": _pct(samples, 50), f"{name}_p99": _pct(samples, 99)}


# ---------------------------------------------------------------------------------------------
# the in-process wave
# ---------------------------------------------------------------------------------------------
class _Sink:
    """A request's sink: stamps every delivery (decode thread), counts the tokens of the last one."""

    def __init__(self, timing: Timing, done: threading.Event, left: list[int], lock: threading.Lock):
        self.t, self.done, self.left, self.lock = timing, done, left, lock

    def __call__(self, ev: StreamEvent) -> None:
        now = time.perf_counter()
        if ev.text or ev.finish_reason == "length":
            self.t.deliveries.append(now)
        if ev.finish_reason is not None:
            self.t.tokens, self.t.finish, self.t.error = ev.completion_tokens, ev.finish_reason, ev.error
            with self.lock:
                self.left[0] -= 1
                if self.left[0] == 0:
                    self.done.set()


def inprocess_wave(gen: TextGenerator, tasks: Sequence[str | None], prompts: Sequence[list[int]], new_tokens: int,
                   arrivals: Sequence[float] | None = None, timeout_s: float = 1800.0,
                   ignore_eos: bool = True) -> dict:
    """Submit one request per (task, prompt ids) — at once, or at ``arrivals`` offsets — each asking for
    ``new_tokens`` greedy tokens, exactly (EOS ignored) unless ``ignore_eos`` is False (then the task's
    own end rules, as a server applies them); wait for all; :func:`summarize` it (plus the decoder's
    steps over the wave)."""
    params = [gen.params(t, len(ids), max_tokens=new_tokens, temperature=0.0) for t, ids in zip(tasks, prompts)]
    if ignore_eos:
        params = [replace(p, eos_ids=()) for p in params]
    done, left, lock = threading.Event(), [len(prompts)], threading.Lock()
    timings: list[Timing] = []
    reqs = []
    steps0 = gen.stats().get("decode_steps", 0)
    c0 = time.process_time()
    for i in paced(len(prompts), arrivals):
        t = Timing(time.perf_counter())
        timings.append(t)
        reqs.append(gen.submit(tasks[i], prompts[i], params[i], _Sink(t, done, left, lock)))
    if not done.wait(timeout_s):
        raise RuntimeError(f"wave not finished after {timeout_s:.0f} s ({left[0]} requests left)")
    out = summarize(timings, time.process_time() - c0)
    out["decode_steps"] = gen.stats().get("decode_steps", 0) - steps0
    out["outputs"] = [list(r.tokens) for r in reqs]  # not a record field: for comparing methods' answers
    return out


def warm_up(gen: TextGenerator, tasks: Sequence[str | None], prompts: Sequence[list[int]]) -> None:
    """Two tokens for every (task, prompt): slots written, allocators and kernels warm."""
    inprocess_wave(gen, tasks, prompts, 2)
