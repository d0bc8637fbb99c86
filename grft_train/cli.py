"""``grft-train``: select → fit → eval for GRFT task packages (classification and generation),
``generate`` for a quick look at a generation task, ``data`` to convert the offline datasets.

Each command reads one YAML run file (``--config``); flags and ``--set key=value`` override it.
The full list of config keys is printed at the end of each command's ``--help``.
"""
from __future__ import annotations

import json
import os
import sys
from pathlib import Path
from typing import Optional

import typer

from .cli_gen import data_app, generate
from .cli_support import (
    BatchOpt,
    ConfigOpt,
    DeviceOpt,
    QuietOpt,
    SeedOpt,
    SetOpt,
    epilog,
    load_cmd,
    package_run,
    run_cli,
    setup_logging,
)
from .config import ConfigError, load_config, parse_set

__all__ = ["app", "main"]

if not sys.stderr.isatty():  # logs, not a terminal: no progress frames from transformers / huggingface_hub
    os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")

app = typer.Typer(add_completion=False, no_args_is_help=True, rich_markup_mode="rich",
                  help="GRFT training: select rows/columns by the gradients of the task's loss (select), "
                       "fine-tune only them with L2 to the pretrained weights and write a task package (fit), "
                       "measure a package (eval), look at a generation task's answers (generate), convert the "
                       "offline generation datasets (data).")
app.command()(generate)
app.add_typer(data_app, name="data")


@app.command(epilog=epilog("select"))
def select(
    config: Optional[Path] = ConfigOpt,
    set_: Optional[list[str]] = SetOpt,
    out: Optional[str] = typer.Option(None, help="selection file to write (.safetensors; heat-map .png beside)"),
    mode: Optional[str] = typer.Option(None, help="row | column | sparse (GPS baseline, not packageable)"),
    k: Optional[int] = typer.Option(None, help="rows/columns per matrix (sparse: entries per row)"),
    budget: Optional[float] = typer.Option(None, help="trainable fraction of backbone params -> per-matrix k"),
    subsets: Optional[int] = typer.Option(None, help="split train data in n subsets; select on the lowest-loss one"),
    num_batches: Optional[int] = typer.Option(None, help="gradient batches to accumulate (default: one pass)"),
    device: Optional[str] = DeviceOpt,
    seed: Optional[int] = SeedOpt,
    batch_size: Optional[int] = BatchOpt,
    quiet: bool = QuietOpt,
):
    """Score every row/column of the eligible weight matrices by accumulated squared gradients of the
    task's loss (SCL for classification, the answer-token cross-entropy for causal_lm) and keep the
    top-k per matrix (or a global parameter budget)."""
    from .select import run_select

    setup_logging()
    cfg = load_cmd("select", config, set_, quiet, out=out, mode=mode, k=k, budget=budget, subsets=subsets,
                num_batches=num_batches, device=device, seed=seed, batch_size=batch_size)
    sel = run_cli(run_select, cfg)
    m = sel.meta
    typer.echo(json.dumps({"out": cfg.out, "mode": sel.mode, "modules": len(sel.indices),
                           "selected_values": m["selected_values"],
                           "selected_pct": round(100 * m["selected_fraction"], 4),
                           "subset_losses": m["subset_losses"], "seconds": m["seconds"],
                           "objective": m["objective"], "grad_batches": m["grads"]["batches"],
                           **({"scl_views": m["grads"]["views"]} if "views" in m["grads"] else {}),
                           "regularised": _regularised(sel, config, set_)}))


def _regularised(sel, config, sets) -> dict:
    """The regularised set R that `fit` (same run file) will use, over the layers select saw."""
    from .config import FitConfig
    from .select import regularised_summary

    try:
        f = load_config("fit", config, parse_set(sets))
    except ConfigError:
        f = FitConfig()
    return regularised_summary(sel, f.l2_last_layers, f.l2_embed, f.l2_head)


@app.command(epilog=epilog("fit"))
def fit(
    config: Optional[Path] = ConfigOpt,
    set_: Optional[list[str]] = SetOpt,
    selection: Optional[str] = typer.Option(None, help="selection file from `select`"),
    task_id: Optional[str] = typer.Option(None, help="task id of the package"),
    out_dir: Optional[str] = typer.Option(None, help="output directory (package, metrics.json, curves.png)"),
    epochs: Optional[int] = typer.Option(None, help="training epochs"),
    max_steps: Optional[int] = typer.Option(None, help="stop after this many optimizer steps"),
    lr: Optional[float] = typer.Option(None, help="Adam learning rate"),
    l2_lambda: Optional[float] = typer.Option(None, help="λ of the L2-to-pretrained term"),
    device: Optional[str] = DeviceOpt,
    seed: Optional[int] = SeedOpt,
    batch_size: Optional[int] = BatchOpt,
    quiet: bool = QuietOpt,
):
    """Fine-tune only the selected rows/columns (+ biases + head) with the task's loss + λ·‖θ − θ_pre‖²
    and write the task package (a generation task: answer-token CE, no head). Trainable % = (selected
    row/column values + tuned biases + head parameters) / total backbone parameters × 100
    (metrics.trainable_pct)."""
    from .fit import run_fit

    setup_logging()
    cfg = load_cmd("fit", config, set_, quiet, selection=selection, task_id=task_id, out_dir=out_dir,
                epochs=epochs, max_steps=max_steps, lr=lr, l2_lambda=l2_lambda, device=device, seed=seed,
                batch_size=batch_size)
    res = run_cli(run_fit, cfg)
    res.model.close()
    m = res.metrics
    keys = (("test_exact_match", "test_rouge_l", "test_ppl", "val_loss") if m["objective"] == "causal_lm"
            else ("test_acc", "val_acc"))
    typer.echo(json.dumps({"package": str(res.package_path), **{kk: m.get(kk) for kk in keys},
                           "trainable_pct": round(m["trainable_pct"], 4), "seconds": m["train_seconds"]}))


@app.command()
def sweep(
    config: Optional[Path] = ConfigOpt,
    set_: Optional[list[str]] = SetOpt,
    k: str = typer.Option("1,2,4", "--k", help="rows/columns per matrix to try (comma list)"),
    l2: str = typer.Option("0,1e-4,1e-3", "--l2", help="λ values of the L2-to-pretrained term to try"),
    modes: str = typer.Option("row", "--modes", help="row, column or row,column"),
    out_dir: Optional[str] = typer.Option(None, help="sweep runs, sweep.jsonl/.md/.png "
                                                     "(default: <fit.out_dir>/sweep)"),
    quiet: bool = QuietOpt,
):
    """Tune k and λ as the GRFT paper does: one gradient pass, then fit every (mode, k, λ) of the
    run file's task; the best by validation score becomes <fit.out_dir>/<task_id>.grft.safetensors.
    Writes a table (sweep.md), every run (sweep.jsonl) and a plot (sweep.png)."""
    from .sweep import SweepError, parse_floats, parse_ints, run_sweep

    setup_logging()
    scfg = load_cmd("select", config, set_, quiet)
    fcfg = load_cmd("fit", config, set_, quiet)
    try:
        grid = (parse_ints(k, "--k"), parse_floats(l2, "--l2"), [m.strip() for m in modes.split(",") if m.strip()])
    except SweepError as e:
        typer.echo(f"error: {e}", err=True)
        raise typer.Exit(2) from None
    res = run_cli(run_sweep, scfg, fcfg, *grid, out_dir)
    b = res["best"]
    best_keys = ("mode", "k", "l2_lambda", "val_score", "val_acc", "test_acc", "trainable_pct")
    typer.echo(json.dumps({"package": res["package"], "best": {kk: b[kk] for kk in best_keys},
                           "runs": len(res["runs"]), "table": res["table"], "plot": res["plot"],
                           "seconds": res["seconds"]}))


@app.command("eval", epilog=epilog("eval"))
def eval_(
    package: Optional[str] = typer.Argument(None, help="task package (.grft.safetensors)"),
    config: Optional[Path] = ConfigOpt,
    set_: Optional[list[str]] = SetOpt,
    split: Optional[str] = typer.Option(None, help="train | val | test"),
    data: Optional[str] = typer.Option(None, help="data path (overrides data.path)"),
    out: Optional[str] = typer.Option(None, help="write the report JSON here"),
    device: Optional[str] = DeviceOpt,
    batch_size: Optional[int] = BatchOpt,
    quiet: bool = QuietOpt,
):
    """Accuracy of a task package on a split (a generation task: exact match, ROUGE-L and answer
    perplexity of the task and of its untuned base); the package is validated against the backbone
    (fingerprint, shapes) and applied with the serving row op. Without --config, the backbone, data
    and input size recorded in the package's training config are used."""
    from .evaluate import run_eval

    setup_logging()
    sets = list(set_ or [])
    if data is not None:
        sets.append(f"data.path={data}")
    base = package_run(package) if package and config is None else None
    cfg = load_cmd("eval", config, sets, quiet, base=base, package=package, split=split, out=out, device=device,
                batch_size=batch_size)
    if not cfg.package:
        typer.echo("error: give the package path (argument or `package:` in the config)", err=True)
        raise typer.Exit(2)
    rep = run_cli(run_eval, cfg)
    typer.echo(json.dumps(rep, indent=2))


@app.command()
def samples(
    config: Optional[Path] = ConfigOpt,
    set_: Optional[list[str]] = SetOpt,
    split: str = typer.Option("test", help="train | val | test"),
    n: int = typer.Option(4, "-n", help="how many inputs (the split's first ones)"),
    out: Path = typer.Option(Path("runs/samples"), help="directory to write them to"),
    quiet: bool = QuietOpt,
):
    """Write the first N inputs of a run's data split as files (PNG images / UTF-8 texts), named
    <index>-<label> (generation data: <index>-prompt.txt): inputs to try `grft-serve predict` with."""
    import re

    from .context import load_run_data

    setup_logging()
    cfg = load_cmd("eval", config, set_, quiet)
    splits = run_cli(load_run_data, cfg, None, False)
    ds = run_cli(splits.split, split)
    out.mkdir(parents=True, exist_ok=True)
    files = []
    for i in range(min(n, len(ds))):
        if splits.kind == "generation":
            x, name = ds[i].question, f"{i:03d}-prompt"
        else:
            x, y = ds[i]
            name = f"{i:03d}-{re.sub(r'[^A-Za-z0-9_.-]+', '_', splits.labels[y])}"
        if isinstance(x, str):
            path = out / f"{name}.txt"
            path.write_text(x, encoding="utf-8")
        else:
            path = out / f"{name}.png"
            x.save(path)
        files.append(str(path))
    typer.echo(json.dumps({"split": split, "files": files}))


def main() -> None:  # pragma: no cover
    app()
