"""Where a mixed-task decode step spends its time, next to a base step (continuous decoder, CPU).

The same engine and waves as :mod:`bench.generate` (R requests x M tokens, greedy), run under
probes that read the decode thread's own CPU clock (``time.thread_time``: what the thread did, not
what other processes took from it) around every part of a step of transformers' continuous-batching
loop:

- ``before``: the decoder's pre-forward hook — slots for the batch's tasks, the token → slot vector,
  the per-module plans (``plans``: :meth:`DecodeSlots.activate` alone);
- ``forward``: the model's forward, of which ``rowop`` is the row-op hooks
  (:func:`grft_serve.core.rowop.apply_mixed` on every patchable linear) and ``gathers`` their
  slot-table gathers (or the lookups of kept ones);
- ``after``: the decoder's post-forward hook (sampling, delivery, the one-hot logits);
- ``manager``: the rest of the loop (scheduling, KV-cache bookkeeping, its own argmax).

Steps are split into decode steps (every request decodes one token) and steps with prompt tokens.
Methods: ``base``, ``tasks=T`` and ``tasks=T no-keep`` (gathers made afresh at every step), waves
interleaved, ``--waves`` each. The probes cost about a microsecond per call (two per linear).

    python -m bench.gen_profile                    # SmolLM2-135M, R=16, M=32, T=16, 3 waves per method
    python -m bench.gen_profile --out bench/results/generate_profile_cpu.jsonl
"""
from __future__ import annotations

import argparse
import statistics
import sys
import time
from collections import defaultdict
from typing import Sequence

from bench.gen_workload import chat_messages, generation_packages, inprocess_wave, task_mix, warm_up
from bench.generate import load_base
from bench.records import Records
from grft_serve.core import package as P
from grft_serve.core import rowop
from grft_serve.core.generation import chat_ids
from grft_serve.engine import Engine, TextGenerator
from grft_serve.engine.decode_slots import DEFAULT_KEEP_BYTES

__all__ = ["main"]

PARTS = ("step", "before", "plans", "forward", "rowop", "gathers", "after", "manager")


class _Probes:
    """Thread-CPU-clock probes around the parts of each decode step (see the module docstring)."""

    def __init__(self, gen: TextGenerator):
        self.gen, self.steps, self.cur = gen, [], None
        self._depth = 0
        lm, dec = gen.backbone.lm, gen.decoder
        self._handles = [lm.register_forward_pre_hook(self._pre0, prepend=True),
                         lm.register_forward_pre_hook(self._pre1),
                         lm.register_forward_hook(self._post0, prepend=True),
                         lm.register_forward_hook(self._post1)]
        self._orig = (rowop.apply_mixed, rowop._gathered, gen.slots.activate)
        rowop.apply_mixed = self._timed("rowop", rowop.apply_mixed, nested=True)
        rowop._gathered = self._timed("gathers", rowop._gathered)
        gen.slots.activate = self._timed("plans", gen.slots.activate)
        self._dec = dec

    def _timed(self, part: str, fn, nested: bool = False):
        def wrapper(*a, **kw):
            cur = self.cur
            if cur is None or (nested and self._depth):
                return fn(*a, **kw)
            self._depth += nested
            t = time.thread_time()
            try:
                return fn(*a, **kw)
            finally:
                cur[part] += time.thread_time() - t
                self._depth -= nested
        return wrapper

    def _pre0(self, module, args):
        now = time.thread_time()
        if self.cur is not None and "end" in self.cur:
            self.cur["step"] = now - self.cur["start"]
            self.cur["manager"] = self.cur["step"] - (self.cur["end"] - self.cur["start"])
            self.steps.append(self.cur)
        batch = self._dec.mgr.batch_processor.inputs_and_outputs.requests_in_batch
        self.cur = defaultdict(float, start=now, decode=all(fs.query_length == 1 for fs in batch),
                               requests=len(batch))

    def _pre1(self, module, args):
        cur = self.cur
        if cur is None:
            return
        cur["t1"] = time.thread_time()
        cur["before"] = cur["t1"] - cur["start"]

    def _post0(self, module, args, output):
        cur = self.cur
        if cur is not None and "t1" in cur:
            cur["t2"] = time.thread_time()
            cur["forward"] = cur["t2"] - cur["t1"]

    def _post1(self, module, args, output):
        cur = self.cur
        if cur is not None and "t2" in cur:
            cur["end"] = time.thread_time()
            cur["after"] = cur["end"] - cur["t2"]

    def take(self) -> list[dict]:
        """The steps since the last take: complete ones only (the last step of a wave has no next
        step to close it; it is dropped, and so is anything the decode thread is still doing)."""
        out, self.steps, self.cur = self.steps, [], None
        return [s for s in out if "end" in s]

    def close(self) -> None:
        for h in self._handles:
            h.remove()
        rowop.apply_mixed, rowop._gathered, self.gen.slots.activate = self._orig


def _summary(steps: list[dict]) -> dict:
    return {p: 1e3 * statistics.median(s[p] for s in steps) for p in PARTS} if steps else {}


def main(argv: Sequence[str] | None = None) -> dict:
    p = argparse.ArgumentParser(prog="python -m bench.gen_profile", description=__doc__.split("\n\n")[0])
    p.add_argument("--model", default="zoo:smollm2_lm")
    p.add_argument("--requests", type=int, default=16)
    p.add_argument("--new-tokens", type=int, default=32)
    p.add_argument("--tasks", type=int, default=16)
    p.add_argument("--k", type=int, default=2)
    p.add_argument("--waves", type=int, default=3)
    p.add_argument("--out", default=None, help="also write one JSON line per (step kind, method) here")
    a = p.parse_args(argv)
    import torch

    torch.set_num_threads(1)
    bb = load_base(a.model, None)
    ids = [chat_ids(bb.generation_defaults(), bb.tokenizer, m) for m in chat_messages(a.requests)]
    bb.max_length = min(bb.max_length, -(-(max(map(len, ids)) + a.new_tokens) // 64) * 64)
    engine = Engine(bb, device="cpu")
    pkgs = generation_packages(bb, a.tasks, a.k)
    for pkg in pkgs:
        engine.register(P.package_bytes(pkg))
    tids = [x.task_id for x in pkgs]
    gen = TextGenerator(engine, "continuous", max_tasks_per_batch=a.tasks, max_requests=a.requests,
                        max_batch_tokens=max(512, a.requests * max(map(len, ids))),
                        kv_cache_tokens=a.requests * bb.max_length, page_size=32)
    methods = [("base", 0, DEFAULT_KEEP_BYTES), (f"tasks={a.tasks}", a.tasks, DEFAULT_KEEP_BYTES),
               (f"tasks={a.tasks} no-keep", a.tasks, 0)]
    steps: dict[str, list[dict]] = {m: [] for m, *_ in methods}
    try:
        warm_up(gen, task_mix(tids, a.tasks, a.requests), ids)
        probes = _Probes(gen)
        try:
            for w in range(a.waves):
                for name, T, keep in methods[w % 3:] + methods[:w % 3]:
                    gen.slots.keep_bytes = keep
                    inprocess_wave(gen, task_mix(tids, T, a.requests), ids, a.new_tokens)
                    steps[name] += probes.take()
        finally:
            probes.close()
    finally:
        gen.close()
    out = {}
    rec = Records(a.out) if a.out else None
    print(f"CPU ms per step (median; decode thread's clock), {engine.spec.model_id}, R={a.requests}, "
          f"M={a.new_tokens}, k={a.k}", file=sys.stderr)
    print(f"| method | steps | {' | '.join(PARTS)} |", file=sys.stderr)
    print("|---|---:|" + "---:|" * len(PARTS), file=sys.stderr)
    for kind, want in (("decode", True), ("prompt", False)):
        for name, *_ in methods:
            s = _summary([x for x in steps[name] if x["decode"] == want])
            out[(kind, name)] = s
            if s and rec is not None:
                rec.emit({"bench": "generate_profile", "model": engine.spec.model_id, "decoder": "continuous",
                          "requests": a.requests, "new_tokens": a.new_tokens, "k": a.k, "step": kind,
                          "method": name, "steps": sum(x["decode"] == want for x in steps[name]),
                          **{f"{q}_ms": s[q] for q in PARTS}})
            if s:
                print(f"| {kind}: {name} | {sum(x['decode'] == want for x in steps[name])} | "
                      + " | ".join(f"{s[q]:.2f}" for q in PARTS) + " |", file=sys.stderr)
    if rec is not None:
        rec.close()
    return out


if __name__ == "__main__":
    main()
