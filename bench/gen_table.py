"""The generation benchmark's markdown table (README-ready) from its JSON-lines records."""
from __future__ import annotations

from typing import Sequence

__all__ = ["markdown_table"]

_COLS = ("decoder", "workload", "method", "tokens/s", "% of base", "% of base (CPU)", "CPU ms/token",
         "TTFT p50 / p99 ms", "ITL p50 / p99 ms")


def _f(x, fmt: str) -> str:
    return "–" if x is None else format(x, fmt)


def _row(r: dict) -> str:
    cells = [r["decoder"], r["workload"], r["method"], _f(r["tokens_per_s"], ".1f"), _f(r["pct_of_base"], ".0f"),
             _f(r["pct_of_base_cpu"], ".0f"), _f(r["cpu_ms_per_token"], ".1f"),
             f"{_f(r['ttft_ms_p50'], '.0f')} / {_f(r['ttft_ms_p99'], '.0f')}",
             f"{_f(r['itl_ms_p50'], '.0f')} / {_f(r['itl_ms_p99'], '.0f')}"]
    return "| " + " | ".join(cells) + " |"


def _ratio(x: float | None, what: str) -> str | None:
    return None if x is None else f"{x:.2f}x {what}"


def markdown_table(records: Sequence[dict]) -> str:
    """One table of every (decoder, workload, method), then the headline ratios, one per line."""
    if not records:
        return ""
    r0 = records[0]
    lines = [f"Generation on {r0['model']} ({r0['device_name']}): R={r0['requests']} requests x M={r0['new_tokens']} "
             f"tokens (greedy, EOS {r0['eos']}), prompts of {'/'.join(map(str, r0['prompt_tokens']))} tokens, GRFT "
             f"tasks k={r0['k']} ({r0['task_params']:,} params each), rounds: {r0['rounds']}, "
             f"load {sum(r['loadavg_1m'] for r in records) / len(records):.1f}; % of "
             f"{' / '.join(sorted({r['baseline'].rsplit('/', 1)[-1] for r in records}))} of the same decoder and "
             "workload, per round, median.", "",
             "| " + " | ".join(_COLS) + " |",
             "|" + "|".join("---" if i < 3 else "---:" for i in range(len(_COLS))) + "|"]
    lines += [_row(r) for r in records]
    notes = []
    for r in records:
        who = f"{r['decoder']} {r['workload']} {r['method']}"
        for key, what in (("x_peft", "x the tokens/s of PEFT LoRA mixed-adapter generate (same T)"),
                          ("x_no_keep", "x the tokens/s without kept gathers"),
                          ("x_no_keep_cpu", "x: CPU per token without kept gathers / with"),
                          ("x_padded", "x the tokens/s of the padded decoder")):
            if r.get(key) is not None and (key != "x_padded" or r["workload"] == "burst"):
                notes.append(f"- {who}: {r[key]:.2f}{what}")
        ttft = r.get("ttft_p50_padded_over_continuous")
        if ttft is not None and r["workload"] == "staggered":
            notes.append(f"- {who}: TTFT p50 of the padded decoder / continuous: {ttft:.2f}x")
        if r.get("same_tokens_as_keep") is not None:
            notes.append(f"- {who}: answers equal to the kept-gathers run token for token: {r['same_tokens_as_keep']}")
        if not r["tokens_ok"] or r["errors"]:
            notes.append(f"- {who}: WRONG TOKEN COUNT ({r['tokens']}) or errors {r['errors']}")
    peft = next((r for r in records if r["decoder"] == "hf-generate" and r.get("lora_rank")), None)
    if peft:
        notes.append(f"- PEFT LoRA rank {peft['lora_rank']}: {peft['lora_params']:,} params per adapter "
                     f"(GRFT task: {peft['task_params']:,})")
    return "\n".join(lines + ([""] + notes if notes else []))
