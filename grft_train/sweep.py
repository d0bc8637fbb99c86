"""``grft-train sweep``: tune k and λ per dataset the way the GRFT paper does (its Tables 6–7).

One pass of selection gradients serves every (mode, k): each is a top-k cut of the same scores. Each
(mode, k, λ) is then trained by ``fit`` with the run file's other settings; the run with the best
**validation** accuracy wins (ties: fewer trainable parameters, then the smaller λ) and its package
is copied to ``<out_dir>/<task_id>.grft.safetensors``. Test accuracy is reported for every run but
never used to choose. Written to ``out_dir``: ``sweep.jsonl`` (one line per run), ``sweep.md`` (the
table) and ``sweep.png`` (validation accuracy against λ, one line per mode and k).
"""
from __future__ import annotations

import json
import logging
import shutil
import time
from pathlib import Path
from typing import Sequence

from .common import seed_everything
from .config import FitConfig, SelectConfig
from .context import RunContext
from .fit import FitError, run_fit
from .plots import pyplot, save_figure
from .select import build_selection, save_selection, selection_grads

__all__ = ["SweepError", "parse_floats", "parse_ints", "run_sweep"]
log = logging.getLogger("grft_train.sweep")


class SweepError(FitError):
    """The sweep grid is invalid (or the data cannot be swept)."""


def _parse(text: str, what: str, cast, kind: str, minimum) -> list:
    try:
        out = [cast(v) for v in text.split(",") if v.strip()]
    except ValueError:
        raise SweepError(f"{what}: expected a comma list of {kind}, got {text!r}") from None
    if not out or any(v < minimum for v in out):
        raise SweepError(f"{what}: give one or more {kind} >= {minimum}, got {text!r}")
    return sorted(set(out))


def parse_ints(text: str, what: str) -> list[int]:
    """``"1,2,4"`` -> ``[1, 2, 4]`` (k values: integers >= 1)."""
    return _parse(text, what, int, "integers", 1)


def parse_floats(text: str, what: str) -> list[float]:
    """``"0,1e-4"`` -> ``[0.0, 0.0001]`` (λ values: numbers >= 0)."""
    return _parse(text, what, float, "numbers", 0)


def _best(runs: list[dict]) -> dict:
    """Highest validation score (classification: accuracy; generation: −answer loss), then fewer
    trainable parameters, then the smaller λ."""
    return max(runs, key=lambda r: (r["val_score"] if r["val_score"] is not None else -float("inf"),
                                    -r["trainable_pct"], -r["l2_lambda"]))


def run_sweep(scfg: SelectConfig, fcfg: FitConfig, ks: Sequence[int], l2s: Sequence[float],
              modes: Sequence[str] = ("row",), out_dir: str | Path | None = None) -> dict:
    """Train every (mode, k, λ); returns ``{"runs": [...], "best": {...}, "package": path, ...}``."""
    bad = [m for m in modes if m not in ("row", "column")]
    if bad:
        raise SweepError(f"sweep modes must be row or column, got {bad}")
    out = Path(out_dir or Path(fcfg.out_dir) / "sweep")
    out.mkdir(parents=True, exist_ok=True)
    t0 = time.time()
    seed_everything(scfg.seed)
    ctx = RunContext.build(scfg)
    if not len(ctx.splits.val):
        raise SweepError("the sweep picks by validation score: the val split is empty (set data.val_fraction)")
    grads = selection_grads(scfg.model_copy(update={"mode": "row"}), ctx)
    runs: list[dict] = []
    lines = (out / "sweep.jsonl").open("w")
    try:
        for mode in modes:
            for k in ks:
                sel = build_selection(grads, ctx, scfg.model_copy(update={"mode": mode, "k": k, "budget": None}))
                sel_path = out / f"{mode}-k{k}" / "selection.safetensors"
                sel_path.parent.mkdir(parents=True, exist_ok=True)
                save_selection(sel, sel_path, ctx.spec, with_heatmap=False)
                for lam in l2s:
                    run_dir = sel_path.parent / f"l2-{lam:g}"
                    cfg = fcfg.model_copy(update={"l2_lambda": lam, "selection": str(sel_path),
                                                  "out_dir": str(run_dir), "package": None})
                    res = run_fit(cfg, ctx, selection=sel)
                    res.model.close()
                    m = res.metrics
                    rec = {"mode": mode, "k": k, "l2_lambda": lam, "val_score": m["val_score"],
                           "val_acc": m["val_acc"], "test_acc": m["test_acc"],
                           "trainable_pct": m["trainable_pct"], "best_epoch": m["best_epoch"],
                           "fit_seconds": m["train_seconds"], "package": str(res.package_path)}
                    runs.append(rec)
                    lines.write(json.dumps(rec) + "\n")
                    lines.flush()
                    log.info("sweep %s k=%d λ=%g: val score %.4f", mode, k, lam, m["val_score"])
    finally:
        lines.close()
    best = _best(runs)
    pkg = Path(fcfg.out_dir) / f"{fcfg.task_id}.grft.safetensors"
    pkg.parent.mkdir(parents=True, exist_ok=True)
    shutil.copyfile(best["package"], pkg)
    (out / "sweep.md").write_text(render_table(runs, best))
    plot = out / "sweep.png"
    try:
        plot_sweep(runs, best, plot)
    except Exception as e:  # noqa: BLE001 - the plot is a convenience
        log.warning("sweep plot failed: %s", e)
    return {"runs": runs, "best": best, "package": str(pkg), "table": str(out / "sweep.md"), "plot": str(plot),
            "select_seconds": grads.meta["grad_seconds"], "seconds": round(time.time() - t0, 2)}


def render_table(runs: list[dict], best: dict) -> str:
    head = "| mode | k | λ | val acc | test acc | trainable % | fit s |\n|---|---:|---:|---:|---:|---:|---:|\n"
    rows = []
    for r in runs:
        mark = " **(best)**" if r is best else ""
        rows.append(f"| {r['mode']} | {r['k']} | {r['l2_lambda']:g} | {100 * r['val_acc']:.2f}{mark} | "
                    f"{100 * r['test_acc']:.2f} | {r['trainable_pct']:.3f} | {r['fit_seconds']:.0f} |")
    return head + "\n".join(rows) + "\n\nChosen by validation accuracy; test accuracy is shown, never used.\n"


def plot_sweep(runs: list[dict], best: dict, path: Path) -> Path:
    plt = pyplot()

    lams = sorted({r["l2_lambda"] for r in runs})
    pos = {lam: i for i, lam in enumerate(lams)}
    fig, ax = plt.subplots(figsize=(6.4, 4))
    for key in dict.fromkeys((r["mode"], r["k"]) for r in runs):
        rs = [r for r in runs if (r["mode"], r["k"]) == key]
        ax.plot([pos[r["l2_lambda"]] for r in rs], [100 * r["val_acc"] for r in rs], "o-",
                label=f"{key[0]} k={key[1]} ({rs[0]['trainable_pct']:.2f} %)")
    ax.scatter([pos[best["l2_lambda"]]], [100 * best["val_acc"]], s=160, facecolors="none", edgecolors="k",
               label="chosen")
    ax.set_xticks(range(len(lams)))
    ax.set_xticklabels([f"{lam:g}" for lam in lams])
    ax.set_xlabel("λ (L2 to pretrained)")
    ax.set_ylabel("validation accuracy (%)")
    ax.set_title("GRFT sweep: validation accuracy by k and λ")
    ax.legend(fontsize=8)
    return save_figure(fig, path)
