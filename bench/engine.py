"""Throughput of the serving engine versus the frozen base model, measured in one run.

For a batch spread evenly (round-robin) over T tasks, each method is timed against the base model
in the same process, interleaved (the order rotates every repeat), after warm-up, with
``torch.cuda.synchronize`` around every timed block and the median over ``--repeats`` blocks:

- ``base``      the Engine's own backbone with nothing active (hooks installed, idle) + one task head;
- ``patch``     ``Engine.forward(batch, ids, path="patch")``: patch/forward/restore per task group;
- ``override``  ``Engine.forward(batch, ids, path="override")``: one forward, per-sample row override.

Every method includes one task-head matmul and the copy of the logits to the host (``Engine.forward``
returns CPU logits; ``base`` does the same with one head), so the head counts equally.

Diagnostics (time per batch, not throughput): ``override.plan`` (building the mixed plans for the T
tasks, i.e. ``build_mixed_plan`` for every patchable module, as ``Engine.forward`` does) and
``engine.heads`` (the per-task head loop of ``Engine.forward`` on ready features), with their share
of the ``override`` step; ``switch_ms`` (one whole-task patch + restore) and ``upload_ms`` (one cold
device-cache load of a task: host→device copy + views; CUDA only).

Output: one JSON object per line (stdout, or ``--out FILE.jsonl``) and a table at the end (on stderr
when the JSON goes to stdout).

    python -m bench.engine --smoke                    # CPU, tiny ViT + tiny LLaMA, < 1 min
    python -m bench.engine --model vit                # ViT-B/16, batch 64, bf16, k=2, T=1,4,16,64
    python -m bench.engine --model llama --out llama.jsonl
"""
from __future__ import annotations

import argparse
import gc
import math
import os
import platform
import statistics
import sys
import time
import types
from dataclasses import dataclass
from typing import Any, Callable, Sequence

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")

import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402

if __package__ in (None, ""):  # run as `python bench/<name>.py`: make the repo root importable
    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from bench.records import Records  # noqa: E402
from grft_serve.backbones import Backbone, HFTextBackbone, TimmBackbone  # noqa: E402
from grft_serve.engine import Engine  # noqa: E402
from grft_serve.package import TaskPackage  # noqa: E402
from grft_serve.rowop import ModuleDelta  # noqa: E402
from grft_serve.testing import random_package  # noqa: E402

METHODS = ("base", "patch", "override")
DIAGNOSTICS = ("override.plan", "engine.heads")
DTYPES = {"bf16": torch.bfloat16, "bfloat16": torch.bfloat16, "fp16": torch.float16, "float16": torch.float16,
          "fp32": torch.float32, "float32": torch.float32}


# ---------------------------------------------------------------------------------------------
# models
# ---------------------------------------------------------------------------------------------
@dataclass
class Bench:
    name: str
    backbone: Backbone
    make_batch: Callable[[int, torch.Generator], Any]  # (batch size, generator) -> CPU batch
    shape: dict  # extra facts for the records (seq, image size)


def _vit(smoke: bool, seq: int) -> Bench:
    if smoke:
        bb = TimmBackbone("vit_tiny_patch16_224", weights="random", model_kwargs=dict(img_size=32, patch_size=8, depth=2))
        name, size = "vit_tiny_smoke(img32,p8,depth2)", 32
    else:
        bb = TimmBackbone("vit_base_patch16_224", weights="random")
        name, size = "vit_base_patch16_224", 224

    def make(b: int, g: torch.Generator):
        return torch.randn((b, 3, size, size), generator=g)

    return Bench(name, bb, make, {"image_size": size})


def _llama(smoke: bool, seq: int, device: torch.device) -> Bench:
    from transformers import LlamaConfig, LlamaModel

    if smoke:
        cfg = LlamaConfig(hidden_size=64, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                          intermediate_size=128, vocab_size=256, max_position_embeddings=max(seq, 64))
        name = "llama_tiny_smoke(h64,l2)"
    else:  # LLaMA-3.2-1B shape, random init
        cfg = LlamaConfig(hidden_size=2048, num_hidden_layers=16, num_attention_heads=32, num_key_value_heads=8,
                          intermediate_size=8192, vocab_size=128256, max_position_embeddings=131072,
                          rope_theta=500000.0, tie_word_embeddings=True)
        name = "llama-3.2-1b-shape"
    with torch.device(device):  # random init on the device: seconds instead of a minute on CPU
        model = LlamaModel(cfg)
    # The bench feeds pre-tokenised batches straight to Engine.forward: no tokenizer is needed, but
    # HFTextBackbone's constructor wants one (for preprocess), so give it an inert stand-in.
    tok = types.SimpleNamespace(pad_token="<pad>", eos_token="<pad>", padding_side="right")
    bb = HFTextBackbone(name, pooling="last", max_length=seq, model=model, tokenizer=tok, model_id=f"bench/{name}")
    vocab = cfg.vocab_size

    def make(b: int, g: torch.Generator):
        return {"input_ids": torch.randint(0, vocab, (b, seq), generator=g),
                "attention_mask": torch.ones((b, seq), dtype=torch.long)}

    return Bench(name, bb, make, {"seq": seq})


# ---------------------------------------------------------------------------------------------
# tasks
# ---------------------------------------------------------------------------------------------
def make_packages(engine: Engine, n: int, k: int, n_labels: int = 10, seed: int = 0) -> list[TaskPackage]:
    """``n`` task packages with ``k`` random rows per patchable module.

    The first comes from :func:`grft_serve.testing.random_package`; the others copy its structure with
    fresh random rows and values (random_package reads every full weight, which takes seconds per task
    on a 1B model, and the row values do not change the timings).
    """
    first = random_package(engine.backbone, "t0", k=k, n_labels=n_labels, seed=seed,
                           fingerprint=engine.spec.fingerprint)
    out = [first]
    for i in range(1, n):
        g = torch.Generator().manual_seed(seed + 1000 + i)
        deltas = {}
        for name, d in first.deltas.items():
            n_rows = engine.spec.modules[name].n_slices(d.mode)
            idx = torch.randperm(n_rows, generator=g)[: d.k].sort().values
            vals = d.values + 0.01 * d.values.std() * torch.randn(d.values.shape, generator=g)
            deltas[name] = ModuleDelta(d.mode, idx, vals, d.bias)
        meta = first.meta.model_copy(update={"task_id": f"t{i}", "labels": [f"t{i}-c{j}" for j in range(n_labels)]})
        hw = torch.randn(first.head_weight.shape, generator=g) / first.head_weight.shape[1] ** 0.5
        hb = torch.randn(first.head_bias.shape, generator=g) * 0.1
        out.append(TaskPackage(meta, deltas, hw, hb))
    return out


# ---------------------------------------------------------------------------------------------
# timing
# ---------------------------------------------------------------------------------------------
def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _per_call(fn: Callable[[], Any], iters: int, device: torch.device) -> float:
    """Seconds per call of ``fn`` averaged over ``iters`` calls, synchronised at both ends."""
    _sync(device)
    t0 = time.perf_counter()
    for _ in range(iters):
        fn()
    _sync(device)
    return (time.perf_counter() - t0) / iters


def measure(fns: dict[str, Callable[[], Any]], device: torch.device, repeats: int, warmup: int,
            min_time: float, max_iters: int = 1000) -> dict[str, dict]:
    """Median seconds per call of each fn: warm-up, calibrate iterations per fn so that one timed
    block lasts ~``min_time``, then ``repeats`` rounds in which the fns run interleaved in an order
    that rotates every round (slow drift — clocks, thermals, allocator — hits every method alike)."""
    names = list(fns)
    iters = {}
    for n in names:
        for _ in range(warmup):
            fns[n]()
        one = min(_per_call(fns[n], 1, device) for _ in range(2))
        iters[n] = max(1, min(max_iters, math.ceil(min_time / max(one, 1e-7))))
    times: dict[str, list[float]] = {n: [] for n in names}
    gc.collect()
    gc_was = gc.isenabled()
    gc.disable()
    try:
        for r in range(repeats):
            s = r % len(names)
            for n in names[s:] + names[:s]:
                times[n].append(_per_call(fns[n], iters[n], device))
    finally:
        if gc_was:
            gc.enable()
    return {n: {"s": statistics.median(t), "min": min(t), "max": max(t), "iters": iters[n]}
            for n, t in times.items()}


# ---------------------------------------------------------------------------------------------
# one model
# ---------------------------------------------------------------------------------------------
def bench_model(b: Bench, args, device: torch.device, dtype: torch.dtype, emit: Callable[[dict], None]) -> None:
    batch_size = args.batch or (16 if args.smoke else (64 if b.name.startswith("vit") else 32))
    tasks = [t for t in args.tasks if t <= batch_size]
    for t in args.tasks:
        if t > batch_size:
            print(f"[bench] {b.name}: skipping T={t} > batch {batch_size}", file=sys.stderr)
    engine = Engine(b.backbone, device=device, dtype=dtype, device_cache_bytes=args.device_cache_mb << 20)
    t0 = time.perf_counter()
    pkgs = make_packages(engine, max(tasks), args.k)
    for p in pkgs:
        engine.register(p)
    setup_s = time.perf_counter() - t0
    info = engine.task("t0")
    n_params = sum(p.numel() for p in b.backbone.parameters())
    common = {"model": b.name, "batch": batch_size, "dtype": str(dtype).replace("torch.", ""),
              "device": device.type, "device_name": _device_name(device), "k": args.k,
              "task_params": info.num_params, "task_bytes": info.nbytes, "base_params": n_params,
              "patchable_modules": len(engine.modules), "torch": torch.__version__, **b.shape}
    print(f"[bench] {b.name}: {n_params / 1e6:.1f}M params, {len(engine.modules)} patchable modules, "
          f"{info.num_params} params/task ({100 * info.num_params / n_params:.3f} %), {len(pkgs)} tasks "
          f"registered in {setup_s:.1f}s", file=sys.stderr)

    g = torch.Generator().manual_seed(0)
    batch = Backbone.batch_to(b.make_batch(batch_size, g), device, dtype)  # on the device up front
    head = engine._resident("t0", ["t0"])

    @torch.inference_mode()
    def base():
        feats = engine.backbone(batch)
        return F.linear(feats.to(head.head_w.dtype), head.head_w, head.head_b).float().cpu()

    for T in tasks:
        ids = [f"t{j % T}" for j in range(batch_size)]  # spread evenly over T tasks
        unique = list(dict.fromkeys(ids))
        with engine._lock:
            res = [engine._resident(t, unique) for t in unique]
        sample_task = torch.tensor([int(t[1:]) for t in ids], device=device)
        feats = torch.randn((batch_size, engine.spec.feature_dim), generator=g).to(device, dtype)

        groups = [[j for j, t in enumerate(ids) if t == u] for u in unique]
        parts = [feats.index_select(0, torch.tensor(gr, device=device)) for gr in groups]

        @torch.inference_mode()
        def plan():  # what Engine.forward does before the override forward
            engine.mixed_plans(res, sample_task)
            _sync(device)

        @torch.inference_mode()
        def heads():  # Engine.forward's per-task heads on ready features
            return engine.heads(parts, res, groups)

        fns = {"base": base,
               "patch": lambda: engine.forward(batch, ids, path="patch"),
               "override": lambda: engine.forward(batch, ids, path="override")}
        if not args.no_diagnostics:
            fns["override.plan"] = plan
            fns["engine.heads"] = heads
        res_t = measure(fns, device, args.repeats, args.warmup, args.min_time)
        base_s = res_t["base"]["s"]
        for m in METHODS:
            r = res_t[m]
            emit({**common, "method": m, "tasks": T, "samples_per_s": batch_size / r["s"],
                  "pct_of_base": 100.0 * base_s / r["s"],
                  # ratio of best blocks: less sensitive to a noisy (shared) machine than the median
                  "pct_of_base_best": 100.0 * res_t["base"]["min"] / r["min"],
                  "ms": 1e3 * r["s"], "ms_min": 1e3 * r["min"],
                  "ms_max": 1e3 * r["max"], "iters": r["iters"], "repeats": args.repeats})
        for m in DIAGNOSTICS:
            if m not in res_t:
                continue
            r = res_t[m]
            emit({**common, "method": m, "tasks": T, "samples_per_s": None, "pct_of_base": None,
                  "ms": 1e3 * r["s"], "ms_min": 1e3 * r["min"], "ms_max": 1e3 * r["max"],
                  "share_of_override": r["s"] / res_t["override"]["s"], "iters": r["iters"],
                  "repeats": args.repeats})

    # -- one whole-task patch + restore --------------------------------------------------------
    with engine._lock:
        r0 = engine._resident("t0", ["t0"])

        def switch():
            with engine.patched(r0):
                pass

        sw = measure({"switch": switch}, device, args.repeats, args.warmup, args.min_time)["switch"]
    emit({**common, "method": "switch_ms", "tasks": 1, "samples_per_s": None, "pct_of_base": None,
          "ms": 1e3 * sw["s"], "ms_min": 1e3 * sw["min"], "ms_max": 1e3 * sw["max"], "iters": sw["iters"],
          "repeats": args.repeats, "index_copy_calls": 2 * (len(r0.row_groups) + (r0.bias_patch is not None))})

    # -- one task's cold device-cache load -----------------------------------------------------
    rec = {**common, "method": "upload_ms", "tasks": 1, "samples_per_s": None, "pct_of_base": None}
    if device.type != "cuda":
        emit({**rec, "ms": None, "note": "no device tier on CPU (tasks are served from host memory)"})
    else:
        full, copy = [], []
        host = engine._host["t0"]
        with engine._lock:
            for _ in range(args.warmup + max(args.repeats, 5)):
                engine._drop_device("t0")
                _sync(device)
                t1 = time.perf_counter()
                engine._resident("t0", ["t0"])
                _sync(device)
                full.append(time.perf_counter() - t1)
                t1 = time.perf_counter()
                host.packed.to(device)
                _sync(device)
                copy.append(time.perf_counter() - t1)
        full, copy = full[args.warmup:], copy[args.warmup:]
        c = statistics.median(copy)
        emit({**rec, "ms": 1e3 * statistics.median(full), "ms_min": 1e3 * min(full), "ms_max": 1e3 * max(full),
              "copy_ms": 1e3 * c, "copy_gb_per_s": host.packed.nbytes / c / 1e9, "pinned": host.packed.buf.is_pinned(),
              "repeats": len(full)})
    del engine, batch, head
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()


def _device_name(device: torch.device) -> str:
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    return f"{platform.processor() or platform.machine()} x{torch.get_num_threads()} threads"


# ---------------------------------------------------------------------------------------------
# table
# ---------------------------------------------------------------------------------------------
def render_table(records: Sequence[dict], console) -> None:
    from rich.table import Table

    for model in dict.fromkeys(r["model"] for r in records):
        rs = [r for r in records if r["model"] == model]
        Ts = sorted({r["tasks"] for r in rs if r["method"] in METHODS})
        first = rs[0]
        extra = f" x {first['seq']} tokens" if "seq" in first else ""
        notes = []
        for r in rs:
            if r["method"] == "switch_ms":
                notes.append(f"switch_ms {r['ms']:.3f} (one whole-task patch+restore, "
                             f"{r['index_copy_calls']} index_copy_)")
            if r["method"] == "upload_ms":
                notes.append("upload_ms n/a on CPU" if r["ms"] is None else
                             f"upload_ms {r['ms']:.3f} (cold load of {r['task_bytes'] / 1e3:.0f} KB; "
                             f"copy alone {r['copy_ms']:.3f} ms = {r['copy_gb_per_s']:.1f} GB/s)")
        t = Table(title=f"{model}: batch {first['batch']}{extra}, {first['dtype']}, k={first['k']}, "
                        f"{first['device_name']}",
                  caption="% of base throughput, samples/s; diagnostics: ms per batch, share of override\n"
                          + "; ".join(notes))
        t.add_column("method")
        for T in Ts:
            t.add_column(f"T={T}", justify="right")
        for m in METHODS + DIAGNOSTICS:
            row = {r["tasks"]: r for r in rs if r["method"] == m}
            if not row:
                continue
            cells = []
            for T in Ts:
                r = row.get(T)
                if r is None:
                    cells.append("-")
                elif m in METHODS:
                    sps = r["samples_per_s"]
                    cells.append(f"{r['pct_of_base']:5.1f}% {sps:>8,.0f}" if sps >= 100 else
                                 f"{r['pct_of_base']:5.1f}% {sps:>8.2f}")
                else:
                    cells.append(f"{r['ms']:7.2f}ms {100 * r['share_of_override']:3.0f}%")
            t.add_row(m, *cells)
        console.print(t)


# ---------------------------------------------------------------------------------------------
# CLI
# ---------------------------------------------------------------------------------------------
def _int_list(s: str) -> list[int]:
    return [int(x) for x in s.replace(" ", "").split(",") if x]


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m bench.engine", description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--smoke", action="store_true", help="CPU, tiny ViT + tiny LLaMA, T=1,4,16 (< 1 min)")
    p.add_argument("--model", choices=["vit", "llama", "all"], default="all")
    p.add_argument("--batch", type=int, default=None, help="default: vit 64, llama 32 (smoke: 16)")
    p.add_argument("--seq", type=int, default=None, help="LLaMA tokens per sample (default 128, smoke 16)")
    p.add_argument("--k", type=int, default=2, help="rows per patchable module per task")
    p.add_argument("--dtype", default="auto", help="bf16|fp16|fp32|auto (auto: bf16 on CUDA, fp32 on CPU)")
    p.add_argument("--device", default="auto", help="auto|cpu|cuda|cuda:N (smoke: cpu)")
    p.add_argument("--tasks", type=_int_list, default=None, help="comma list of T (default 1,4,16,64; smoke 1,4,16)")
    p.add_argument("--repeats", type=int, default=None, help="timed rounds per method (median; default 7, smoke 5)")
    p.add_argument("--warmup", type=int, default=None, help="warm-up calls per method (default 3, smoke 1)")
    p.add_argument("--min-time", type=float, default=None,
                   help="seconds per timed block (iterations calibrated; default 0.25, smoke 0.02)")
    p.add_argument("--device-cache-mb", type=int, default=1024)
    p.add_argument("--no-diagnostics", action="store_true", help="skip override.plan / engine.heads")
    p.add_argument("--threads", type=int, default=None, help="torch CPU threads (smoke default 1)")
    p.add_argument("--out", default=None, help="write JSON lines here (default: stdout)")
    a = p.parse_args(argv)
    a.tasks = a.tasks or ([1, 4, 16] if a.smoke else [1, 4, 16, 64])
    a.repeats = a.repeats or (5 if a.smoke else 7)
    a.warmup = a.warmup if a.warmup is not None else (1 if a.smoke else 3)
    a.min_time = a.min_time if a.min_time is not None else (0.02 if a.smoke else 0.25)
    a.seq = a.seq or (16 if a.smoke else 128)
    if any(t < 1 for t in a.tasks):
        p.error("--tasks must be positive")
    return a


def main(argv: Sequence[str] | None = None) -> list[dict]:
    args = parse_args(argv)
    from rich.console import Console

    threads_before = torch.get_num_threads()
    if args.threads or args.smoke:  # smoke: 1 thread is steadier on a small shared CPU
        torch.set_num_threads(args.threads or 1)
    if args.device == "auto":
        device = torch.device("cpu" if args.smoke or not torch.cuda.is_available() else "cuda")
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
            b = _vit(args.smoke, args.seq) if which == "vit" else _llama(args.smoke, args.seq, device)
            bench_model(b, args, device, dtype, emit)
            del b
    finally:
        out.close()
        torch.set_num_threads(threads_before)  # main() may run inside another process (tests)
    render_table(records, Console(stderr=not out.to_file))
    return records


if __name__ == "__main__":
    main()
