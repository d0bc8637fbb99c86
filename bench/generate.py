"""Generation throughput and latency of the decode loop with many tasks mixed, measured in one run.

One engine on a causal LM base (default: SmolLM2-135M-Instruct from the zoo, fp32, CPU) with random
GRFT generation tasks (``--k`` rows on every patchable linear, like a trained task) serves waves of
``--requests`` R chat requests of the same prompt length, each asking for exactly ``--new-tokens`` M
greedy tokens (EOS ignored), through :class:`~grft_serve.engine.TextGenerator`
(:mod:`bench.gen_workload`). Methods, on the SAME engine and decoder:

- ``base``: no task (every request on the base model);
- ``tasks=T``: requests spread round-robin over T tasks (``--tasks``, default 1, 4, 16);
- ``tasks=T no-keep`` (largest T): the same, with the decode loop's kept gathers off
  (``DecodeSlots.keep_bytes = 0``: plans and per-token gathers made afresh at every step) — the
  engine as it was before it kept them; its answers must equal ``tasks=T``'s token for token;
- both decoders (``--decoders``): ``continuous`` (transformers' continuous batching, per-token
  override) and ``padded`` (static left-padded batches, per-sample override);
- ``peft`` (``--peft``): the PEFT LoRA peer (:mod:`bench.gen_peft`): HF ``generate`` on a copy of the
  base — ``hf-generate base`` — and with T LoRA adapters of matched parameters mixed through
  ``adapter_names`` — ``peft-lora tasks=T``.

Workloads: ``burst`` (all R requests at once) and ``staggered`` (seeded Poisson arrivals with mean gap
``--interval``, for base and the largest T: continuous batching admits a request at the next step,
a static batch only when the running one ends — time to first token shows it).

Figures per wave (:func:`bench.gen_workload.summarize`): output tokens/s (wall), TTFT p50/p99,
inter-token latency p50/p99 (from the delivery time of every streamed event), CPU ms per output token
(process CPU time, one torch thread: robust on a shared machine). Every method runs once per round,
interleaved with the others (the order rotates each round; a fresh generator per decoder and
round, warmed up); ``--rounds`` rounds. Ratios are per round against the baseline of the same round,
then the median over rounds: ``pct_of_base`` (tokens/s vs the same decoder's ``base``),
``pct_of_base_cpu`` (CPU per token, base / method), ``x_peft`` (GRFT tasks=T / PEFT tasks=T
tokens/s), ``x_no_keep`` (tasks=T / tasks=T no-keep), ``x_padded`` (continuous / padded).

``--http`` measures instead HTTP streaming against in-process on the same config: grft-serve on a
local Ray at 127.0.0.1 (:mod:`bench.gen_http`) with the same decoder options and the same tasks,
registered through ``POST /v1/tasks``; each round one in-process wave and one wave of streamed
``/v1/chat/completions`` calls (the official ``openai`` client, one thread per request), for the largest
T; ``pct_of_base`` is then HTTP tokens/s as a % of in-process.

``--device cuda`` (``--dtype``, default bf16 there) runs the same on a GPU.

Output: JSON lines (``--out``, default bench/results/generate_<device>.jsonl; stdout for --smoke) and a
markdown table (:mod:`bench.gen_table`; ``--table FILE`` writes it too).

    python -m bench.generate                       # CPU: R=16, M=32, T=1,4,16, 3 rounds, PEFT (~15 min)
    python -m bench.generate --smoke               # tiny: R=4, M=4, T=1,4, 1 round (< 1 min + model load)
    python -m bench.generate --http                # HTTP streaming vs in-process (generate_http_cpu.jsonl)
    python -m bench.generate --model path/to/hf_causal_lm --decoders continuous --no-peft
"""
from __future__ import annotations

import argparse
import copy
import os
import platform
import sys
import time
from pathlib import Path
from typing import Sequence

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

ROOT = Path(__file__).resolve().parent.parent
if __package__ in (None, ""):  # run as `python bench/generate.py`: make the repo root importable
    sys.path.insert(0, str(ROOT))

import torch  # noqa: E402

from bench.gen_peft import generate_wave, lora_lm  # noqa: E402
from bench.gen_records import make_records, round_view  # noqa: E402
from bench.gen_table import markdown_table  # noqa: E402
from bench.gen_workload import (  # noqa: E402
    arrival_offsets,
    chat_messages,
    generation_packages,
    inprocess_wave,
    task_mix,
    warm_up,
)
from bench.records import Records  # noqa: E402
from grft_serve.core import package as P  # noqa: E402
from grft_serve.core.generation import chat_ids  # noqa: E402
from grft_serve.engine import DECODERS, Engine, TextGenerator  # noqa: E402
from grft_serve.engine.decode_slots import DEFAULT_KEEP_BYTES  # noqa: E402

__all__ = ["main", "parse_args"]

WORKLOADS = ("burst", "staggered")
DTYPES = {"auto": None, "fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}


# ---------------------------------------------------------------------------------------------
# setup
# ---------------------------------------------------------------------------------------------
def load_base(model: str, context: int | None):
    """``zoo:<name>`` (a zoo causal LM) or a local transformers causal-LM directory."""
    from grft_serve.core.backbones import zoo
    from grft_serve.core.backbones.causal import CausalLMBackbone

    if model.startswith("zoo:"):
        return zoo.load(model[4:], max_length=context)
    if not Path(model).is_dir():
        raise SystemExit(f"bench/generate.py: --model {model!r} is neither zoo:<name> nor a directory")
    return CausalLMBackbone(model, max_length=context).eval()


def _methods(args) -> list[tuple[str, str, int, bool]]:
    """(workload, method, tasks, keep gathers) of one decoder's round, in run order before rotation."""
    big = max(args.tasks)
    burst = [("burst", "base", 0, True)] + [("burst", f"tasks={t}", t, True) for t in args.tasks]
    burst.append(("burst", f"tasks={big} no-keep", big, False))
    stag = [("staggered", "base", 0, True), ("staggered", f"tasks={big}", big, True)]
    return [m for m in burst + stag if m[0] in args.workloads]


# ---------------------------------------------------------------------------------------------
# one round
# ---------------------------------------------------------------------------------------------
def _decoder_round(engine, decoder: str, rnd: int, args, task_ids: list[str], prompts: list[list[int]]) -> dict:
    """Every method of ``decoder`` once (rotated order): {(workload, method): wave result}."""
    big = max(args.tasks)
    gen = TextGenerator(engine, decoder, max_tasks_per_batch=big, max_requests=args.requests,
                        max_batch_tokens=max(512, args.requests * max(map(len, prompts))),
                        kv_cache_tokens=args.requests * args.context, page_size=32)
    out = {}
    try:
        warm_up(gen, task_mix(task_ids, big, args.requests), prompts)
        warm_up(gen, [None] * args.requests, prompts)
        methods = _methods(args)
        s = rnd % len(methods)
        arrivals = arrival_offsets(args.requests, args.interval, args.seed + rnd)
        for workload, name, T, keep in methods[s:] + methods[:s]:
            gen.slots.keep_bytes = args.keep_bytes if keep else 0
            load = os.getloadavg()[0]
            res = inprocess_wave(gen, task_mix(task_ids, T, args.requests), prompts, args.new_tokens,
                                 arrivals if workload == "staggered" else None)
            out[(workload, name)] = {**res, "loadavg_1m": load, "tasks": T, "keep_gathers": keep}
            print(f"[bench] round {rnd} {decoder:10s} {workload:9s} {name:18s} {res['tokens_per_s']:7.1f} tok/s "
                  f"cpu {res['cpu_ms_per_token']:6.1f} ms/tok  load {load:.1f}", file=sys.stderr)
    finally:
        gen.close()
    return out


def _peft_round(plain, pm, rnd: int, args, prompts: list[list[int]], pad_id: int) -> dict:
    """HF generate without adapters and PEFT with T adapters mixed, burst only (rotated order)."""
    big = max(args.tasks)
    names = [f"a{i % big}" for i in range(args.requests)]
    runs = [("base", lambda: generate_wave(plain, prompts, args.new_tokens, pad_id)),
            (f"tasks={big}", lambda: generate_wave(pm, prompts, args.new_tokens, pad_id, names))]
    out = {}
    for name, fn in (runs[1:] + runs[:1]) if rnd % 2 else runs:
        load = os.getloadavg()[0]
        res = fn()
        out[("burst", name)] = {**res, "loadavg_1m": load, "tasks": 0 if name == "base" else big, "keep_gathers": None}
        print(f"[bench] round {rnd} {'hf-generate':10s} {'burst':9s} {name:18s} {res['tokens_per_s']:7.1f} tok/s "
              f"cpu {res['cpu_ms_per_token']:6.1f} ms/tok  load {load:.1f}", file=sys.stderr)
    return out


# ---------------------------------------------------------------------------------------------
# CLI
# ---------------------------------------------------------------------------------------------
def _int_list(s: str) -> list[int]:
    return [int(x) for x in s.replace(" ", "").split(",") if x]


def _str_list(s: str) -> list[str]:
    return [x for x in s.replace(" ", "").split(",") if x]


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m bench.generate", description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--smoke", action="store_true", help="R=4, M=4, T=1,4, one round (a test runs it on a tiny LM)")
    p.add_argument("--model", default="zoo:smollm2_lm", help="zoo:<name> or a local transformers causal-LM directory")
    p.add_argument("--requests", type=int, default=None, help="R: requests per wave (default 16, smoke 4)")
    p.add_argument("--new-tokens", type=int, default=None, help="M: tokens per request, EOS ignored (default 32, "
                                                                "smoke 4)")
    p.add_argument("--tasks", type=_int_list, default=None, help="T values, comma list (default 1,4,16; smoke 1,4)")
    p.add_argument("--k", type=int, default=2, help="rows per patchable linear of each random task")
    p.add_argument("--rounds", type=int, default=None, help="rounds of every method (default 3, smoke 1)")
    p.add_argument("--decoders", type=_str_list, default=list(DECODERS), help="comma list: continuous,padded")
    p.add_argument("--workloads", type=_str_list, default=list(WORKLOADS), help="comma list: burst,staggered")
    p.add_argument("--interval", type=float, default=None,
                   help="staggered: mean seconds between arrivals (Poisson; default 0.25, smoke 0.02)")
    p.add_argument("--peft", action=argparse.BooleanOptionalAction, default=True,
                   help="the PEFT LoRA mixed-adapter generate peer (default on)")
    p.add_argument("--keep-bytes", type=int, default=None,
                   help="DecodeSlots.keep_bytes of the keeping methods (default: the engine's)")
    p.add_argument("--context", type=int, default=None, help="context of the base (default: prompt + M, rounded "
                                                             "up to 64)")
    p.add_argument("--http", action="store_true",
                   help="instead: HTTP streaming (the app on a local Ray, the openai client) vs in-process, same "
                        "config (first of --decoders, largest T)")
    p.add_argument("--device", default="cpu", help="cpu|cuda|cuda:N|auto (default cpu)")
    p.add_argument("--dtype", default="auto", choices=sorted(DTYPES),
                   help="weights' dtype (auto: bf16 on CUDA, fp32 on CPU)")
    p.add_argument("--threads", type=int, default=1, help="torch CPU threads (default 1)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", default=None, help="JSON lines (default bench/results/generate_<device>.jsonl, --http: "
                                               "generate_http_<device>.jsonl; smoke: stdout)")
    p.add_argument("--table", default=None, help="also write the markdown table to this file")
    a = p.parse_args(argv)
    a.requests = a.requests or (4 if a.smoke else 16)
    a.new_tokens = a.new_tokens or (4 if a.smoke else 32)
    a.tasks = a.tasks or ([1, 4] if a.smoke else [1, 4, 16])
    a.rounds = a.rounds or (1 if a.smoke else 3)
    a.interval = a.interval if a.interval is not None else (0.02 if a.smoke else 0.25)
    a.device = torch.device("cuda" if a.device == "auto" and torch.cuda.is_available() else
                            "cpu" if a.device == "auto" else a.device)
    if a.device.type == "cuda" and not torch.cuda.is_available():
        p.error("--device cuda: CUDA is not available here")
    if a.http and a.device.type != "cpu":
        p.error("--http runs on CPU (the app's replicas take their device from the deployment config)")
    a.dtype = DTYPES[a.dtype] or (torch.bfloat16 if a.device.type == "cuda" else torch.float32)
    if a.out is None and not a.smoke:
        kind = "http_" if a.http else ""
        a.out = str(ROOT / "bench" / "results" / f"generate_{kind}{a.device.type}.jsonl")
    bad = [d for d in a.decoders if d not in DECODERS] + [w for w in a.workloads if w not in WORKLOADS]
    if bad or not a.decoders or not a.workloads:
        p.error(f"unknown decoder(s)/workload(s) {bad}; decoders: {', '.join(DECODERS)}; workloads: "
                f"{', '.join(WORKLOADS)}")
    if min(a.requests, a.new_tokens, a.k, a.rounds, a.threads, *a.tasks) < 1 or a.interval < 0:
        p.error("--requests, --new-tokens, --k, --rounds, --threads and --tasks must be positive")
    return a


def main(argv: Sequence[str] | None = None) -> list[dict]:
    args = parse_args(argv)
    threads_before = torch.get_num_threads()
    torch.set_num_threads(args.threads)
    try:
        return _run_http(args) if args.http else _run(args)
    finally:
        torch.set_num_threads(threads_before)  # main() may run inside another process (tests)


def _base(args):
    """The base, the prompts (ids and messages) and the facts every record carries; sets the context."""
    bb = load_base(args.model, args.context)
    msgs = chat_messages(args.requests, args.seed)
    ids = [chat_ids(bb.generation_defaults(), bb.tokenizer, m) for m in msgs]
    args.context = args.context or -(-(max(map(len, ids)) + args.new_tokens) // 64) * 64
    bb.max_length = min(bb.max_length, args.context)
    cuda = args.device.type == "cuda"
    common = {"bench": "generate", "device": args.device.type, "dtype": str(args.dtype).replace("torch.", ""),
              "device_name": torch.cuda.get_device_name(args.device) if cuda else
              f"{platform.processor() or platform.machine()} x{args.threads} threads",
              "threads": args.threads, "requests": args.requests, "new_tokens": args.new_tokens,
              "prompt_tokens": sorted({len(i) for i in ids}), "context": bb.max_length, "k": args.k,
              "base_params": sum(p.numel() for p in bb.lm.parameters()), "interval_s": args.interval,
              "eos": "ignored", "torch": torch.__version__}
    return bb, ids, msgs, common


def _engine(bb, args, common: dict, eos_token_ids: Sequence[int] = ()):
    """The engine over ``bb`` with the largest T random tasks registered (and their packages' bytes)."""
    engine = Engine(bb, device=args.device, dtype=args.dtype)
    pkgs = [P.package_bytes(p) for p in generation_packages(bb, max(args.tasks), args.k, seed=args.seed,
                                                              eos_token_ids=eos_token_ids)]
    task_ids = [engine.register(data).task_id for data in pkgs]
    common.update(model=engine.spec.model_id, task_params=engine.task(task_ids[0]).num_params,
                  patchable_linears=len(engine.modules))
    if args.keep_bytes is None:
        args.keep_bytes = DEFAULT_KEEP_BYTES
    return engine, task_ids, pkgs


def _finish(args, rounds: list[dict], common: dict, facts: dict | None, base_method: str = "base") -> list[dict]:
    out = Records(args.out)
    try:
        for rec in make_records(rounds, common, args, facts, base_method):
            out.emit(rec)
    finally:
        out.close()
    table = markdown_table(out.items)
    print(table, file=sys.stderr if not out.to_file else sys.stdout)
    if args.table:
        Path(args.table).write_text(table + "\n")
    return out.items


def _run(args) -> list[dict]:
    big = max(args.tasks)
    t_setup = time.perf_counter()
    bb, ids, _, common = _base(args)
    pad_id = int(bb.tokenizer.pad_token_id or 0)
    plain = pm = facts = None
    if args.peft:
        # a copy before the engine hooks (and casts) the base's modules
        plain = copy.deepcopy(bb.lm).to(args.device, args.dtype).eval()
        pm, facts = lora_lm(plain, big, args.k)
        generate_wave(plain, ids[:2], 2, pad_id)  # warm-up
        generate_wave(pm, ids[:2], 2, pad_id, ["a0", f"a{big - 1}"])
    engine, task_ids, _ = _engine(bb, args, common)
    print(f"[bench] setup {time.perf_counter() - t_setup:.0f} s: {len(task_ids)} tasks of {common['task_params']:,} "
          f"params (k={args.k} rows x {len(engine.modules)} linears), prompts of {common['prompt_tokens']} tokens, "
          f"context {bb.max_length}" + (f"; PEFT LoRA rank {facts['lora_rank']}: {facts['lora_params']:,} params "
                                       "per adapter" if pm else ""),
          file=sys.stderr)
    rounds = []
    for rnd in range(args.rounds):
        got: dict = {}
        decoders = args.decoders if rnd % 2 == 0 else args.decoders[::-1]
        for d in decoders:
            got.update({(d, *k): v for k, v in _decoder_round(engine, d, rnd, args, task_ids, ids).items()})
        if pm is not None and "burst" in args.workloads:
            got.update({("hf-generate", *k): v for k, v in _peft_round(plain, pm, rnd, args, ids, pad_id).items()})
        rounds.append(round_view(got))
    return _finish(args, rounds, common, facts)


def _run_http(args) -> list[dict]:
    """HTTP streaming vs in-process on the same config: the decoder ``--decoders[0]``, the largest T,
    the tasks' own end rules on both paths (their packages end on the vocabulary's last id, which the
    answers here never produce: every request runs to M tokens; ``tokens_ok`` checks it)."""
    import tempfile

    from bench.gen_http import BASE_ID, http_wave, start_app, stop_app

    big, decoder = max(args.tasks), args.decoders[0]
    bb, ids, msgs, common = _base(args)
    engine, task_ids, pkgs = _engine(bb, args, common, eos_token_ids=[len(bb.tokenizer) - 1])
    common["eos"] = "the tasks' own (never produced)"
    opts = {"decoder": decoder, "max_tasks_per_batch": big, "max_requests": args.requests,
            "max_batch_tokens": max(512, args.requests * max(map(len, ids))),
            "kv_cache_tokens": args.requests * args.context, "page_size": 32}
    cfg = {"type": "zoo", "name": args.model[4:]} if args.model.startswith("zoo:") else \
        {"type": "causal_lm", "path": str(Path(args.model).resolve())}
    gen = TextGenerator(engine, **opts)
    rounds = []
    with tempfile.TemporaryDirectory(prefix="grft-bench-gen-store-") as store:
        try:
            url = start_app({**cfg, "max_length": args.context}, opts, store, pkgs, threads=args.threads)
            tasks = task_mix(task_ids, big, args.requests)
            models = [t or BASE_ID for t in tasks]
            http_wave(url, models, msgs, 2)  # warm-up: every task loaded in the replica
            warm_up(gen, tasks, ids)
            arrivals = arrival_offsets(args.requests, args.interval, args.seed)
            for rnd in range(args.rounds):
                got = {}
                for workload in args.workloads:
                    arr = arrivals if workload == "staggered" else None
                    runs = [("in-process", lambda a=arr: inprocess_wave(gen, tasks, ids, args.new_tokens, a,
                                                                        ignore_eos=False)),
                            (f"http tasks={big}", lambda a=arr: http_wave(url, models, msgs, args.new_tokens,
                                                                          arrivals=a))]
                    for name, fn in (runs[::-1] if rnd % 2 else runs):
                        load = os.getloadavg()[0]
                        r = got[(decoder, workload, name)] = {**fn(), "loadavg_1m": load, "tasks": big,
                                                              "keep_gathers": True}
                        print(f"[bench] round {rnd} {decoder:10s} {workload:9s} {name:18s} {r['tokens_per_s']:7.1f} "
                              f"tok/s  load {load:.1f}", file=sys.stderr)
                rounds.append(round_view(got))
        finally:
            gen.close()
            stop_app()
    return _finish(args, rounds, common, None, base_method="in-process")


if __name__ == "__main__":
    main()
