"""``grft-train``: select → fit → eval for GRFT task packages.

Each command reads one YAML run file (``--config``); flags and ``--set key=value`` override it.
The full list of config keys is printed at the end of each command's ``--help``.
"""
from __future__ import annotations

import json
import logging
import os
import sys
from pathlib import Path
from typing import Any, Optional

import typer

from .config import ConfigError, load_config, merge_overrides, options_help, parse_set

__all__ = ["app", "main"]

if not sys.stderr.isatty():  # logs, not a terminal: no progress frames from transformers / huggingface_hub
    os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")

app = typer.Typer(add_completion=False, no_args_is_help=True, rich_markup_mode="rich",
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
QuietOpt = typer.Option(False, "--quiet", "-q", metavar="", help="no progress bars, no log lines below warnings: "
                                                                "only the JSON result")


def _overrides(sets: list[str] | None, **flags: Any) -> dict:
    out = parse_set(sets)
    for k, v in flags.items():
        if v is not None:
            out[k] = v
    return out


# keys of a package's recorded training config that say how to rebuild its base and data
_RUN_KEYS = ("backbone", "data", "input_size", "threads", "batch_size", "seed")


def _package_run(package: str) -> dict:
    """The shared part of the run a package was trained with (its ``training_config``)."""
    from grft_serve.core.package import PackageError, peek_meta

    p = Path(package)
    if not p.is_file():
        typer.echo(f"error: package not found: {p}", err=True)
        raise typer.Exit(2)
    try:
        run = peek_meta(p).training_config or {}
    except PackageError as e:
        typer.echo(f"error: {e}", err=True)
        raise typer.Exit(1)
    if not run.get("backbone"):
        typer.echo(f"error: {p} records no training config; pass the run file with -c", err=True)
        raise typer.Exit(2)
    return {k: run[k] for k in _RUN_KEYS if k in run}


def _load(cmd: str, config: Optional[Path], sets, quiet: bool, base: dict | None = None, **flags):
    """The command's config: ``base`` (e.g. a package's recorded run), then the file, --set and flags.

    Progress bars only on a terminal (logs get one line per epoch instead); ``quiet`` also raises
    the log level to warnings."""
    if quiet or not sys.stderr.isatty():
        flags["progress"] = False
    if quiet:
        logging.getLogger().setLevel(logging.WARNING)
    try:
        over = _overrides(sets, **flags)
        return load_config(cmd, config, merge_overrides(base, over) if base else over)
    except ConfigError as e:
        typer.echo(f"error: {e}", err=True)
        raise typer.Exit(2)


def _run(fn, *args):
    from .data import DataError
    from .fit import FitError
    from .select import SelectionError
    from grft_serve.core.backbones import BackboneError
    from grft_serve.core.package import PackageError

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
    """Tune k and λ as the GRFT paper does: one SCL-gradient pass, then fit every (mode, k, λ) of the
    run file's task; the best by validation accuracy becomes <fit.out_dir>/<task_id>.grft.safetensors.
    Writes a table (sweep.md), every run (sweep.jsonl) and a plot (sweep.png)."""
    from .sweep import SweepError, parse_floats, parse_ints, run_sweep

    _setup_logging()
    scfg = _load("select", config, set_, quiet)
    fcfg = _load("fit", config, set_, quiet)
    try:
        grid = (parse_ints(k, "--k"), parse_floats(l2, "--l2"), [m.strip() for m in modes.split(",") if m.strip()])
    except SweepError as e:
        typer.echo(f"error: {e}", err=True)
        raise typer.Exit(2)
    res = _run(run_sweep, scfg, fcfg, *grid, out_dir)
    b = res["best"]
    typer.echo(json.dumps({"package": res["package"], "best": {kk: b[kk] for kk in ("mode", "k", "l2_lambda", "val_acc",
                                                                                     "test_acc", "trainable_pct")},
                           "runs": len(res["runs"]), "table": res["table"], "plot": res["plot"],
                           "seconds": res["seconds"]}))


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
    (fingerprint, shapes) and applied with the serving row op. Without --config, the backbone, data
    and input size recorded in the package's training config are used."""
    from .evaluate import run_eval

    _setup_logging()
    sets = list(set_ or [])
    if data is not None:
        sets.append(f"data.path={data}")
    base = _package_run(package) if package and config is None else None
    cfg = _load("eval", config, sets, quiet, base=base, package=package, split=split, out=out, device=device,
                batch_size=batch_size)
    if not cfg.package:
        typer.echo("error: give the package path (argument or `package:` in the config)", err=True)
        raise typer.Exit(2)
    rep = _run(run_eval, cfg)
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
    <index>-<label>: inputs to try `grft-serve predict` with."""
    import re

    from .common import load_data

    _setup_logging()
    cfg = _load("eval", config, set_, quiet)
    splits = _run(load_data, cfg, None, False)
    ds = _run(splits.split, split)
    out.mkdir(parents=True, exist_ok=True)
    files = []
    for i in range(min(n, len(ds))):
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
