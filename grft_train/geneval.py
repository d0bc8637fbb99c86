"""``grft-train eval`` of a generation package: the task against its untuned base on the same split.

Both are measured with the package's prompt format (:class:`~grft_serve.core.generation.GenerationMeta`)
on the same examples:

- teacher-forced: the answer-token cross-entropy, its perplexity ``exp(CE)`` and the answer-token
  accuracy (:mod:`grft_train.causal`);
- generated: greedy answers (the package's sampling defaults, up to its ``max_new_tokens``; stop
  strings cut the text) scored by normalised exact match and ROUGE-L (:mod:`grft_train.genmetrics`)
  against the reference answers.

The report holds ``task`` and ``base`` blocks, their difference (``delta``) and a few examples.
"""
from __future__ import annotations

import time

from grft_serve.core.generation import GenerationMeta

from .causal import TokenBatches, tokenize
from .generate import answer_scores

__all__ = ["run_generation_eval"]

N_SAMPLES = 5


def _block(objective, model, backbone, data: TokenBatches, examples, meta, cfg) -> dict:
    t0 = time.time()
    tf = objective.evaluate(model, data, cfg.batch_size)
    gen = answer_scores(model, backbone, examples, meta, cfg.batch_size, cfg.max_new_tokens)
    return {"exact_match": gen["exact_match"], "rouge_l": gen["rouge_l"], "loss": tf["loss"], "ppl": tf["ppl"],
            "token_acc": tf["acc"], "seconds": round(time.time() - t0, 2), "predictions": gen["predictions"]}


def run_generation_eval(cfg, ctx, model) -> dict:
    """The report of ``model`` (loaded from ``cfg.package``, ``model.meta`` its metadata) on ``cfg.split``."""
    meta: GenerationMeta = model.meta.generation
    ds = ctx.splits.split(cfg.split)
    context = int(model.meta.preprocessing.get("max_length") or ctx.backbone.max_length)
    data = TokenBatches(tokenize(ds.examples, meta, ctx.backbone.tokenizer, context)[0], ctx.objective.pad_id)
    task = _block(ctx.objective, model, ctx.backbone, data, ds.examples, meta, cfg)
    base = _block(ctx.objective, None, ctx.backbone, data, ds.examples, meta, cfg) if cfg.compare_base else None
    samples = [{"prompt": ex.question, "reference": ex.answer, "task": task["predictions"][i],
                **({"base": base["predictions"][i]} if base else {})} for i, ex in enumerate(ds.examples[:N_SAMPLES])]
    strip = lambda b: {k: v for k, v in b.items() if k != "predictions"}  # noqa: E731
    rep = {"task": strip(task), "base": strip(base) if base else None, "n": len(ds), "samples": samples}
    if base:
        rep["delta"] = {k: task[k] - base[k] for k in ("exact_match", "rouge_l", "loss")
                        if task[k] is not None and base[k] is not None}
    return rep
