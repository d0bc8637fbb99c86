"""The generation benchmark's records: one per (decoder, workload, method) over all rounds, with
ratios taken per round against a baseline of the same round, then the median over rounds."""
from __future__ import annotations

import statistics
from typing import Sequence

from bench.gen_workload import latency_summary

__all__ = ["make_records", "round_view"]


def _median(xs: Sequence[float | None]) -> float | None:
    xs = [x for x in xs if x is not None]
    return statistics.median(xs) if xs else None


def _ratio(rounds: list[dict], key_a, key_b, field: str, invert: bool = False) -> float | None:
    """Median over rounds of a[field] / b[field] (b / a with ``invert``), both from the same round."""
    vals = []
    for r in rounds:
        a, b = r.get(key_a), r.get(key_b)
        if a is None or b is None or not a[field] or not b[field]:
            continue
        vals.append(b[field] / a[field] if invert else a[field] / b[field])
    return _median(vals)


def make_records(rounds: list[dict], common: dict, args, peft_facts: dict | None = None,
                 base_method: str = "base") -> list[dict]:
    """One record per (decoder, workload, method) over all rounds, with its ratios against
    ``base_method`` of the same decoder and workload (``peft_facts``: the LoRA rank and parameters,
    on the PEFT records)."""
    peft_facts = peft_facts or {}
    big = max(args.tasks)
    out = []
    for key in dict.fromkeys(k for r in rounds for k in r):
        decoder, workload, method = key
        waves = [r[key] for r in rounds if key in r]
        base = (decoder, workload, base_method)
        rec = {**common, "decoder": decoder, "workload": workload, "method": method, "tasks": waves[0]["tasks"],
               "keep_gathers": waves[0]["keep_gathers"], "rounds": len(waves),
               "tokens_per_s": _median([w["tokens_per_s"] for w in waves]),
               "tokens_per_s_rounds": [w["tokens_per_s"] for w in waves],
               "cpu_ms_per_token": _median([w["cpu_ms_per_token"] for w in waves]),
               **latency_summary([x for w in waves for x in w["ttft_ms"]], "ttft_ms"),
               **latency_summary([x for w in waves for x in w["itl_ms"]], "itl_ms"),
               "tokens": waves[0]["tokens"], "tokens_ok": all(w["tokens"] == args.requests * args.new_tokens
                                                               for w in waves),
               "decode_steps": _median([w.get("decode_steps") for w in waves]),
               "errors": sorted({e for w in waves for e in w["errors"]}),
               "loadavg_1m": statistics.mean(w["loadavg_1m"] for w in waves),
               "baseline": f"{decoder}/{workload}/{base_method}",
               "pct_of_base": _pct(_ratio(rounds, key, base, "tokens_per_s")),
               "pct_of_base_cpu": _pct(_ratio(rounds, key, base, "cpu_ms_per_token", invert=True))}
        if decoder != "hf-generate" and method == f"tasks={big}":
            rec["x_no_keep"] = _ratio(rounds, key, (decoder, workload, f"tasks={big} no-keep"), "tokens_per_s")
            rec["x_no_keep_cpu"] = _ratio(rounds, key, (decoder, workload, f"tasks={big} no-keep"),
                                          "cpu_ms_per_token", invert=True)
            if workload == "burst":
                rec["x_peft"] = _ratio(rounds, key, ("hf-generate", "burst", method), "tokens_per_s")
                rec["x_peft_cpu"] = _ratio(rounds, key, ("hf-generate", "burst", method), "cpu_ms_per_token",
                                           invert=True)
        if decoder == "continuous":
            rec["x_padded"] = _ratio(rounds, key, ("padded", workload, method), "tokens_per_s")
            rec["ttft_p50_padded_over_continuous"] = _ratio(rounds, ("padded", workload, method), key, "ttft_p50")
        if method.endswith("no-keep"):
            same = [r[key]["outputs"] == r[(decoder, workload, f"tasks={big}")]["outputs"]
                    for r in rounds if key in r and (decoder, workload, f"tasks={big}") in r]
            rec["same_tokens_as_keep"] = all(same) if same else None
        if decoder == "hf-generate":
            rec.update(peft_facts)
        out.append(rec)
    return out


def _pct(x: float | None) -> float | None:
    return None if x is None else 100.0 * x


def round_view(rnd: dict) -> dict:
    """A round's waves plus per-wave TTFT p50 (for the decoder TTFT ratio)."""
    for w in rnd.values():
        w["ttft_p50"] = latency_summary(w["ttft_ms"], "ttft_ms")["ttft_ms_p50"]
    return rnd
