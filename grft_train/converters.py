"""Offline generation datasets, converted to the JSONL a user would write (``{"prompt", "completion"}``).

Both ship in pip packages (``make install`` installs them), so nothing is downloaded at run time;
the files they produce go through the generic loader (``data.format: jsonl``) exactly as a user's
file would.

- ``chatterbot-corpus`` (BSD): YAML conversations in ``chatterbot_corpus/data/<language>/``. Each
  conversation is a list of statements, each one answering the one before; every consecutive pair
  becomes a record (``trivia``: 260 question → answer pairs; ``tech_support``: 1,050 problem → fix
  pairs, of which only 10 are distinct). Exact duplicate records are dropped (their count is
  returned), and malformed conversations (non-string statements, single characters) are skipped.
- ``mathematics-dataset`` (Apache-2.0, DeepMind): generated question → answer pairs from its
  arithmetic and algebra modules (``arithmetic__add_or_sub``, ``algebra__linear_1d``, ...), at the
  difficulty of its ``train-easy`` / ``-medium`` / ``-hard`` splits, seeded (``random`` and
  ``numpy`` are seeded for the call and restored after it); questions are unique, at most 160
  characters, answers at most 30 (the dataset's own limits). With sympy >= 1.7 its import of
  ``sympy.solvers.diophantine.base_solution_linear`` is pointed at the function's new module first.
"""
from __future__ import annotations

import importlib
import importlib.util
import json
import random
import sys
from pathlib import Path
from typing import Iterable, Sequence

import numpy as np

from grft_serve.core.atomic import atomic_write

from .sources import DataError

__all__ = ["DIFFICULTIES", "chatterbot_categories", "chatterbot_records", "math_modules", "math_records",
           "write_jsonl"]

DIFFICULTIES = {"easy": 0, "medium": 1, "hard": 2}
MATH_FAMILIES = ("arithmetic", "algebra")
MAX_QUESTION, MAX_ANSWER = 160, 30


# ---------------------------------------------------------------------------------------------
# chatterbot-corpus
# ---------------------------------------------------------------------------------------------
def _corpus_dir(language: str) -> Path:
    spec = importlib.util.find_spec("chatterbot_corpus")
    if spec is None or not spec.submodule_search_locations:
        raise DataError("chatterbot-corpus is not installed: pip install chatterbot-corpus (make install does)")
    d = Path(list(spec.submodule_search_locations)[0]) / "data" / language
    if not d.is_dir():
        raise DataError(f"chatterbot-corpus has no language {language!r} ({d})")
    return d


def chatterbot_categories(language: str = "english") -> list[str]:
    """The corpus files of ``language`` (``trivia``, ``tech_support``, ``science``, ...)."""
    return sorted(p.stem for p in _corpus_dir(language).glob("*.yml"))


def chatterbot_records(categories: Sequence[str] = ("trivia",), language: str = "english") -> tuple[list[dict], int]:
    """(``{"prompt", "completion"}`` records, duplicates dropped) of the corpus files ``categories``
    (``["all"]``: every file of the language)."""
    import yaml

    d = _corpus_dir(language)
    known = chatterbot_categories(language)
    cats = known if list(categories) == ["all"] else list(categories)
    bad = [c for c in cats if c not in known]
    if bad:
        raise DataError(f"unknown chatterbot categories {bad}; known: {', '.join(known)}")
    out, seen, dups = [], set(), 0
    for cat in cats:
        doc = yaml.safe_load((d / f"{cat}.yml").read_text(encoding="utf-8")) or {}
        for conv in doc.get("conversations") or []:
            if not isinstance(conv, list) or not all(isinstance(s, str) and len(s.strip()) > 1 for s in conv):
                continue  # malformed (e.g. a statement split into characters)
            for q, a in zip(conv, conv[1:]):
                key = (q.strip(), a.strip())
                if key in seen:
                    dups += 1
                    continue
                seen.add(key)
                out.append({"prompt": key[0], "completion": key[1]})
    if not out:
        raise DataError(f"no question/answer pairs in chatterbot categories {cats}")
    return out, dups


# ---------------------------------------------------------------------------------------------
# mathematics-dataset
# ---------------------------------------------------------------------------------------------
def _math_modules():
    if importlib.util.find_spec("mathematics_dataset") is None:
        raise DataError("mathematics-dataset is not installed: pip install mathematics-dataset absl-py sympy "
                        "(make install does)")
    dio = importlib.import_module("sympy.solvers.diophantine.diophantine")
    pkg = sys.modules["sympy.solvers.diophantine"]
    if not hasattr(pkg, "base_solution_linear"):  # moved in sympy 1.7; mathematics_dataset imports the old path
        pkg.base_solution_linear = dio.base_solution_linear
    return importlib.import_module("mathematics_dataset.modules.modules")


def _entropy_fn(level: int, levels: int = 3):
    """mathematics_dataset's difficulty: the ``level``-th of ``levels`` slices of each entropy range."""
    def modify(range_):
        lo, hi = range_
        return lo + level / levels * (hi - lo), lo + (level + 1) / levels * (hi - lo)
    return modify


def math_modules(difficulty: str = "easy") -> dict:
    """``{"arithmetic__add_or_sub": generator, ...}`` for the arithmetic and algebra modules."""
    if difficulty not in DIFFICULTIES:
        raise DataError(f"difficulty must be one of {', '.join(DIFFICULTIES)}, got {difficulty!r}")
    mods = _math_modules().train(_entropy_fn(DIFFICULTIES[difficulty]))
    return {f"{fam}__{name}": fn for fam in MATH_FAMILIES for name, fn in sorted(mods[fam].items())}


def math_records(module: str, n: int, seed: int = 0, difficulty: str = "easy") -> list[dict]:
    """``n`` unique ``{"prompt", "completion"}`` records of ``module`` (see the module docstring)."""
    gens = math_modules(difficulty)
    if module not in gens:
        raise DataError(f"unknown math module {module!r}; known: {', '.join(gens)}")
    if n < 1:
        raise DataError("--n must be at least 1")
    py_state, np_state = random.getstate(), np.random.get_state()
    random.seed(seed)
    np.random.seed(seed % 2**32)
    out, seen, tries = [], set(), 0
    try:
        while len(out) < n:
            tries += 1
            if tries > 20 * n + 100:
                raise DataError(f"{module} gave only {len(out)} unique questions in {tries - 1} draws (asked for {n})")
            try:
                ex = gens[module]()
            except Exception as e:  # noqa: BLE001 - a module broken by a library update names itself
                raise DataError(f"math module {module} failed: {type(e).__name__}: {e}") from None
            q, a = str(ex.question).strip(), str(ex.answer).strip()
            if len(q) > MAX_QUESTION or len(a) > MAX_ANSWER or q in seen:
                continue
            seen.add(q)
            out.append({"prompt": q, "completion": a})
    finally:
        random.setstate(py_state)
        np.random.set_state(np_state)
    return out


def write_jsonl(records: Iterable[dict], out: str | Path) -> Path:
    """Write ``records`` as JSON lines (UTF-8, atomically)."""
    text = "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in records)
    return atomic_write(out, text.encode("utf-8"))
