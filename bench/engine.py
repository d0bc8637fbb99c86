"""Throughput of the serving engine versus the frozen base model, measured in one run.

For a batch spread evenly (round-robin) over T tasks, each method is timed against the base model
in the same process, interleaved (the order rotates every repeat), after warm-up, with
``torch.cuda.synchronize`` around every timed block and the median over ``--repeats`` blocks:

- ``base``      the Engine's own backbone with nothing active (hooks installed, idle) + one task head;
- ``patch``     ``Engine.forward(batch, ids, path="patch")``: patch/forward/restore per task group;
- ``override``  ``Engine.forward(batch, ids, path="override")``: one forward, per-sample rows from the
  slot tables;
- ``peft-lora`` (peer, k = first ``--k`` only) PEFT LoRA with T adapters of matched parameter count on
  a copy of the same backbone, serving the same mixed batch through ``adapter_names``.

Every method includes one task-head matmul and the copy of the logits to the host.

Diagnostics (time per batch, not throughput): ``override.plan`` (the per-batch work before the
override forward: slot lookup, sample → slot index, per-module plans — ``OverridePath.prepare``) and
``engine.heads`` (the override path's heads: one ``bmm`` from the slot tables), with their share of
the ``override`` step;
``switch_ms`` (one whole-task patch + restore) and ``upload_ms`` (one cold device-tier load of a task:
host→device copy + views; CUDA only). ``--many N`` adds the N-task case (:mod:`bench.engine_scale`).

Output: one JSON object per line (stdout, or ``--out FILE.jsonl``) and a table at the end (on stderr
when the JSON goes to stdout).

    python -m bench.engine --smoke                    # CPU, tiny ViT + tiny LLaMA, < 1 min
    python -m bench.engine --cpu                      # CPU mid-size: ViT-S/16 224px b16, LLaMA h512 l4 b16x64,
                                                      #   k=2 and 26, PEFT peer, 10,000 tasks (~3 min)
    python -m bench.engine --model vit                # ViT-B/16, batch 64, bf16, k=2, T=1,4,16,64
    python -m bench.engine --model llama --k 2,26 --out llama.jsonl
"""
from __future__ import annotations

import argparse
import copy
import gc
import math
import os
import platform
import statistics
import sys
import time
from typing import Any, Callable, Sequence

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")

import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402

if __package__ in (None, ""):  # run as `python bench/<name>.py`: make the repo root importable
    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from bench.engine_models import Bench, llama_bench, vit_bench  # noqa: E402
from bench.engine_peft import peft_forward  # noqa: E402
from bench.engine_scale import bench_many  # noqa: E402
from bench.engine_table import DIAGNOSTICS, METHODS, render_table  # noqa: E402
from bench.engine_tasks import make_packages  # noqa: E402
from bench.records import Records  # noqa: E402
from grft_serve.core.backbones import Backbone  # noqa: E402
from grft_serve.engine import Engine  # noqa: E402

__all__ = ["bench_model", "main", "measure", "parse_args"]

DTYPES = {"bf16": torch.bfloat16, "bfloat16": torch.bfloat16, "fp16": torch.float16, "float16": torch.float16,
          "fp32": torch.float32, "float32": torch.float32}


# ---------------------------------------------------------------------------------------------
# timing
# ---------------------------------------------------------------------------------------------
def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


_CLOCKS = {"wall": time.perf_counter, "cpu": time.thread_time}


def _per_call(fn: Callable[[], Any], iters: int, device: torch.device, clock: str = "wall") -> float:
    """Seconds per call of ``fn`` averaged over ``iters`` calls, synchronised at both ends. ``clock``:
    "wall", or "cpu" — the calling thread's CPU time, which other processes on a shared machine do
    not inflate (valid on CPU with ONE torch thread: all the work runs in this thread)."""
    now = _CLOCKS[clock]
    _sync(device)
    t0 = now()
    for _ in range(iters):
        fn()
    _sync(device)
    return (now() - t0) / iters


def measure(fns: dict[str, Callable[[], Any]], device: torch.device, repeats: int, warmup: int,
            min_time: float, max_iters: int = 1000, clock: str = "wall") -> dict[str, dict]:
    """Median seconds per call of each fn: warm-up, calibrate iterations per fn so that one timed
    block lasts ~``min_time``, then ``repeats`` rounds in which the fns run interleaved in an order
    that rotates every round (slow drift — clocks, thermals, allocator — hits every method alike)."""
    names = list(fns)
    iters = {}
    for n in names:
        for _ in range(warmup):
            fns[n]()
        if min_time <= 0:  # one call per timed block: no calibration runs
            iters[n] = 1
            continue
        one = min(_per_call(fns[n], 1, device, clock) for _ in range(2))
        iters[n] = max(1, min(max_iters, math.ceil(min_time / max(one, 1e-7))))
    times: dict[str, list[float]] = {n: [] for n in names}
    gc.collect()
    gc_was = gc.isenabled()
    gc.disable()
    try:
        for r in range(repeats):
            s = r % len(names)
            for n in names[s:] + names[:s]:
                times[n].append(_per_call(fns[n], iters[n], device, clock))
    finally:
        if gc_was:
            gc.enable()
    return {n: {"s": statistics.median(t), "min": min(t), "max": max(t), "iters": iters[n]}
            for n, t in times.items()}


# ---------------------------------------------------------------------------------------------
# one model
# ---------------------------------------------------------------------------------------------
def bench_model(b: Bench, args, device: torch.device, dtype: torch.dtype, emit: Callable[[dict], None]) -> None:
    batch_size = args.batch or (16 if args.smoke or args.cpu else (64 if b.kind == "vit" else 32))
    tasks = [t for t in args.tasks if t <= batch_size]
    for t in args.tasks:
        if t > batch_size:
            print(f"[bench] {b.name}: skipping T={t} > batch {batch_size}", file=sys.stderr)
    raw = copy.deepcopy(b.backbone) if args.peft else None  # PEFT's copy, before the engine re-homes weights
    engine = Engine(b.backbone, device=device, dtype=dtype, device_cache_bytes=args.device_cache_mb << 20,
                    graphs=args.graphs)
    n_params = sum(p.numel() for p in b.backbone.parameters())
    g = torch.Generator().manual_seed(0)
    batch = Backbone.batch_to(b.make_batch(batch_size, g), device, dtype)  # on the device up front
    feats = torch.randn((batch_size, engine.spec.feature_dim), generator=g).to(device, dtype)
    first_pkg = None
    for ki, k in enumerate(args.k):
        k_tasks = tasks if ki == 0 else [t for t in (args.later_k_tasks or tasks) if t <= batch_size]
        t0 = time.perf_counter()
        pkgs = make_packages(engine, max(k_tasks), k, prefix=f"k{k}t")
        for p in pkgs:
            engine.register(p)
        first_pkg = first_pkg or pkgs[0]
        info = engine.task(f"k{k}t0")
        common = {"model": b.name, "batch": batch_size, "dtype": str(dtype).replace("torch.", ""),
                  "device": device.type, "device_name": _device_name(device), "k": k,
                  "task_params": info.num_params, "task_bytes": info.nbytes, "base_params": n_params,
                  "graphs": args.graphs, "clock": args.clock,
                  "patchable_modules": len(engine.modules), "torch": torch.__version__, **b.shape}
        print(f"[bench] {b.name} k={k}: {n_params / 1e6:.1f}M params, {len(engine.modules)} patchable modules, "
              f"{info.num_params} params/task ({100 * info.num_params / n_params:.3f} %), {len(pkgs)} tasks "
              f"registered in {time.perf_counter() - t0:.1f}s", file=sys.stderr)
        for T in k_tasks:
            _bench_T(engine, b, raw if ki == 0 else None, batch, feats, batch_size, k, T, args, device, dtype,
                     common, emit)
        if ki == 0:
            _switch_and_upload(engine, f"k{k}t0", args, device, common, emit)
    if args.many and args.many_model in ("all", b.kind):
        common = {"model": b.name, "batch": batch_size, "dtype": str(dtype).replace("torch.", ""),
                  "device": device.type, "device_name": _device_name(device), "k": args.k[0],
                  "torch": torch.__version__, **b.shape}
        bench_many(engine, first_pkg, batch, batch_size, max(tasks), args.many, args.many_batches,
                   {**common, "clock": args.clock}, emit, lambda: _sync(device), _CLOCKS[args.clock])
    del engine, batch, raw
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()


def _bench_T(engine: Engine, b: Bench, raw, batch, feats, batch_size: int, k: int, T: int, args, device, dtype,
             common: dict, emit: Callable[[dict], None]) -> None:
    """base / patch / override (/ peft-lora) and the diagnostics for a batch over T tasks."""
    ids = [f"k{k}t{j % T}" for j in range(batch_size)]  # spread evenly over T tasks
    unique = list(dict.fromkeys(ids))
    pos = [unique.index(t) for t in ids]
    with engine.cache.use(unique) as (res, _):  # held for the measurement: nothing of T is evicted
        head = res[0]
        plan0 = engine.override.prepare(unique, res, pos)

        @torch.inference_mode()
        def base():
            f = engine.backbone(batch)
            return F.linear(f.to(head.head_w.dtype), head.head_w, head.head_b).float().cpu()

        @torch.inference_mode()
        def plan():  # what Engine.run does before the override forward
            engine.override.prepare(unique, res, pos)
            _sync(device)

        @torch.inference_mode()
        def heads():  # the override path's heads (from the slot tables) on ready features
            return engine.slots.heads(feats, plan0.slot, plan0.sample_slot)

        fns = {"base": base,
               "patch": lambda: engine.forward(batch, ids, path="patch"),
               "override": lambda: engine.forward(batch, ids, path="override")}
        extra = {}
        if raw is not None:
            hw, hb = head.head_w, head.head_b
            fn, extra = peft_forward(b.kind, raw.net, T, k, device, dtype,
                                     lambda f: F.linear(f.to(hw.dtype), hw, hb).float().cpu())
            names = [f"a{int(t.rsplit('t', 1)[1])}" for t in ids]
            fns["peft-lora"] = torch.inference_mode()(lambda: fn(batch, names))
        if not args.no_diagnostics:
            fns["override.plan"] = plan
            fns["engine.heads"] = heads
        res_t = measure(fns, device, args.repeats, args.warmup, args.min_time, clock=args.clock)
    base_s = res_t["base"]["s"]
    for m in METHODS:
        if m not in res_t:
            continue
        r = res_t[m]
        emit({**common, "method": m, "tasks": T, "samples_per_s": batch_size / r["s"],
              "pct_of_base": 100.0 * base_s / r["s"],
              # ratio of best blocks: less sensitive to a noisy (shared) machine than the median
              "pct_of_base_best": 100.0 * res_t["base"]["min"] / r["min"],
              "ms": 1e3 * r["s"], "ms_min": 1e3 * r["min"], "ms_max": 1e3 * r["max"], "iters": r["iters"],
              "repeats": args.repeats, **(extra if m == "peft-lora" else {})})
    for m in DIAGNOSTICS:
        if m not in res_t:
            continue
        r = res_t[m]
        emit({**common, "method": m, "tasks": T, "samples_per_s": None, "pct_of_base": None,
              "ms": 1e3 * r["s"], "ms_min": 1e3 * r["min"], "ms_max": 1e3 * r["max"],
              "share_of_override": r["s"] / res_t["override"]["s"], "iters": r["iters"], "repeats": args.repeats})


def _switch_and_upload(engine: Engine, tid: str, args, device, common: dict, emit: Callable[[dict], None]) -> None:
    # -- one whole-task patch + restore --------------------------------------------------------
    with engine.cache.use([tid]) as ([r0], _):
        def switch():
            with engine.flat.patched(r0):
                pass

        sw = measure({"switch": switch}, device, args.repeats, args.warmup, args.min_time,
                     clock=args.clock)["switch"]
        calls = 2 * (len(r0.row_groups) + (r0.bias_patch is not None))
    emit({**common, "method": "switch_ms", "tasks": 1, "samples_per_s": None, "pct_of_base": None,
          "ms": 1e3 * sw["s"], "ms_min": 1e3 * sw["min"], "ms_max": 1e3 * sw["max"], "iters": sw["iters"],
          "repeats": args.repeats, "index_copy_calls": calls})

    # -- one task's cold device-tier load ------------------------------------------------------
    rec = {**common, "method": "upload_ms", "tasks": 1, "samples_per_s": None, "pct_of_base": None}
    if device.type != "cuda":
        emit({**rec, "ms": None, "note": "no device copy on CPU (the device tier shares the host buffer)"})
        return
    full, copies = [], []
    cap = engine.cache.capacity("device")
    host = engine.cache.host_value(tid)
    for _ in range(args.warmup + max(args.repeats, 5)):
        engine.cache.resize(device_bytes=0)  # evict everything not pinned
        engine.cache.resize(device_bytes=cap)
        _sync(device)
        t1 = time.perf_counter()
        with engine.cache.use([tid]):
            pass
        _sync(device)
        full.append(time.perf_counter() - t1)
        t1 = time.perf_counter()
        host.buf.to(device, non_blocking=True)
        _sync(device)
        copies.append(time.perf_counter() - t1)
    full, copies = full[args.warmup:], copies[args.warmup:]
    c = statistics.median(copies)
    emit({**rec, "ms": 1e3 * statistics.median(full), "ms_min": 1e3 * min(full), "ms_max": 1e3 * max(full),
          "copy_ms": 1e3 * c, "copy_gb_per_s": host.nbytes / c / 1e9, "pinned": host.buf.is_pinned(),
          "repeats": len(full)})


def _device_name(device: torch.device) -> str:
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    return f"{platform.processor() or platform.machine()} x{torch.get_num_threads()} threads"


# ---------------------------------------------------------------------------------------------
# CLI
# ---------------------------------------------------------------------------------------------
def _int_list(s: str) -> list[int]:
    return [int(x) for x in s.replace(" ", "").split(",") if x]


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m bench.engine", description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--smoke", action="store_true", help="CPU, tiny ViT + tiny LLaMA, T=1,4,16 (< 1 min)")
    p.add_argument("--cpu", action="store_true",
                   help="CPU mid-size: ViT-S/16 224px batch 16, LLaMA h512 l4 batch 16x64, T=1,4,16, k=2 and "
                        "26 (k=26 at T=16), PEFT peer, 10,000 tasks")
    p.add_argument("--model", choices=["vit", "llama", "all"], default="all")
    p.add_argument("--batch", type=int, default=None, help="default: vit 64, llama 32 (smoke, cpu: 16)")
    p.add_argument("--seq", type=int, default=None, help="LLaMA tokens per sample (default 128, cpu 64, smoke 16)")
    p.add_argument("--k", type=_int_list, default=None, help="rows per patchable module per task, comma list "
                                                             "(default 2; cpu 2,26)")
    p.add_argument("--later-k-tasks", type=_int_list, default=None,
                   help="T values for the k after the first (default: --tasks; cpu: the largest T)")
    p.add_argument("--dtype", default="auto", help="bf16|fp16|fp32|auto (auto: bf16 on CUDA, fp32 on CPU)")
    p.add_argument("--device", default="auto", help="auto|cpu|cuda|cuda:N (smoke, cpu: cpu)")
    p.add_argument("--tasks", type=_int_list, default=None,
                   help="comma list of T (default 1,4,16,64; smoke, cpu 1,4,16)")
    p.add_argument("--repeats", type=int, default=None, help="timed rounds per method (median; default 7, "
                                                             "smoke 5, cpu 3)")
    p.add_argument("--warmup", type=int, default=None, help="warm-up calls per method (default 3, smoke/cpu 1)")
    p.add_argument("--min-time", type=float, default=None,
                   help="seconds per timed block (iterations calibrated; default 0.25, smoke 0.02, cpu 0)")
    p.add_argument("--peft", action=argparse.BooleanOptionalAction, default=None,
                   help="PEFT LoRA peer row at the first k (default on; off in --smoke)")
    p.add_argument("--many", type=int, default=None, help="register this many tasks and time mixed batches "
                                                          "drawn from all of them (cpu: 10000; default 0)")
    p.add_argument("--many-batches", type=int, default=None, help="batches per side for --many (default 5)")
    p.add_argument("--many-model", choices=["vit", "llama", "all"], default="llama",
                   help="which model gets the --many case (default llama)")
    p.add_argument("--graphs", action="store_true",
                   help="Engine(graphs=True): CUDA graphs per (path, batch bucket); on CPU the same code runs eagerly")
    p.add_argument("--clock", choices=["wall", "cpu"], default=None,
                   help="time per call: wall clock, or the serving thread's CPU time (robust on a shared "
                        "machine; CPU with one torch thread only). Default: cpu for --cpu/--smoke, else wall")
    p.add_argument("--device-cache-mb", type=int, default=1024)
    p.add_argument("--no-diagnostics", action="store_true", help="skip override.plan / engine.heads")
    p.add_argument("--threads", type=int, default=None, help="torch CPU threads (smoke/cpu default 1)")
    p.add_argument("--out", default=None, help="write JSON lines here (default: stdout)")
    a = p.parse_args(argv)
    small = a.smoke or a.cpu
    a.tasks = a.tasks or ([1, 4, 16] if small else [1, 4, 16, 64])
    a.k = a.k or ([2, 26] if a.cpu else [2])
    a.later_k_tasks = a.later_k_tasks or ([max(a.tasks)] if a.cpu else None)
    a.repeats = a.repeats or (3 if a.cpu else 5 if a.smoke else 7)
    a.warmup = a.warmup if a.warmup is not None else (1 if small else 3)
    a.min_time = a.min_time if a.min_time is not None else (0.0 if a.cpu else 0.02 if a.smoke else 0.25)
    a.seq = a.seq or (16 if a.smoke else 64 if a.cpu else 128)
    a.peft = (not a.smoke) if a.peft is None else a.peft
    a.many = a.many if a.many is not None else (10000 if a.cpu else 0)
    a.many_batches = a.many_batches or 5
    a.size = "smoke" if a.smoke else "cpu" if a.cpu else "full"
    a.clock = a.clock or ("cpu" if small and (a.threads or 1) == 1 else "wall")
    if a.clock == "cpu" and (a.threads or 1) != 1:
        p.error("--clock cpu needs one torch thread (--threads 1)")
    if any(t < 1 for t in a.tasks) or any(k < 1 for k in a.k):
        p.error("--tasks and --k must be positive")
    return a


def main(argv: Sequence[str] | None = None) -> list[dict]:
    args = parse_args(argv)
    from rich.console import Console

    threads_before = torch.get_num_threads()
    if args.threads or args.smoke or args.cpu:  # 1 thread is steadier on a small shared CPU
        torch.set_num_threads(args.threads or 1)
    if args.device == "auto":
        device = torch.device("cpu" if args.smoke or args.cpu or not torch.cuda.is_available() else "cuda")
    else:
        device = torch.device(args.device)
    if device.type == "cuda" and device.index is None:
        device = torch.device("cuda", torch.cuda.current_device())
    if args.dtype == "auto":
        dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    else:
        dtype = DTYPES[args.dtype.lower()]
    if device.type == "cuda":
        torch.backends.cuda.matmul.allow_tf32 = True
        torch.backends.cudnn.allow_tf32 = True

    out = Records(args.out)
    records, emit = out.items, out.emit

    try:
        for which in (["vit", "llama"] if args.model == "all" else [args.model]):
            torch.manual_seed(0)
            b = vit_bench(args.size) if which == "vit" else llama_bench(args.size, args.seq, device)
            bench_model(b, args, device, dtype, emit)
            del b
    finally:
        out.close()
        torch.set_num_threads(threads_before)  # main() may run inside another process (tests)
    render_table(records, Console(stderr=not out.to_file))
    return records


if __name__ == "__main__":
    main()
