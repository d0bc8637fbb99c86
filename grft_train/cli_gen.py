"""``grft-train generate`` (a generation task's answers) and ``grft-train data`` (offline datasets -> JSONL)."""
from __future__ import annotations

import json
from pathlib import Path
from typing import Optional

import typer

from .cli_support import ConfigOpt, DeviceOpt, QuietOpt, SetOpt, load_cmd, package_run, run_cli, setup_logging

__all__ = ["data_app", "generate"]

data_app = typer.Typer(add_completion=False, no_args_is_help=True,
                       help="Convert the offline generation datasets to JSONL ({prompt, completion} per line) "
                            "for data.format jsonl.")


def generate(
    package: str = typer.Argument(..., help="generation task package (.grft.safetensors)"),
    prompts: Optional[list[str]] = typer.Argument(None, help="prompt(s); each is answered separately"),
    messages: Optional[str] = typer.Option(None, help="a chat as JSON ([{role, content}, ...]) or @file.json"),
    chat: Optional[bool] = typer.Option(None, "--chat/--no-chat", help="send each prompt as a user turn through "
                                        "the chat template (default: as the task was trained)"),
    max_new_tokens: Optional[int] = typer.Option(None, help="answer length limit (default: the package's)"),
    temperature: Optional[float] = typer.Option(None, help="0: greedy (default: the package's)"),
    top_p: Optional[float] = typer.Option(None, help="nucleus sampling (default: the package's)"),
    seed: int = typer.Option(0, help="sampling seed"),
    base: bool = typer.Option(False, "--base", help="answer with the untuned base (same prompt format)"),
    as_json: bool = typer.Option(False, "--json", help="one JSON object per answer (text and token ids)"),
    config: Optional[Path] = ConfigOpt,
    set_: Optional[list[str]] = SetOpt,
    device: Optional[str] = DeviceOpt,
    quiet: bool = QuietOpt,
):
    """Answer prompts with a generation task: the package's prompt format and defaults, the package
    applied to its frozen base by the training row op, greedy decoding by default (the reference the
    served answers match token for token). The base is the one recorded in the package (or -c)."""
    from grft_serve.core.package import peek_meta

    from .common import build_backbone, resolve_device
    from .generate import finish_text, generate_ids

    setup_logging()
    run = package_run(package) if config is None else None
    cfg = load_cmd("eval", config, set_, quiet, base=run, package=package, device=device)
    items: list = list(prompts or [])
    if messages is not None:
        raw = Path(messages[1:]).read_text(encoding="utf-8") if messages.startswith("@") else messages
        try:
            items.append(json.loads(raw))
        except json.JSONDecodeError as e:
            typer.echo(f"error: --messages is not JSON: {e}", err=True)
            raise typer.Exit(2) from None
    if not items:
        typer.echo("error: give a prompt (argument) or --messages", err=True)
        raise typer.Exit(2)
    meta = run_cli(peek_meta, package)
    if meta.generation is None:
        typer.echo(f"error: {package} is a {meta.kind} package: it does not generate text", err=True)
        raise typer.Exit(1)
    bb = run_cli(build_backbone, cfg, resolve_device(cfg.device))
    kw = dict(chat=chat, max_new_tokens=max_new_tokens, temperature=temperature, top_p=top_p, seed=seed,
              meta=meta.generation)
    ids = run_cli(lambda: generate_ids(None if base else package, bb, items, **kw))
    for p, out in zip(items, ids):
        text = finish_text(bb.tokenizer, out, meta.generation.stop)
        if as_json:
            typer.echo(json.dumps({"prompt": p, "text": text, "token_ids": out,
                                   "task_id": None if base else meta.task_id}))
        else:
            typer.echo(text)


@data_app.command("chatterbot")
def data_chatterbot(
    out: Path = typer.Option(..., help="JSONL file to write"),
    category: list[str] = typer.Option(["trivia"], help="corpus file(s): trivia, tech_support, science, ... "
                                                        "or all (repeatable)"),
    language: str = typer.Option("english", help="corpus language folder"),
):
    """chatterbot-corpus conversations -> {prompt, completion} records (each statement and its reply;
    exact duplicates dropped)."""
    from .converters import chatterbot_records, write_jsonl

    recs, dups = run_cli(chatterbot_records, category, language)
    write_jsonl(recs, out)
    typer.echo(json.dumps({"out": str(out), "records": len(recs), "duplicates_dropped": dups}))


@data_app.command("math")
def data_math(
    out: Path = typer.Option(..., help="JSONL file to write"),
    module: str = typer.Option("arithmetic__add_or_sub", help="arithmetic__* or algebra__* module "
                                                              "(e.g. algebra__linear_1d)"),
    n: int = typer.Option(1000, "--n", help="number of (unique) questions"),
    seed: int = typer.Option(0, help="generator seed"),
    difficulty: str = typer.Option("easy", help="easy | medium | hard (the dataset's train-* levels)"),
):
    """mathematics-dataset questions -> {prompt, completion} records."""
    from .converters import math_records, write_jsonl

    recs = run_cli(math_records, module, n, seed, difficulty)
    write_jsonl(recs, out)
    typer.echo(json.dumps({"out": str(out), "records": len(recs), "module": module, "difficulty": difficulty,
                           "seed": seed}))
