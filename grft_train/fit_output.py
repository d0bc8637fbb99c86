"""What ``grft-train fit`` writes: final metrics of the kept epoch, the task package, curves.

Metrics (``metrics.json``, and the package's ``metrics`` without the history): loss and accuracy
on val and test (classification: accuracy of the head; generation: accuracy of the answer tokens
under teacher forcing), for generation tasks also the answer perplexity and, on the test split,
the exact match and ROUGE-L of greedy answers (:mod:`grft_train.geneval`); trainable-parameter
counts and percentage (:data:`TRAINABLE_DEF`); wall and CPU seconds of each stage.

The package (:func:`make_package`) holds the trained rows/columns and biases of every module, the
head of a classification task, and the objective's metadata: the labels, or (``kind: generation``)
the prompt format and answer defaults of :class:`~grft_serve.core.generation.GenerationMeta`; the
preprocessing is the run's (``{"kind": "text", "max_length": context}`` for a causal LM).
"""
from __future__ import annotations

import json
import logging
import math
import time
from pathlib import Path
from typing import TYPE_CHECKING, Any

from grft_serve.core.package import PackageMeta, TaskPackage, save_package
from grft_serve.core.rowop import ModuleDelta

from .config import FitConfig
from .layers import describe_regularised
from .plots import pyplot, save_figure

if TYPE_CHECKING:
    from .context import RunContext
    from .fit import FitSetup
    from .model import TaskModel
    from .select import Selection

__all__ = ["TRAINABLE_DEF", "make_package", "plot_curves", "write_fit"]

log = logging.getLogger("grft_train.fit")
TRAINABLE_DEF = ("(selected row/column values + tuned biases + head parameters) / total backbone "
                 "parameters x 100")


def write_fit(cfg: FitConfig, ctx: "RunContext", st: "FitSetup", sel: "Selection", history: list[dict],
              best: dict, t0: float, packaged: bool = True) -> tuple[Path | None, dict[str, Any]]:
    """Evaluate the kept model on test and val, write the package (when ``packaged``), metrics.json
    and curves.png to ``cfg.out_dir``; returns (package path or None, metrics)."""
    obj = ctx.objective
    t_ev = time.time()
    test_res = obj.evaluate(st.forward, st.data["test"], cfg.batch_size, cfg.bf16) if len(st.data["test"]) else {}
    val_res = obj.evaluate(st.forward, st.data["val"], cfg.batch_size, cfg.bf16) if len(st.data["val"]) else {}
    extra = obj.final_metrics(st.model, "test", cfg.batch_size) if len(st.data["test"]) else {}
    eval_s = st.timings["eval_s"] + time.time() - t_ev
    c = st.counts
    trainable = c["body"] + c["head"]
    metrics = {
        "objective": obj.name,
        "test_acc": test_res.get("acc"), "test_loss": test_res.get("loss"), "n_test": test_res.get("n", 0),
        "val_acc": val_res.get("acc"), "val_loss": val_res.get("loss"),
        "val_score": best["score"][0] if best.get("score") is not None else None,
        "best_epoch": best["epoch"], "steps": st.timings["steps"],
        "trainable_params": trainable, "trainable_values": c["values"], "trainable_biases": c["bias"],
        "head_params": c["head"], "backbone_params": ctx.total_params,
        "trainable_pct": 100.0 * trainable / ctx.total_params,
        "trainable_pct_definition": TRAINABLE_DEF, "bias": cfg.bias,
        "n_train": len(st.data["train"]), "n_val": len(st.data["val"]), "train_seconds": round(time.time() - t0, 2),
        "step_seconds": round(st.timings["step_s"], 2), "step_cpu_seconds": round(st.timings["step_cpu"], 2),
        "eval_seconds": round(eval_s, 2), "preprocess_seconds": round(st.prep_s, 2), "device": str(ctx.device),
        "head_only": st.head_only,
        "regularised": describe_regularised(ctx.used, cfg.l2_last_layers, cfg.l2_embed,
                                            cfg.l2_head and st.model.head is not None),
        "regularised_modules": sorted(st.reg), "history": history,
    }
    if obj.kind == "generation":
        metrics["acc_definition"] = "answer tokens predicted right under teacher forcing"
        for split, res in (("test", test_res), ("val", val_res)):
            if res:
                metrics[f"{split}_ppl"] = math.exp(min(res["loss"], 50.0))
    metrics.update(extra)
    out_dir = Path(cfg.out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    pkg_path = None
    if packaged:
        pkg_path = Path(cfg.package) if cfg.package else out_dir / f"{cfg.task_id}.grft.safetensors"
        save_package(make_package(st.model, sel, ctx.spec, cfg, metrics, ctx.preprocessing,
                                  ctx.objective.package_fields()), pkg_path)
    metrics["package"] = str(pkg_path) if pkg_path else None
    (out_dir / "metrics.json").write_text(json.dumps(metrics, indent=2))
    try:
        plot_curves(history, out_dir / "curves.png", cfg.task_id)
    except Exception as e:  # noqa: BLE001 - plots are a convenience
        log.warning("curve plot failed: %s", e)
    return pkg_path, metrics


def make_package(model: "TaskModel", sel: "Selection", spec, cfg: FitConfig, metrics: dict, preprocessing: dict,
                 fields: dict) -> TaskPackage:
    """The task package of a trained model on the base ``spec``: its rows/columns and biases, the head
    (classification) and the metadata of the run; ``fields`` are the objective's (kind, labels,
    generation: :meth:`~grft_train.objective.Objective.package_fields`)."""
    deltas = {}
    for n in model.names:
        b = model.bias(n)
        deltas[n] = ModuleDelta(mode=sel.mode, indices=model.indices(n).detach().cpu(),
                                values=model.value(n).detach().float().cpu(),
                                bias=b.detach().float().cpu() if b is not None else None)
    ks = {n: int(d.indices.numel()) for n, d in deltas.items() if d.indices.numel()}  # bias-only: k=0
    k_meta: int | dict[str, int] = (ks[next(iter(ks))] if len(set(ks.values())) == 1 else ks) if ks else 0
    pkg_metrics = {k: v for k, v in metrics.items() if k not in ("history", "regularised_modules")}
    meta = PackageMeta(task_id=cfg.task_id, base_model_id=spec.model_id, base_fingerprint=spec.fingerprint,
                       mode=sel.mode, k=k_meta, **fields, preprocessing=preprocessing, metrics=pkg_metrics,
                       training_config=cfg.model_dump(mode="json"),
                       trainable_pct_definition=TRAINABLE_DEF,
                       selection={kk: sel.meta.get(kk) for kk in ("budget", "subsets", "chosen_subset",
                                                                  "selected_fraction")})
    head = model.head
    return TaskPackage(meta=meta, deltas=deltas,
                       head_weight=head.weight.detach().float().cpu() if head is not None else None,
                       head_bias=head.bias.detach().float().cpu() if head is not None else None)


def plot_curves(history: list[dict], path: Path, title: str = "") -> Path:
    plt = pyplot()

    ep = [h["epoch"] for h in history]
    fig, (a1, a2) = plt.subplots(1, 2, figsize=(9, 3.4))
    a1.plot(ep, [h["train_loss"] for h in history], "o-", label="train")
    if any("val_loss" in h for h in history):
        a1.plot([h["epoch"] for h in history if "val_loss" in h], [h["val_loss"] for h in history if "val_loss" in h],
                "o-", label="val")
    a1.set_xlabel("epoch"), a1.set_ylabel("loss"), a1.legend()
    a2.plot(ep, [h["train_acc"] for h in history], "o-", label="train")
    if any("val_acc" in h for h in history):
        a2.plot([h["epoch"] for h in history if "val_acc" in h], [h["val_acc"] for h in history if "val_acc" in h],
                "o-", label="val")
    a2.set_xlabel("epoch"), a2.set_ylabel("accuracy"), a2.legend()
    fig.suptitle(f"GRFT {title}")
    return save_figure(fig, path)
