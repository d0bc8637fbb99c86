"""The engine benchmark's table: % of base per (model, k, method, T), and the many-tasks summary."""
from __future__ import annotations

from typing import Sequence

__all__ = ["render_table"]

METHODS = ("base", "patch", "override", "peft-lora")
DIAGNOSTICS = ("override.plan", "engine.heads")


def render_table(records: Sequence[dict], console) -> None:
    from rich.table import Table

    for model, k in dict.fromkeys((r["model"], r["k"]) for r in records if r["method"] in METHODS):
        rs = [r for r in records if r["model"] == model and r["k"] == k]
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
            if r["method"] == "peft-lora" and r["tasks"] == Ts[-1]:
                notes.append(f"peft-lora: rank {r['lora_rank']}, {r['lora_params']} params/adapter "
                             f"(GRFT task: {r['task_params']})")
        t = Table(title=f"{model}: batch {first['batch']}{extra}, {first['dtype']}, k={k}, {first['device_name']}, "
                        f"{first.get('clock', 'wall')} clock",
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
                    cells.append(f"{r['ms']:7.2f}ms {100 * r['share_of_override']:3.1f}%")
            t.add_row(m, *cells)
        console.print(t)
    for r in records:
        if r["method"] == "many.register":
            console.print(f"{r['model']}: {r['registered']:,} tasks, register {r['ms']:.2f} ms/task")
        elif r["method"] == "many.host":
            console.print(f"  host tier {r['host_over_package']:.2f}x package bytes "
                          f"({r['host_bytes_per_task'] / 1e3:.0f} KB/task), RSS growth {r['rss_over_package']:.2f}x")
        elif r["method"] == "many.mixed":
            console.print(f"  mixed batch over T={r['batch_tasks']} drawn from all: {r['ms']:.1f} ms vs "
                          f"{r['ms_10_tasks']:.1f} ms from 10 tasks ({r['ratio_to_10_tasks']:.3f}x; "
                          f"{r['slot_loads_per_batch']:.1f} slot loads, {r['cache_misses_per_batch']:.1f} "
                          f"device-tier misses per batch)")
