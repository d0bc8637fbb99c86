"""Answer metrics of generation tasks: normalised exact match and ROUGE-L.

- **Normalisation** (SQuAD-style, for numbers too): lower-case; split on whitespace; strip the
  punctuation around each token (``"Paris."`` → ``paris``, ``'"Hamlet",'`` → ``hamlet``) but keep
  what is inside it and a sign before a digit (``-4/9``, ``3.5``, ``-18181.8`` stay as they are, so
  a wrong sign is still wrong); drop the articles *a*, *an*, *the*; join with single spaces.
- **Exact match**: 1 when the normalised answer equals the normalised reference, else 0; averaged.
- **ROUGE-L**: F-measure of the longest common subsequence of tokens, from the ``rouge-score``
  package (its tokenizer: lower-cased alphanumeric runs, no stemming); averaged. Both empty: 0.

Computed locally by the ``rouge-score`` package (never ``evaluate.load``, which fetches scripts
from a hub at run time).
"""
from __future__ import annotations

import string
from functools import lru_cache
from typing import Sequence

__all__ = ["answer_metrics", "exact_match", "normalize_answer", "rouge_l"]

_ARTICLES = {"a", "an", "the"}
_PUNCT = string.punctuation + "“”‘’«»…–—"


def _strip_token(tok: str) -> str:
    sign = ""
    head = tok.lstrip(_PUNCT)
    if len(head) < len(tok) and tok[len(tok) - len(head) - 1] in "+-" and head[:1].isdigit():
        sign = tok[len(tok) - len(head) - 1]
    body = head.rstrip(_PUNCT)
    return sign + body if body else ""


def normalize_answer(text: str) -> str:
    """The normal form compared by :func:`exact_match` (see the module docstring)."""
    toks = (_strip_token(t) for t in str(text).lower().split())
    return " ".join(t for t in toks if t and t not in _ARTICLES)


def exact_match(prediction: str, reference: str) -> float:
    return float(normalize_answer(prediction) == normalize_answer(reference))


@lru_cache(maxsize=1)
def _scorer():
    from rouge_score import rouge_scorer

    return rouge_scorer.RougeScorer(["rougeL"], use_stemmer=False)


def rouge_l(prediction: str, reference: str) -> float:
    """ROUGE-L F-measure of ``prediction`` against ``reference``."""
    return float(_scorer().score(reference, prediction)["rougeL"].fmeasure)


def answer_metrics(predictions: Sequence[str], references: Sequence[str]) -> dict:
    """``{"exact_match", "rouge_l", "n"}`` averaged over aligned predictions and references."""
    if len(predictions) != len(references):
        raise ValueError(f"{len(predictions)} predictions for {len(references)} references")
    n = len(references)
    if not n:
        return {"exact_match": None, "rouge_l": None, "n": 0}
    return {"exact_match": sum(map(exact_match, predictions, references)) / n,
            "rouge_l": sum(map(rouge_l, predictions, references)) / n, "n": n}
