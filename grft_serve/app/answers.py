"""What a classification answer looks like: the replica's side of :meth:`Engine.run
<grft_serve.engine.Engine.run>`.

The engine reports, per sample, the logits of its task's head and the task version that computed
them (:class:`~grft_serve.engine.BatchResult`); this module turns them into the ``Prediction`` JSON
of the HTTP API::

    p = softmax(logits)                    over the task's own classes (float32)
    top_k = the k largest p, best first    k = min(top_k, number of classes)
    {"task", "version", "label": labels[argmax p], "score": max p, "top_k": [{"label", "score"}, ...]}

``labels`` are the task's metadata labels of the registration that ran the forward
(``BatchResult.infos``), so an answer's labels always belong to the version it names.

An input whose scores are not finite numbers (a head that overflows the serving dtype: one infinite
logit makes every probability NaN) is refused, never answered: :func:`first_non_finite` finds it.

:func:`predict` runs raw inputs through an engine and answers them the same way, without serving
(a reference for tests and scripts).
"""
from __future__ import annotations

import math
from typing import TYPE_CHECKING, Any, Mapping, Sequence

from .prepare import prep_key

if TYPE_CHECKING:
    import torch

__all__ = ["answers", "first_non_finite", "predict"]


def answers(logits: Sequence[torch.Tensor], task_ids: Sequence[str], versions: Sequence[str],
            labels: Mapping[str, Sequence[str]], top_k: int) -> list[dict]:
    """One answer per sample (see the module docstring); ``labels``: task id → its labels."""
    out = []
    for lg, tid, ver in zip(logits, task_ids, versions):
        names = labels[tid]
        p = lg.softmax(-1)
        sc, ix = p.topk(min(top_k, p.numel()))
        sc, ix = sc.tolist(), ix.tolist()
        out.append({"task": tid, "version": ver, "label": names[ix[0]], "score": sc[0],
                    "top_k": [{"label": names[i], "score": s} for s, i in zip(sc, ix)]})
    return out


def first_non_finite(answered: Sequence[dict]) -> int | None:
    """Index of the first answer with a score that is not a finite number (None: all are finite)."""
    return next((k for k, a in enumerate(answered) if not all(math.isfinite(t["score"]) for t in a["top_k"])),
                None)


def predict(engine, raw_inputs: Sequence[Any], task_ids: Sequence[str], top_k: int = 5,
            path: str = "auto") -> list[dict]:
    """Preprocess raw inputs (PIL images / strings) the way each task was trained, run them through
    ``engine`` (tasks sharing a preprocessing share one batch) and answer them in order."""
    by_prep: dict[str, tuple[dict, list[int]]] = {}
    for i, t in enumerate(task_ids):
        prep = engine.task(t).meta.preprocessing
        by_prep.setdefault(prep_key(prep), (prep, []))[1].append(i)
    out: list = [None] * len(task_ids)
    for prep, idx in by_prep.values():
        tids = [task_ids[i] for i in idx]
        res = engine.run(engine.backbone.preprocess([raw_inputs[i] for i in idx], prep), tids, path=path)
        labels = {t: info.meta.labels for t, info in res.infos.items()}
        for i, a in zip(idx, answers(res.logits, tids, res.versions, labels, top_k)):
            out[i] = a
    return out
