"""Generation data: ``{"prompt", "completion"}`` or ``{"messages": [...]}`` records -> train/val/test.

The records come through the same reader as classification text (:func:`grft_train.sources.read_rows`:
JSONL, or CSV for prompt/completion columns), with the column names of the data config
(``prompt_column``, ``completion_column``, ``messages_column``). Each record is checked as it is
read, and a bad one is a :class:`DataError` naming the file, the line and the problem:

- a record needs both the prompt and the completion keys, or the messages key;
- a completion (or the assistant's final answer) must not be empty;
- a chat must end with the assistant's answer (roles system/user/assistant, string contents);
- one file holds one kind of record (chat or prompt/completion), not both.

Whether a prompt fits the context is checked when the examples are tokenized (the tokenizer is the
backbone's: :mod:`grft_train.causal`). Splits: a provided ``test_path`` is the test split; the
missing val/test splits are carved from the train file at random (seeded by ``data.seed``, sizes
``round(N · fraction)``, at least one example each), then ``max_per_class`` / ``max_eval_per_class``
cap the train / val and test examples (a generation task has no classes: the split counts as one).
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any, Sequence

import numpy as np
import torch.utils.data

from grft_serve.core.generation import GenerationMeta, PromptError, check_messages

from .data import SPLITS, DataConfig, DataSplits, _cap, _carve, _split_sizes
from .sources import DataError, read_rows

__all__ = ["Example", "ExampleSet", "example_messages", "load_examples", "read_examples"]

GENERATION_FORMATS = ("jsonl", "csv")


@dataclass(frozen=True)
class Example:
    """One training example: ``prompt`` + ``completion``, or a chat whose last turn is the answer."""

    where: str  # "file:line", for error messages
    prompt: str | None = None
    completion: str | None = None
    messages: tuple[dict, ...] | None = None

    @property
    def chat(self) -> bool:
        return self.messages is not None

    @property
    def answer(self) -> str:
        return self.messages[-1]["content"] if self.messages is not None else (self.completion or "")

    @property
    def question(self) -> str:
        """The prompt, or the last user turn of a chat (for summaries and samples)."""
        if self.messages is None:
            return self.prompt or ""
        users = [m["content"] for m in self.messages[:-1] if m["role"] == "user"]
        return users[-1] if users else ""


class ExampleSet(torch.utils.data.Dataset):
    """A split of generation examples (``ds[i] -> Example``)."""

    kind = "generation"

    def __init__(self, examples: Sequence[Example], workers: int | None = None):
        self.examples = list(examples)
        self.workers = workers
        self.targets: list[int] = []

    def __len__(self) -> int:
        return len(self.examples)

    def __getitem__(self, i: int) -> Example:
        return self.examples[i]

    def subset(self, idx: Sequence[int]) -> "ExampleSet":
        return ExampleSet([self.examples[i] for i in idx], self.workers)

    def class_counts(self) -> dict[str, int]:
        return {}


def example_messages(ex: Example, meta: GenerationMeta) -> list[dict] | None:
    """The chat an example trains on (``None`` in completion format)."""
    if ex.chat:
        return list(ex.messages)
    if meta.format == "chat":
        return [{"role": "user", "content": ex.prompt or ""}, {"role": "assistant", "content": ex.completion}]
    return None


def _text(v: Any, where: str, key: str) -> str:
    if isinstance(v, str):
        return v
    if isinstance(v, (int, float)) and not isinstance(v, bool):  # e.g. numeric answers in JSON
        return str(v)
    raise DataError(f"{where}: {key!r} must be a string, got {type(v).__name__}")


def _example(row: dict, where: str, cfg: DataConfig) -> Example:
    if cfg.messages_column in row:
        try:
            msgs = check_messages(row[cfg.messages_column], need_answer=True)
        except PromptError as e:
            raise DataError(f"{where}: {cfg.messages_column!r}: {e}") from None
        if not msgs[-1]["content"].strip():
            raise DataError(f"{where}: empty completion (the assistant's last message is empty)")
        return Example(where, messages=tuple(msgs))
    missing = [c for c in (cfg.prompt_column, cfg.completion_column) if c not in row or row[c] is None]
    if missing:
        raise DataError(f"{where}: missing key {missing[0]!r}: a record needs {cfg.prompt_column!r} and "
                        f"{cfg.completion_column!r}, or {cfg.messages_column!r} (keys: {sorted(row)[:10]})")
    prompt = _text(row[cfg.prompt_column], where, cfg.prompt_column)
    completion = _text(row[cfg.completion_column], where, cfg.completion_column)
    if not completion.strip():
        raise DataError(f"{where}: empty completion")
    return Example(where, prompt=prompt, completion=completion)


def read_examples(path: str | Path, fmt: str, cfg: DataConfig) -> list[Example]:
    """Every record of ``path`` as an :class:`Example` (checked; see the module docstring)."""
    if fmt not in GENERATION_FORMATS:
        raise DataError(f"generation data must be jsonl or csv (data.format), got {fmt!r}")
    out: list[Example] = []
    first_chat: str | None = None
    first_plain: str | None = None
    for line, row in read_rows(path, fmt):
        ex = _example(row, f"{path}:{line}", cfg)
        if ex.chat:
            first_chat = first_chat or ex.where
        else:
            first_plain = first_plain or ex.where
        if first_chat and first_plain:
            raise DataError(f"{ex.where}: the file mixes chat records ({first_chat}) and prompt/completion "
                            f"records ({first_plain}); use one kind per file")
        out.append(ex)
    if not out:
        raise DataError(f"{path}: no records")
    return out


def load_examples(cfg: DataConfig | dict) -> DataSplits:
    """Train/val/test splits of a generation dataset (``labels`` empty, ``kind`` ``generation``)."""
    if isinstance(cfg, dict):
        cfg = DataConfig(**cfg)
    if not cfg.path:
        raise DataError(f"data config needs `path` ({cfg.format} file of prompt/completion or messages records)")
    main = read_examples(cfg.path, cfg.format, cfg)
    provided = {"test": read_examples(cfg.test_path, cfg.format, cfg)} if cfg.test_path else {}
    if provided and provided["test"][0].chat != main[0].chat:
        raise DataError(f"{cfg.test_path} and {cfg.path} hold different kinds of records (chat vs prompt/completion)")
    carve = {s: f for s, f in (("test", cfg.test_fraction), ("val", cfg.val_fraction)) if s not in provided and f > 0}
    if len(main) < 1 + len(carve):
        raise DataError(f"{cfg.path}: {len(main)} example(s) cannot be split into train/{'/'.join(reversed(carve))}: "
                        "add examples or set data.val_fraction / data.test_fraction to 0")
    y = np.zeros(len(main), dtype=np.int64)
    rest = np.arange(len(main))
    parts: dict[str, np.ndarray] = {}
    for s, n in _split_sizes(len(main), 1, carve).items():
        rest, parts[s] = _carve(rest, y[rest], n, cfg.seed)
    parts["train"] = rest
    rng = np.random.default_rng(cfg.seed)
    out = {}
    for s in SPLITS:
        cap = cfg.max_per_class if s == "train" else cfg.max_eval_per_class
        if s in provided:
            src = provided[s]
            sel = _cap(np.arange(len(src)), np.zeros(len(src), dtype=np.int64), cap, rng)
        else:
            src = main
            sel = _cap(parts.get(s, np.zeros(0, dtype=np.int64)), y, cap, rng)
        out[s] = ExampleSet([src[int(i)] for i in sel], cfg.workers)
    info = {"source": str(cfg.path),
            "sources": {"train": str(cfg.path), **({"test": str(cfg.test_path)} if provided else {})},
            "layout": "chat records" if main[0].chat else "prompt/completion records", "carved": sorted(carve),
            "notes": [], "sizes": {s: len(out[s]) for s in SPLITS}}
    return DataSplits(out["train"], out["val"], out["test"], [], "generation", info)
