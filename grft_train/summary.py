"""The dataset summary printed at the start of select / fit / eval.

Classification data: one table, a row per class with its sample count in each split, a total row, then where the data
came from (and which split layout was detected), which splits were carved from train, and the input
sizes seen in a sample of the train split (image width × height, or words per text) next to what
the backbone is fed.
"""
from __future__ import annotations

import io

import numpy as np

from .data import SPLITS, DataSplits

__all__ = ["generation_summary", "summary_table", "input_sizes"]


def input_sizes(splits: DataSplits, n: int = 16) -> str:
    """Sizes of the first ``n`` train inputs: ``WxH`` range for images, words per text for text."""
    ds = splits.train
    k = min(n, len(ds))
    if not k:
        return "-"
    raws = [ds[i][0] for i in range(k)]
    if splits.kind == "text":
        words = np.array([len(str(r).split()) for r in raws])
        return f"{words.min()}-{words.max()} words (median {int(np.median(words))}, first {k} train texts)"
    sizes = sorted({getattr(r, "size", None) for r in raws} - {None})
    if not sizes:
        return "-"
    fmt = [f"{w}x{h}" for w, h in sizes]
    shown = fmt[0] if len(fmt) == 1 else f"{len(fmt)} sizes, {fmt[0]} .. {fmt[-1]}"
    return f"{shown} px (first {k} train images)"


def _model_input(backbone, preprocessing: dict | None) -> str | None:
    if backbone is None:
        return None
    prep = preprocessing if preprocessing is not None else backbone.preprocessing_meta()
    dc = prep.get("timm_data_config") or {}
    if "input_size" in dc:
        return f"{backbone.model_id} takes {dc['input_size'][-1]}x{dc['input_size'][-2]} px"
    if prep.get("max_length"):
        return f"{backbone.model_id} takes up to {prep['max_length']} tokens"
    return f"{backbone.model_id}"


def summary_table(splits: DataSplits, backbone=None, preprocessing: dict | None = None) -> str:
    """The summary as plain text (a rich table, no colour codes); the model line shows the input
    size of ``preprocessing`` (default: the backbone's own)."""
    from rich import box
    from rich.console import Console
    from rich.table import Table

    info = splits.info
    counts = {s: splits.split(s).class_counts() for s in SPLITS}
    table = Table(title=f"{len(splits.labels)} classes, {splits.kind} data", title_justify="left",
                  box=box.ASCII)
    table.add_column("class")
    for s in SPLITS:
        table.add_column(s + (" (carved)" if s in info.get("carved", ()) else ""), justify="right")
    for name in splits.labels:
        table.add_row(name, *(str(counts[s][name]) for s in SPLITS))
    table.add_section()
    table.add_row("total", *(str(len(splits.split(s))) for s in SPLITS))
    buf = io.StringIO()
    con = Console(file=buf, width=100, color_system=None, force_terminal=False, soft_wrap=False)
    con.print(table)
    lines = [buf.getvalue().rstrip()]
    for s, where in (info.get("sources") or {}).items():
        lines.append(f"{s} source: {where}")
    if info.get("layout"):
        lines.append(f"layout: {info['layout']}")
    lines.append(f"inputs: {input_sizes(splits)}")
    model = _model_input(backbone, preprocessing)
    if model:
        lines.append(f"model: {model}")
    return "\n".join(lines)


def _words(texts: list[str]) -> str:
    if not texts:
        return "-"
    w = np.array([len(t.split()) for t in texts])
    return f"{w.min()}-{w.max()} (median {int(np.median(w))})"


def generation_summary(splits: DataSplits, backbone=None, preprocessing: dict | None = None) -> str:
    """Generation data: examples per split, words per prompt and per answer, the record kind."""
    lines = [f"generation data ({splits.info.get('layout', 'records')}): "
             + ", ".join(f"{s} {len(splits.split(s))}" + (" (carved)" if s in splits.info.get("carved", ()) else "")
                         for s in SPLITS)]
    first = [splits.train[i] for i in range(min(64, len(splits.train)))]
    lines.append(f"words per prompt {_words([e.question for e in first])}, per answer "
                 f"{_words([e.answer for e in first])} (first {len(first)} train examples)")
    for s, where in (splits.info.get("sources") or {}).items():
        lines.append(f"{s} source: {where}")
    model = _model_input(backbone, preprocessing)
    if model:
        lines.append(f"model: {model}")
    return "\n".join(lines)
