"""The many-tasks case of the engine benchmark: N (default 10,000) tasks registered on one engine.

Reports, in one run:

- ``many.register``: seconds per ``Engine.register`` (validate + pack into the host tier), averaged
  over the N registrations (package generation excluded);
- ``many.host``: host-tier bytes per task and the process RSS growth per task, both as ratios of the
  package bytes (the goal is ≤ 1.5×);
- ``many.mixed``: latency of a mixed batch whose T tasks are drawn at random from ALL N tasks (device
  tier and slot misses included) against the same batch drawn from only 10 tasks, interleaved, median
  over ``--many-batches`` batches each.
"""
from __future__ import annotations

import gc
import random
import statistics
import time
from typing import Any, Callable

import torch

from bench.engine_tasks import variant
from grft_serve.core.package import TaskPackage, package_bytes
from grft_serve.engine import Engine

__all__ = ["bench_many"]


def _rss() -> int:
    import psutil

    return psutil.Process().memory_info().rss


def bench_many(engine: Engine, first: TaskPackage, batch: Any, batch_size: int, T: int, n: int, n_batches: int,
               common: dict, emit: Callable[[dict], None], sync: Callable[[], None],
               clock: Callable[[], float] = time.perf_counter) -> None:
    """Register ``n`` variants of ``first`` and time mixed batches over ``T`` of them (``clock``: the
    timer, e.g. ``time.thread_time`` on a shared CPU)."""
    g = torch.Generator().manual_seed(123)
    gc.collect()
    rss0, host0 = _rss(), engine.cache.nbytes("host")
    reg_s, pkg_bytes = 0.0, 0
    for i in range(n):
        data = package_bytes(variant(first, engine, f"m{i}", g))
        pkg_bytes += len(data)
        t0 = clock()
        engine.register(data)
        reg_s += clock() - t0
    gc.collect()
    host = engine.cache.nbytes("host") - host0
    rss = _rss() - rss0
    rec = {**common, "tasks": n, "samples_per_s": None, "pct_of_base": None}
    emit({**rec, "method": "many.register", "ms": 1e3 * reg_s / n, "registered": n})
    emit({**rec, "method": "many.host", "ms": None, "package_bytes_per_task": pkg_bytes / n,
          "host_bytes_per_task": host / n, "host_over_package": host / pkg_bytes,
          "rss_bytes_per_task": rss / n, "rss_over_package": rss / pkg_bytes})

    rng = random.Random(0)
    few = [f"m{i}" for i in range(10)]
    everyone = [f"m{i}" for i in range(n)]

    def ids(pool):
        tasks = rng.sample(pool, min(T, len(pool)))
        return [tasks[j % len(tasks)] for j in range(batch_size)]

    times: dict[str, list[float]] = {"few": [], "all": []}
    reports: dict[str, list] = {"few": [], "all": []}
    engine.run(batch, ids(few), path="override")  # warm-up
    for r in range(n_batches):
        for which in (("few", "all") if r % 2 == 0 else ("all", "few")):
            tids = ids(few if which == "few" else everyone)
            sync()
            t0 = clock()
            res = engine.run(batch, tids, path="override")
            sync()
            times[which].append(clock() - t0)
            reports[which].append(res.report)
    few_s, all_s = statistics.median(times["few"]), statistics.median(times["all"])
    emit({**rec, "method": "many.mixed", "ms": 1e3 * all_s, "ms_10_tasks": 1e3 * few_s,
          "ratio_to_10_tasks": all_s / few_s, "batch_tasks": T, "repeats": n_batches,
          "slot_loads_per_batch": statistics.mean(x.slot_loads for x in reports["all"]),
          "cache_misses_per_batch": statistics.mean(x.cache_misses for x in reports["all"])})
