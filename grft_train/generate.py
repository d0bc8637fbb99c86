"""Answers of a generation package (or of the base) for prompts: the reference decoder.

``generate_ids`` / ``generate_text`` render each prompt with the package's
:class:`~grft_serve.core.generation.GenerationMeta` through the shared renderer
(:func:`~grft_serve.core.generation.prompt_ids` / :func:`~grft_serve.core.generation.chat_ids`),
apply the package to the frozen base through the training row op (forward hooks:
:class:`grft_train.model.TaskModel`), and decode plainly with transformers' ``generate()``:
greedy unless the package (or the call) sets a temperature, stopping at the package's EOS ids or
after ``max_new_tokens``. This is the reference that served answers are compared with token for
token. Stop strings (``meta.stop``) only cut the decoded text; the token ids are those decoded up to
EOS (excluded) or the length limit.

Prompts are decoded ``batch_size`` at a time, left-padded (the default, 1, decodes each prompt
alone: no padding at all). A prompt is a string (completion format, or a user turn when ``chat``
is on — by default when the package was trained on chats) or a list of ``{"role", "content"}``
messages (chat template).
"""
from __future__ import annotations

from contextlib import nullcontext
from pathlib import Path
from typing import Any, Sequence

import torch

from grft_serve.core.backbones import Backbone
from grft_serve.core.generation import GenerationMeta, chat_ids, prompt_ids
from grft_serve.core.package import TaskPackage, load_package

from .gendata import Example, example_messages
from .genmetrics import answer_metrics
from .model import TaskModel

__all__ = ["answer_scores", "finish_text", "generate_ids", "generate_text", "render_prompt", "task_model",
           "task_model_meta"]

Prompt = str | Sequence[dict]


def render_prompt(meta: GenerationMeta, tokenizer: Any, prompt: Prompt, chat: bool | None = None) -> list[int]:
    """Token ids of one prompt: messages through the chat template; a string through the prompt
    template, or as a user turn when ``chat`` (default: the package was trained on chats)."""
    if not isinstance(prompt, str):
        return chat_ids(meta, tokenizer, list(prompt))
    if chat if chat is not None else meta.format == "chat":
        return chat_ids(meta, tokenizer, [{"role": "user", "content": prompt}])
    return prompt_ids(meta, tokenizer, prompt)


def task_model(package: str | Path | TaskPackage | TaskModel | None,
               backbone: Backbone) -> tuple[TaskModel | None, GenerationMeta, bool]:
    """(model applying the package or None for the base, its generation metadata, whether this call
    owns the model and must close it)."""
    if package is None or isinstance(package, TaskModel):
        return package, task_model_meta(package, backbone), False
    pkg = package if isinstance(package, TaskPackage) else load_package(package, base=backbone.describe())
    if pkg.meta.generation is None:
        raise ValueError(f"task {pkg.task_id!r} is a {pkg.kind} package: it does not generate text")
    model = TaskModel.from_package(backbone, pkg).eval()
    model.meta = pkg.meta
    return model, pkg.meta.generation, True


@torch.no_grad()
def _decode(backbone: Backbone, model: TaskModel | None, prompts: list[list[int]], eos: list[int], max_new: int,
            temperature: float, top_p: float, seed: int | None, batch_size: int,
            stop: Sequence[str] = ()) -> list[list[int]]:
    from transformers import GenerationConfig

    if model is not None:  # a model may carry its own copy of the base (the LoRA / full fine-tuning baselines)
        backbone = model.backbone
    tok = backbone.tokenizer
    pad = int(tok.pad_token_id if tok.pad_token_id is not None else (eos[0] if eos else 0))
    sample = temperature > 0
    gc = GenerationConfig(max_new_tokens=max_new, do_sample=sample, eos_token_id=eos or None, pad_token_id=pad,
                          **({"temperature": temperature, "top_p": top_p} if sample else {}),
                          **({"stop_strings": list(stop)} if stop else {}))
    dev = next(backbone.parameters()).device
    out: list[list[int]] = []
    with torch.random.fork_rng(devices=[dev] if dev.type == "cuda" else []):
        if seed is not None:
            torch.manual_seed(seed)
        for s in range(0, len(prompts), batch_size):
            chunk = prompts[s:s + batch_size]
            T = max(len(p) for p in chunk)
            ids = torch.full((len(chunk), T), pad, dtype=torch.long)
            mask = torch.zeros((len(chunk), T), dtype=torch.long)
            for i, p in enumerate(chunk):  # left padding: every prompt ends where decoding starts
                ids[i, T - len(p):] = torch.tensor(p, dtype=torch.long)
                mask[i, T - len(p):] = 1
            with (model.applied() if model is not None else nullcontext()):
                seq = backbone.lm.generate(input_ids=ids.to(dev), attention_mask=mask.to(dev), generation_config=gc,
                                           **({"tokenizer": tok} if stop else {}))
            for row in seq[:, T:].tolist():
                cut = next((j for j, t in enumerate(row) if t in eos), len(row))
                out.append(row[:cut])
    return out


def generate_ids(package: str | Path | TaskPackage | TaskModel | None, backbone: Backbone, prompts: Sequence[Prompt], *,
                 chat: bool | None = None, max_new_tokens: int | None = None, temperature: float | None = None,
                 top_p: float | None = None, seed: int | None = 0, batch_size: int = 1,
                 meta: GenerationMeta | None = None, stop_early: bool = False) -> list[list[int]]:
    """The answer token ids of ``package`` (a path, a loaded package, a :class:`TaskModel`, or None
    for the base) on ``backbone`` for each prompt, EOS excluded. Defaults come from the package's
    generation metadata (``meta`` overrides it). ``stop_early``: a sequence also ends once its text
    holds a stop string (evaluation: the text after it is cut anyway); the ids then end with the
    token that completed it."""
    model, pmeta, owned = task_model(package, backbone)
    meta = meta or pmeta
    try:
        ids = [render_prompt(meta, backbone.tokenizer, p, chat) for p in prompts]
        return _decode(backbone, model, ids, meta.eos_ids(backbone.tokenizer), max_new_tokens or meta.max_new_tokens,
                       meta.temperature if temperature is None else temperature,
                       meta.top_p if top_p is None else top_p, seed, max(1, batch_size),
                       meta.stop if stop_early else ())
    finally:
        if owned:
            model.close()


def finish_text(tokenizer: Any, ids: Sequence[int], stop: Sequence[str] = ()) -> str:
    """Decoded answer (special tokens dropped), cut before the first stop string."""
    text = tokenizer.decode(list(ids), skip_special_tokens=True)
    cuts = [i for i in (text.find(s) for s in stop) if i >= 0]
    return text[:min(cuts)] if cuts else text


def generate_text(package: str | Path | TaskPackage | TaskModel | None, backbone: Backbone, prompts: Sequence[Prompt],
                  **kw) -> list[str]:
    """Like :func:`generate_ids`, decoded to text and cut at the package's stop strings."""
    meta = kw.get("meta") or task_model_meta(package, backbone)
    return [finish_text(backbone.tokenizer, ids, meta.stop) for ids in generate_ids(package, backbone, prompts, **kw)]


def task_model_meta(package, backbone: Backbone) -> GenerationMeta:
    """The generation metadata ``package`` decodes with (the base's defaults for None)."""
    if package is None:
        return backbone.generation_defaults()
    if isinstance(package, (TaskModel, TaskPackage)):  # a model loaded from a package carries its meta
        meta = getattr(package, "meta", None)
        return getattr(meta, "generation", None) or backbone.generation_defaults()
    from grft_serve.core.package import peek_meta

    return peek_meta(package).generation


def answer_scores(model, backbone, examples: Sequence[Example], meta: GenerationMeta, batch_size: int,
                  max_new_tokens: int | None = None) -> dict:
    """Exact match and ROUGE-L of the answers ``model`` (a :class:`~grft_train.model.TaskModel`, or
    None for the base) generates for ``examples``' prompts; ``predictions`` holds the answers."""
    prompts = []
    for ex in examples:
        msgs = example_messages(ex, meta)
        prompts.append(msgs[:-1] if msgs is not None else (ex.prompt or ""))
    was = model.training if model is not None else False
    if model is not None:
        model.eval()
    try:
        ids = generate_ids(model, backbone, prompts, meta=meta, max_new_tokens=max_new_tokens, chat=False,
                           batch_size=batch_size, stop_early=True)
    finally:
        if model is not None and was:
            model.train()
    preds = [finish_text(backbone.tokenizer, i, meta.stop).strip() for i in ids]
    res = answer_metrics(preds, [ex.answer.strip() for ex in examples])
    res["predictions"] = preds
    return res
