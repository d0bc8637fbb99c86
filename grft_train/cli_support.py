"""Helpers shared by the ``grft-train`` commands: config loading, option types, errors, the logs."""
from __future__ import annotations

import logging
import sys
from pathlib import Path
from typing import Any, Optional

import typer

from .config import ConfigError, load_config, merge_overrides, options_help, parse_set

__all__ = ["BatchOpt", "ConfigOpt", "DeviceOpt", "QuietOpt", "SeedOpt", "SetOpt", "epilog", "load_cmd",
           "package_run", "run_cli", "setup_logging"]


def epilog(cmd: str) -> str:
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
_RUN_KEYS = ("backbone", "data", "input_size", "threads", "batch_size", "seed", "objective", "generation")


def package_run(package: str) -> dict:
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
        raise typer.Exit(1) from None
    if not run.get("backbone"):
        typer.echo(f"error: {p} records no training config; pass the run file with -c", err=True)
        raise typer.Exit(2)
    return {k: run[k] for k in _RUN_KEYS if k in run}


def load_cmd(cmd: str, config: Optional[Path], sets, quiet: bool, base: dict | None = None, **flags):
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
        raise typer.Exit(2) from None


def run_cli(fn, *args):
    from grft_serve.core.backbones import BackboneError
    from grft_serve.core.generation import PromptError
    from grft_serve.core.package import PackageError

    from .data import DataError
    from .fit import FitError
    from .select import SelectionError

    try:
        return fn(*args)
    except (DataError, FitError, SelectionError, BackboneError, PackageError, PromptError, FileNotFoundError) as e:
        typer.echo(f"error: {e}", err=True)
        raise typer.Exit(1) from None


def setup_logging():
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s", stream=sys.stderr)


