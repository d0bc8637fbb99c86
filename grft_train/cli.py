"""``grft-train``: select → fit → eval for GRFT task packages.

Each command reads one YAML run file (``--config``); flags and ``--set key=value`` override it.
The full list of config keys is printed at the end of each command's ``--help``.
"""
from __future__ import annotations

import json
import logging
import sys
from pathlib import Path
from typing import Any, Optional

import typer

from .config import ConfigError, load_config, options_help, parse_set

app = typer.Typer(add_completion=False, no_args_is_help=True, rich_markup_mode=None,
                  help="GRFT training: select rows/columns by SCL gradients (select), fine-tune only them "
                       "with L2 to the pretrained weights and write a task package (fit), and measure a "
                       "package's accuracy (eval).")


def _epilog(cmd: str) -> str:
    # click keeps a paragraph that starts with \b verbatim (one option per line)
    return "\b\nConfig keys (YAML, top level or under '" + cmd + ":'; override with --set key=value):\n" \
        + options_help(cmd)


ConfigOpt = typer.Option(None, "--config", "-c", help="YAML run file (shared keys at the top level, "
                                                      "command keys at the top level or in a section)")
SetOpt = typer.Option(None, "--set", "-s", help="override any config key: --set data.max_per_class=50 "
                                                "(repeatable; values parsed as YAML)")
DeviceOpt = typer.Option(None, help="auto | cpu | cuda[:N]")
SeedOpt = typer.Option(None, help="random seed")
BatchOpt = typer.Option(None, help="batch size")
QuietOpt = typer.Option(False, "--quiet", "-q", help="no progress bars")


def _overrides(sets: list[str] | None, **flags: Any) -> dict:
    out = parse_set(sets)
    for k, v in flags.items():
        if v is not None:
            out[k] = v
    return out


def _load(cmd: str, config: Optional[Path], sets, quiet: bool, **flags):
    if quiet:
        flags["progress"] = False
    try:
        return load_config(cmd, config, _overrides(sets, **flags))
    except ConfigError as e:
        typer.echo(f"error: {e}", err=True)
        raise typer.Exit(2)


def _run(fn, *args):
    from .data import DataError
    from .fit import FitError
    from .select import SelectionError
    from grft_serve.backbones import BackboneError
    from grft_serve.package import PackageError

    try:
        return fn(*args)
    except (DataError, FitError, SelectionError, BackboneError, PackageError, FileNotFoundError) as e:
        typer.echo(f"error: {e}", err=True)
        raise typer.Exit(1)


def _setup_logging():
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s", stream=sys.stderr)


@app.command(epilog=_epilog("select"))
def select(
    config: Optional[Path] = ConfigOpt,
    set_: Optional[list[str]] = SetOpt,
    out: Optional[str] = typer.Option(None, help="selection file to write (.safetensors; heat-map .png beside)"),
    mode: Optional[str] = typer.Option(None, help="row | column | sparse (GPS baseline, not packageable)"),
    k: Optional[int] = typer.Option(None, help="rows/columns per matrix (sparse: entries per row)"),
    budget: Optional[float] = typer.Option(None, help="trainable fraction of backbone params -> per-matrix k"),
    subsets: Optional[int] = typer.Option(None, help="split train data in n subsets; select on lowest-SCL one"),
    num_batches: Optional[int] = typer.Option(None, help="SCL gradient batches to accumulate"),
    device: Optional[str] = DeviceOpt,
    seed: Optional[int] = SeedOpt,
    batch_size: Optional[int] = BatchOpt,
    quiet: bool = QuietOpt,
):
    """Score every row/column of the eligible weight matrices by accumulated squared SCL gradients
    and keep the top-k per matrix (or a global parameter budget)."""
    from .select import run_select

    _setup_logging()
    cfg = _load("select", config, set_, quiet, out=out, mode=mode, k=k, budget=budget, subsets=subsets,
                num_batches=num_batches, device=device, seed=seed, batch_size=batch_size)
    sel = _run(run_select, cfg)
    m = sel.meta
    typer.echo(json.dumps({"out": cfg.out, "mode": sel.mode, "modules": len(sel.indices),
                           "selected_values": m["selected_values"],
                           "selected_pct": round(100 * m["selected_fraction"], 4),
                           "subset_losses": m["subset_losses"], "seconds": m["seconds"],
                           "scl_batches": m["scl"]["batches"], "scl_views": m["scl"]["views"],
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


@app.command(epilog=_epilog("fit"))
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
    """Fine-tune only the selected rows/columns (+ biases + head) with CE + λ·‖θ − θ_pre‖² and write the
    task package. Trainable % = (selected row/column values + tuned biases + head parameters) / total
    backbone parameters × 100 (metrics.trainable_pct)."""
    from .fit import run_fit

    _setup_logging()
    cfg = _load("fit", config, set_, quiet, selection=selection, task_id=task_id, out_dir=out_dir,
                epochs=epochs, max_steps=max_steps, lr=lr, l2_lambda=l2_lambda, device=device, seed=seed,
                batch_size=batch_size)
    res = _run(run_fit, cfg)
    res.model.close()
    m = res.metrics
    typer.echo(json.dumps({"package": str(res.package_path), "test_acc": m["test_acc"], "val_acc": m["val_acc"],
                           "trainable_pct": round(m["trainable_pct"], 4), "seconds": m["train_seconds"]}))


@app.command("eval", epilog=_epilog("eval"))
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
    """Accuracy of a task package on a split; the package is validated against the backbone
    (fingerprint, shapes) and applied with the serving row op."""
    from .evaluate import run_eval

    _setup_logging()
    sets = list(set_ or [])
    if data is not None:
        sets.append(f"data.path={data}")
    cfg = _load("eval", config, sets, quiet, package=package, split=split, out=out, device=device,
                batch_size=batch_size)
    if not cfg.package:
        typer.echo("error: give the package path (argument or `package:` in the config)", err=True)
        raise typer.Exit(2)
    rep = _run(run_eval, cfg)
    typer.echo(json.dumps(rep, indent=2))


def main() -> None:  # pragma: no cover
    app()
