"""Generation settings of ``bench/accuracy.py``: GRFT vs PEFT LoRA vs full fine-tuning vs the base.

On a causal LM (SmolLM2-135M-Instruct) and an offline dataset converted to JSONL exactly as a user
would (:mod:`grft_train.converters`, then the generic loader), every method is trained by the same
loop (:func:`grft_train.fit.run_fit`, objective ``causal_lm``: answer-token cross-entropy, Adam
with one learning rate, warm-up then cosine, the best epoch by validation loss) with the same step
budget, batch size and batch order per seed, and scored on the same **test** split by greedy
answers in the same prompt format:

- ``base``            the untuned model (no training);
- ``grft-row-kK``     GRFT: top-K rows per attention/MLP linear by summed squared gradients of the
                      answer loss (one pass over the train split) + every bias, L2 to pretrained;
- ``grft-column-kK``  the same with columns;
- ``lora-kK``         PEFT LoRA on the same linears at the rank whose parameter count is closest to
                      ``grft-row-kK``'s (values + biases);
- ``full``            every parameter (at ``full_lr``).

Metrics: normalised exact match and ROUGE-L of the answers (:mod:`grft_train.genmetrics`), answer
perplexity, trainable %, seconds. The selection gradients (one full pass in the batch order of the
first seed) are computed once per dataset and shared by every training seed; their time is given
with every GRFT record. On a shared machine the seconds are indicative only; the scores are not
affected by load.
"""
from __future__ import annotations

import math
import time
from pathlib import Path
from typing import Callable, Sequence

from bench.acc_report import md_header, mean_se
from bench.acc_settings import Setting, merge
from bench.baselines import full_ft_builder, lora_builder, lora_count, lora_rank_for, lora_targets, timed_fit
from grft_train.config import FitConfig, SelectConfig
from grft_train.context import RunContext
from grft_train.converters import chatterbot_records, math_records, write_jsonl
from grft_train.generate import answer_scores
from grft_train.plots import pyplot, save_figure
from grft_train.select import Selection, build_selection, selection_grads

__all__ = ["GEN_FAMILIES", "GenCache", "gen_data", "plot_gen", "render_gen", "run_gen_seed", "summarise_gen"]

GEN_FAMILIES = ("base", "grft-row", "grft-column", "lora", "full")


def gen_data(st: Setting, root: str | Path) -> Setting:
    """``st`` with ``data.path`` set to its converted JSONL under ``root`` (written once)."""
    c = st.convert or {}
    path = Path(root) / "data" / f"{st.key}.jsonl"
    if not path.is_file():
        if c.get("kind") == "math":
            recs = math_records(c["module"], c["n"], c.get("seed", 0), c.get("difficulty", "easy"))
        else:
            recs = chatterbot_records(c.get("categories", ["trivia"]))[0]
        write_jsonl(recs, path)
    return Setting(st.key, st.title, merge(st.common, {"data": {"path": str(path)}}), st.select, st.fit,
                   st.full_lr, st.convert)


class GenCache:
    """One run context and one gradient pass per dataset, shared by its seeds."""

    def __init__(self):
        self.ctx: dict[str, RunContext] = {}
        self.grads: dict[str, tuple] = {}


def run_gen_seed(st: Setting, families: Sequence[str], k: int, seed: int, *, device: str = "auto",
                 workdir: str | Path = "runs/accuracy", threads: int | None = 1, progress: bool = False,
                 emit: Callable[[dict], None] | None = None, cache: GenCache | None = None) -> list[dict]:
    """Every method of ``families`` on the generation setting ``st`` with training seed ``seed``."""
    cache = cache if cache is not None else GenCache()
    common = merge(st.common, {"seed": seed, "device": device, "progress": progress, "threads": threads})
    scfg = SelectConfig(**common, **st.select, mode="row", k=k, heatmap=False)
    if st.key not in cache.ctx:
        cache.ctx[st.key] = RunContext.build(scfg)
    ctx = cache.ctx[st.key]
    bb, obj = ctx.backbone, ctx.objective
    n_test = len(ctx.splits.test)
    records: list[dict] = []

    def record(method: str, scores: dict, extra: dict) -> dict:
        rec = {"dataset": st.key, "setting": st.title, "method": method, "family": method.rsplit("-k", 1)[0],
               "seed": seed, "exact_match": scores["exact_match"], "rouge_l": scores["rouge_l"],
               "test_acc": scores["exact_match"], "n_train": len(ctx.splits.train), "n_val": len(ctx.splits.val),
               "n_test": n_test, "backbone_params": ctx.total_params, "device": str(ctx.device),
               "threads": threads, **extra}
        records.append(rec)
        if emit is not None:
            emit(rec)
        return rec

    if "base" in families:
        t0 = time.time()
        tf = obj.evaluate(None, obj.data("test"), scfg.batch_size)
        sc = answer_scores(None, bb, ctx.splits.test.examples, obj.meta, scfg.batch_size)
        record("base", sc, {"test_loss": tf["loss"], "test_ppl": tf["ppl"], "backbone_pct": 0.0, "fit_s": 0.0,
                            "eval_s": round(time.time() - t0, 2), "select_s": 0.0, "k": None})

    need = [f for f in families if f != "base" and f != "full"]
    if need and st.key not in cache.grads:
        t0 = time.time()
        g = selection_grads(scfg, ctx)
        cache.grads[st.key] = (g, time.time() - t0)
    grads, select_s = cache.grads.get(st.key, (None, 0.0))
    row_values = None
    if grads is not None:
        row_values = build_selection(grads, ctx, scfg).meta["selected_values"]
    n_bias = sum(bb.get_submodule(n).weight.shape[0] for n in ctx.used)
    targets = lora_targets(bb, ctx.used)

    def fit(method: str, sel: Selection, bias: str, builder=None, extra: dict | None = None) -> dict:
        lr = {"lr": st.full_lr} if method == "full" else {}
        fcfg = FitConfig(**common, **merge(st.fit, lr), bias=bias, task_id=f"{st.key}-{method}",
                         out_dir=str(Path(workdir) / st.key / f"seed{seed}" / method))
        m, fit_s, mem = timed_fit(fcfg, ctx, sel, builder)
        body = m["trainable_values"] + m["trainable_biases"]
        uses_sel = method.startswith("grft")
        return record(method, {"exact_match": m["test_exact_match"], "rouge_l": m["test_rouge_l"]}, {
            "test_loss": m["test_loss"], "test_ppl": m["test_ppl"], "val_loss": m["val_loss"],
            "best_epoch": m["best_epoch"], "steps": m["steps"], "backbone_pct": 100.0 * body / ctx.total_params,
            "trainable_values": m["trainable_values"], "trainable_biases": m["trainable_biases"],
            "select_s": round(select_s, 2) if uses_sel else 0.0, "fit_s": round(fit_s, 2),
            "step_s": m["step_seconds"], "step_cpu_s": m["step_cpu_seconds"], "eval_s": m["eval_seconds"],
            "rss_fit_mb": mem["rss_peak_mb"], "epochs": fcfg.epochs, "lr": fcfg.lr,
            "l2_lambda": fcfg.l2_lambda, "batch_size": fcfg.batch_size, "bias": bias, "k": k,
            "package": m.get("package"), **(extra or {})})

    meta = {"base_model_id": ctx.spec.model_id, "base_fingerprint": ctx.spec.fingerprint, "labels": [],
            "objective": obj.name}
    for fam, mode in (("grft-row", "row"), ("grft-column", "column")):
        if fam in families:
            sel = build_selection(grads, ctx, scfg.model_copy(update={"mode": mode, "k": k}))
            fit(f"{fam}-k{k}", sel, "all", extra={"modules": len(sel.indices)})
    if "lora" in families:
        rank = lora_rank_for(bb, targets, row_values + n_bias)
        fit(f"lora-k{k}", Selection("row", {}, meta=dict(meta)), "none", lora_builder(targets, rank),
            extra={"rank": rank, "lora_params": lora_count(bb, targets, rank)})
    if "full" in families:
        fit("full", Selection("row", {}, meta=dict(meta)), "none", full_ft_builder)
    return records


# ---------------------------------------------------------------------------------------------
# summary
# ---------------------------------------------------------------------------------------------
def _avg(rs: Sequence[dict], key: str) -> float:
    """Mean of ``key`` over the records in ``rs`` that have it (0 when none do)."""
    return (sum(r[key] for r in rs if r.get(key) is not None)
            / max(1, sum(1 for r in rs if r.get(key) is not None)))


def summarise_gen(records: Sequence[dict]) -> dict:
    """``{dataset: {"title", "rows", "verdicts"}}``: mean ± s.e. over seeds of exact match and ROUGE-L."""
    out: dict = {}
    for ds in dict.fromkeys(r["dataset"] for r in records):
        rs_ds = [r for r in records if r["dataset"] == ds]
        rows = {}
        for method in dict.fromkeys(r["method"] for r in rs_ds):
            rs = [r for r in rs_ds if r["method"] == method]
            em, em_se = mean_se([r["exact_match"] for r in rs])
            rl, rl_se = mean_se([r["rouge_l"] for r in rs])
            rows[method] = {"method": method, "family": rs[0]["family"], "seeds": len(rs), "em": em, "em_se": em_se,
                            "rouge_l": rl, "rouge_se": rl_se, "ppl": _avg(rs, "test_ppl"),
                            "backbone_pct": _avg(rs, "backbone_pct"), "fit_s": _avg(rs, "fit_s"),
                            "select_s": _avg(rs, "select_s"), "rank": rs[0].get("rank")}
        first = rs_ds[0]
        out[ds] = {"title": first["setting"], "n_train": first["n_train"], "n_val": first["n_val"],
                   "n_test": first["n_test"], "rows": list(rows.values()), "verdicts": _verdicts(rows)}
    return out


def _cmp(a: dict, b: dict, key: str) -> str:
    d = 100 * (a[key] - b[key])
    se_key = f"{'em' if key == 'em' else 'rouge'}_se"
    se = 100 * math.sqrt(a[se_key] ** 2 + b[se_key] ** 2)
    word = "tie" if abs(d) <= se else ("better" if d > 0 else "worse")
    return f"{100 * a[key]:.1f} vs {100 * b[key]:.1f} ({d:+.1f} pts, s.e. {se:.1f}) -> {word}"


def _verdicts(rows: dict[str, dict]) -> list[str]:
    grft = [r for r in rows.values() if r["family"].startswith("grft")]
    if not grft:
        return []
    g = max(grft, key=lambda r: (r["em"], r["rouge_l"]))
    out = []
    for other in [r for r in rows.values() if r["family"] in ("lora", "base", "full")]:
        out.append(f"{g['method']} vs {other['method']}: exact match {_cmp(g, other, 'em')}; "
                   f"ROUGE-L {_cmp(g, other, 'rouge_l')}")
    return out


def render_gen(summary: dict) -> str:
    lines = []
    for s in summary.values():
        seeds = sorted({r["seeds"] for r in s["rows"]})
        lines += md_header(s, f"{seeds[0]} seed(s)" if len(seeds) == 1 else
                           f"{seeds[0]}-{seeds[-1]} seeds per method (a partial run)",
                           ["method", "seeds", "exact match % (mean ± s.e.)", "ROUGE-L %", "answer ppl",
                            "backbone trainable %", "fit s", "select s"])
        for r in s["rows"]:
            extra = f" (r={r['rank']})" if r.get("rank") else ""
            lines.append(f"| {r['method']}{extra} | {r['seeds']} | {100 * r['em']:.1f} ± {100 * r['em_se']:.1f} | "
                         f"{100 * r['rouge_l']:.1f} ± {100 * r['rouge_se']:.1f} | {r['ppl']:.2f} | "
                         f"{r['backbone_pct']:.3f} | {r['fit_s']:.0f} | {r['select_s']:.0f} |")
        lines.append("")
        lines += [f"- {v}" for v in s["verdicts"]]
        lines.append("")
    return "\n".join(lines) + "\n"


def plot_gen(summary: dict, path: str | Path) -> Path:
    """Exact match and ROUGE-L (mean ± s.e.) per method, one panel per dataset."""
    plt = pyplot()
    n = len(summary)
    fig, axes = plt.subplots(1, n, figsize=(6.2 * n, 4.2), squeeze=False)
    for ax, s in zip(axes[0], summary.values()):
        rows = s["rows"]
        x = range(len(rows))
        ax.bar([i - 0.2 for i in x], [100 * r["em"] for r in rows], 0.4, yerr=[100 * r["em_se"] for r in rows],
               capsize=3, label="exact match")
        ax.bar([i + 0.2 for i in x], [100 * r["rouge_l"] for r in rows], 0.4,
               yerr=[100 * r["rouge_se"] for r in rows], capsize=3, label="ROUGE-L")
        ax.set_xticks(list(x))
        ax.set_xticklabels([f"{r['method']}\n{r['backbone_pct']:.2f} %" for r in rows], fontsize=7)
        ax.set_ylabel("test score (%)")
        ax.set_title(s["title"], fontsize=9)
        ax.legend(fontsize=7)
        ax.grid(alpha=0.3, axis="y")
    return save_figure(fig, path)
