"""Summary of ``bench/accuracy.py`` records: mean ± standard error over seeds, verdicts, cost, plot.

Standard error of a mean over n seeds: ``s / √n`` (``s`` the sample standard deviation; 0 for one
seed). Two methods tie when their mean test accuracies differ by no more than the standard error of
the difference, ``√(se_a² + se_b²)``.
"""
from __future__ import annotations

import math
from collections import defaultdict
from pathlib import Path
from typing import Sequence

from grft_train.plots import pyplot, save_figure

__all__ = ["md_header", "mean_se", "plot_curve", "render_markdown", "summarise"]


def mean_se(xs: Sequence[float]) -> tuple[float, float]:
    n = len(xs)
    m = sum(xs) / n
    if n < 2:
        return m, 0.0
    s = math.sqrt(sum((x - m) ** 2 for x in xs) / (n - 1))
    return m, s / math.sqrt(n)


def _avg(rs: list[dict], key: str) -> float | None:
    vals = [r[key] for r in rs if r.get(key) is not None]
    return sum(vals) / len(vals) if vals else None


def summarise(records: Sequence[dict]) -> dict:
    """``{dataset: {"title", "rows": [...], "verdicts": [...], "cost": {...}}}``."""
    out: dict = {}
    for ds in dict.fromkeys(r["dataset"] for r in records):
        by: dict[str, list[dict]] = defaultdict(list)
        for r in records:
            if r["dataset"] == ds:
                by[r["method"]].append(r)
        rows = {}
        for method, rs in by.items():
            acc, se = mean_se([r["test_acc"] for r in rs])
            rows[method] = {"method": method, "family": rs[0]["family"], "k": rs[0].get("k"), "seeds": len(rs),
                            "test_acc": acc, "test_se": se, "val_acc": _avg(rs, "val_acc"),
                            "backbone_pct": _avg(rs, "backbone_pct"), "total_pct": _avg(rs, "total_pct"),
                            "fit_s": _avg(rs, "fit_s"), "step_s": _avg(rs, "step_s"),
                            "step_cpu_s": _avg(rs, "step_cpu_s"), "select_s": _avg(rs, "select_s"),
                            "epochs": rs[0]["epochs"], "rss_fit_mb": _avg(rs, "rss_fit_mb"),
                            "rss_select_mb": _avg(rs, "rss_select_mb"), "rank": rs[0].get("rank")}
        first = next(iter(by.values()))[0]
        out[ds] = {"title": first["setting"], "n_train": first["n_train"], "n_val": first["n_val"],
                   "n_test": first["n_test"], "epochs": first["epochs"], "device": first["device_name"],
                   "rows": list(rows.values()), "verdicts": _verdicts(rows), "cost": _cost(rows)}
    return out


def _compare(a: dict, b: dict) -> tuple[float, float, str]:
    d = 100 * (a["test_acc"] - b["test_acc"])
    se = 100 * math.sqrt(a["test_se"] ** 2 + b["test_se"] ** 2)
    word = "tie" if abs(d) <= se else ("better" if d > 0 else "worse")
    return d, se, word


def _verdicts(rows: dict[str, dict]) -> list[str]:
    out = []
    ks = sorted({r["k"] for r in rows.values() if r["k"] is not None})
    for k in ks:
        grft = [rows[m] for m in (f"grft-row-k{k}", f"grft-column-k{k}") if m in rows]
        if not grft:
            continue
        g = max(grft, key=lambda r: r["test_acc"])
        for other in (f"gps-k{k}", f"lora-k{k}"):
            if other in rows:
                d, se, word = _compare(g, rows[other])
                out.append(f"k={k}: {g['method']} {100 * g['test_acc']:.2f} vs {other} "
                           f"{100 * rows[other]['test_acc']:.2f} ({d:+.2f} pts, s.e. of the difference {se:.2f}) "
                           f"at {g['backbone_pct']:.3f} % vs {rows[other]['backbone_pct']:.3f} % -> {word}")
        if "full" in rows:
            d, se, _ = _compare(g, rows["full"])
            out.append(f"k={k}: gap of {g['method']} to full fine-tuning: {d:+.2f} pts (s.e. {se:.2f})")
    return out


def _cost(rows: dict[str, dict]) -> dict:
    full = rows.get("full")
    grft = [r for r in rows.values() if r["family"].startswith("grft")]
    if not full or not grft:
        return {}
    res = {}
    for key in ("fit_s", "step_s", "step_cpu_s"):
        if full.get(key) and all(r.get(key) for r in grft):
            res[f"grft_over_full_{key}"] = round(sum(r[key] for r in grft) / len(grft) / full[key], 3)
    epoch_s = sum(r["step_s"] / max(r["epochs"], 1) for r in grft) / len(grft)
    if epoch_s > 0 and grft[0].get("select_s"):
        res["select_in_grft_epochs"] = round(grft[0]["select_s"] / epoch_s, 2)
    return res


def md_header(s: dict, detail: str, columns: list[str]) -> list[str]:
    """A summary table's title line (dataset, split sizes, ``detail``) and its header rows."""
    return [f"**{s['title']}** — train {s['n_train']} / val {s['n_val']} / test {s['n_test']}, {detail}\n",
            "| " + " | ".join(columns) + " |", "|---|" + "---:|" * (len(columns) - 1)]


def render_markdown(summary: dict, wall_s: float | None = None) -> str:
    lines = []
    for s in summary.values():
        lines += md_header(s, f"{s['epochs']} epochs, {s['rows'][0]['seeds']} seed(s), {s['device']}",
                           ["method", "test acc (mean ± s.e.)", "backbone trainable %", "fit s", "train-step s",
                            "select s", "peak RSS fit / select (MB)"])
        for r in s["rows"]:
            extra = f" (r={r['rank']})" if r.get("rank") else ""
            sel = f"{r['select_s']:.0f}" if r["select_s"] else "–"
            rss_sel = f"{r['rss_select_mb']:.0f}" if r.get("rss_select_mb") else "–"
            lines.append(f"| {r['method']}{extra} | {100 * r['test_acc']:.2f} ± {100 * r['test_se']:.2f} | "
                         f"{r['backbone_pct']:.3f} | {r['fit_s']:.0f} | {r['step_s']:.0f} | {sel} | "
                         f"{r['rss_fit_mb']:.0f} / {rss_sel} |")
        lines.append("")
        lines += [f"- {v}" for v in s["verdicts"]]
        c = s["cost"]
        if c:
            lines.append(f"- cost: GRFT fit / full fine-tuning = {c.get('grft_over_full_fit_s')} (whole fit), "
                         f"{c.get('grft_over_full_step_s')} (training steps, wall), "
                         f"{c.get('grft_over_full_step_cpu_s')} (training steps, CPU time); "
                         f"selection = {c.get('select_in_grft_epochs')} GRFT epochs, paid once per task")
        lines.append("")
    if wall_s is not None:
        lines.append(f"wall time {wall_s:.0f} s")
    return "\n".join(lines) + "\n"


def plot_curve(summary: dict, path: str | Path) -> Path:
    """Test accuracy (mean ± s.e.) against backbone trainable % (log scale), one panel per dataset."""
    plt = pyplot()

    n = len(summary)
    fig, axes = plt.subplots(1, n, figsize=(6.2 * n, 4.4), squeeze=False)
    styles = {"grft-row": ("o-", "C0"), "grft-column": ("s-", "C1"), "gps": ("^-", "C2"), "lora": ("D-", "C3")}
    for ax, s in zip(axes[0], summary.values()):
        rows = s["rows"]
        for fam, (mk, col) in styles.items():
            rs = sorted([r for r in rows if r["family"] == fam], key=lambda r: r["backbone_pct"])
            if rs:
                ax.errorbar([r["backbone_pct"] for r in rs], [100 * r["test_acc"] for r in rs],
                            yerr=[100 * r["test_se"] for r in rs], fmt=mk, color=col, capsize=3, label=fam)
        for fam, ls, col in (("linear", "--", "0.4"), ("full", ":", "k")):
            r = next((r for r in rows if r["family"] == fam), None)
            if r is not None:
                ax.axhline(100 * r["test_acc"], ls=ls, color=col, lw=1,
                           label=f"{'linear probe (head only)' if fam == 'linear' else 'full fine-tuning (100 %)'}")
                ax.axhspan(100 * (r["test_acc"] - r["test_se"]), 100 * (r["test_acc"] + r["test_se"]),
                           color=col, alpha=0.08)
        ax.set_xscale("log")
        from matplotlib.ticker import FormatStrFormatter

        for axis in (ax.xaxis.set_major_formatter, ax.xaxis.set_minor_formatter):
            axis(FormatStrFormatter("%g"))
        ax.set_xlabel("trainable backbone parameters (%)")
        ax.set_ylabel("test accuracy (%)")
        ax.set_title(s["title"], fontsize=10)
        ax.legend(fontsize=7)
        ax.grid(alpha=0.3, which="both")
    return save_figure(fig, path)
