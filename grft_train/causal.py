"""The ``causal_lm`` objective: GRFT for generation tasks on a causal LM (LLaMA / SmolLM2).

Loss (selection and training alike): the mean token cross-entropy of the *answer* tokens,

    L = − 1/|A| · Σ_{t ∈ A} log p(x_t | x_<t),

A = the positions after the prompt (the completion and its end-of-sequence token, or the
assistant's final turn of a chat). Prompt positions are labelled −100 and carry no loss. Each
example is tokenized by :func:`grft_serve.core.generation.example_ids` — the renderer serving uses
— with the run's :class:`~grft_serve.core.generation.GenerationMeta` (``generation:`` config keys;
``format: auto`` is ``chat`` for ``{messages}`` records and ``completion`` otherwise). Only the
answer positions go through the (tied, frozen) ``lm_head``: the body runs on the whole sequence,
the vocabulary projection on |A| hidden states.

Selection: squared gradients of L on the pretrained weights, accumulated over one pass of the
train split, summed per row/column of the attention and MLP linears (``lm_head`` and the embeddings
are never patchable). Training: the same L plus λ·Σ_R‖θ − θ_pre‖², every bias (zero-initialised on
LLaMA's bias-free linears), no head. An example longer than the context (the backbone's
``max_length``) loses the tail of its answer (counted and logged); a prompt that leaves no room for
an answer is a :class:`DataError` naming its line.
"""
from __future__ import annotations

import logging
import math
from dataclasses import dataclass
from typing import Iterator, Sequence

import numpy as np
import torch
import torch.nn.functional as F

from grft_serve.core.generation import GenerationMeta, PromptError, example_ids

from .common import autocast_ctx
from .gendata import Example, ExampleSet, example_messages
from .generate import answer_scores
from .objective import Objective, ObjectiveError, target_device
from .sources import DataError

__all__ = ["CausalLMObjective", "IGNORE", "TokenBatches", "Tokenized", "collate", "run_generation_meta",
           "response_ce", "tokenize"]

log = logging.getLogger("grft_train.causal")
IGNORE = -100


def run_generation_meta(gcfg, backbone, chat_records: bool) -> GenerationMeta:
    """The run's prompt format and defaults (``generation:`` keys) on ``backbone``'s tokenizer."""
    fmt = gcfg.format if gcfg.format != "auto" else ("chat" if chat_records else "completion")
    if fmt == "completion" and chat_records:
        raise ObjectiveError("chat records ({messages}) need generation.format chat (or auto)")
    template = None
    if fmt == "chat":
        template = getattr(backbone.tokenizer, "chat_template", None)
        if not template:
            raise ObjectiveError(f"{backbone.model_id} has no chat template: use generation.format completion")
    try:
        return GenerationMeta(format=fmt, prompt_template=gcfg.prompt_template, chat_template=template,
                              add_special_tokens=gcfg.add_special_tokens,
                              eos_token_ids=backbone.generation_defaults().eos_token_ids,
                              max_new_tokens=gcfg.max_new_tokens or 128, temperature=gcfg.temperature,
                              top_p=gcfg.top_p, stop=gcfg.stop)
    except ValueError as e:  # pydantic: the template has no single {prompt}, a stop string is too long, ...
        raise ObjectiveError(f"generation config: {e}") from None


@dataclass
class Tokenized:
    ids: list[int]
    prompt_len: int
    where: str


def tokenize(examples: Sequence[Example], meta: GenerationMeta, tokenizer, context: int) -> tuple[list[Tokenized], int]:
    """(tokenized examples, how many lost the tail of their answer to the context)."""
    out, cut = [], 0
    for ex in examples:
        msgs = example_messages(ex, meta)
        try:
            ids, n_prompt = (example_ids(meta, tokenizer, messages=msgs) if msgs is not None
                             else example_ids(meta, tokenizer, prompt=ex.prompt, completion=ex.completion))
        except PromptError as e:
            raise DataError(f"{ex.where}: {e}") from None
        if n_prompt >= context:
            raise DataError(f"{ex.where}: prompt longer than the context: {n_prompt} tokens, the context is {context} "
                            "(backbone.max_length); shorten the prompt or raise backbone.max_length")
        if len(ids) > context:
            ids, cut = ids[:context], cut + 1
        out.append(Tokenized(ids, n_prompt, ex.where))
    return out, cut


def collate(items: Sequence[Tokenized], pad_id: int) -> tuple[dict, torch.Tensor]:
    """Right-padded ``{"input_ids", "attention_mask"}`` and labels (−100 on prompt and padding)."""
    T = max(len(t.ids) for t in items)
    ids = torch.full((len(items), T), pad_id, dtype=torch.long)
    mask = torch.zeros((len(items), T), dtype=torch.long)
    labels = torch.full((len(items), T), IGNORE, dtype=torch.long)
    for i, t in enumerate(items):
        n = len(t.ids)
        ids[i, :n] = torch.tensor(t.ids)
        mask[i, :n] = 1
        labels[i, t.prompt_len:n] = ids[i, t.prompt_len:n]
    return {"input_ids": ids, "attention_mask": mask}, labels


class TokenBatches:
    """A tokenized split for the loops: ``batches(bs, shuffle, rng)`` of (token batch, labels)."""

    def __init__(self, items: list[Tokenized], pad_id: int):
        self.items, self.pad_id = items, pad_id

    def __len__(self) -> int:
        return len(self.items)

    def batches(self, bs: int, shuffle: bool = False, rng: np.random.Generator | None = None) -> Iterator:
        n = len(self.items)
        order = (rng or np.random.default_rng(0)).permutation(n) if shuffle else np.arange(n)
        for s in range(0, len(order), bs):
            yield collate([self.items[int(i)] for i in order[s:s + bs]], self.pad_id)


def response_ce(backbone, batch: dict, labels: torch.Tensor) -> tuple[torch.Tensor, int, int]:
    """(mean CE over the answer tokens, answer tokens, tokens predicted right) of one batch.

    Position t's hidden state predicts token t+1; only positions whose next token is an answer
    token go through ``lm_head``."""
    h = backbone.net(input_ids=batch["input_ids"], attention_mask=batch.get("attention_mask"),
                     use_cache=False).last_hidden_state
    tgt = labels[:, 1:].to(h.device)
    keep = tgt != IGNORE
    logits = backbone.lm_head(h[:, :-1][keep]).float()
    target = tgt[keep]
    n = int(target.numel())
    if n == 0:
        return logits.sum() * 0.0, 0, 0
    ce = F.cross_entropy(logits, target, reduction="sum") / n
    return ce, n, int((logits.argmax(-1) == target).sum())


class CausalLMObjective(Objective):
    """Answer-token cross-entropy for selection and training; a ``kind: generation`` package."""

    name = "causal_lm"
    kind = "generation"

    def __init__(self, backbone, splits, preprocessing, cfg):
        super().__init__(backbone, splits, preprocessing, cfg)
        if splits.kind != "generation":
            raise ObjectiveError(f"objective causal_lm trains on prompt/completion or chat records (data.format jsonl "
                                 f"or csv); got {splits.kind} data")
        if getattr(backbone, "tokenizer", None) is None:
            raise ObjectiveError(f"backbone {backbone.model_id} has no tokenizer")
        self.tokenizer = backbone.tokenizer
        self.pad_id = int(self.tokenizer.pad_token_id if self.tokenizer.pad_token_id is not None else 0)
        self.context = int(preprocessing.get("max_length") or backbone.max_length)
        chat = bool(len(splits.train) and splits.train[0].chat)
        meta = run_generation_meta(cfg.generation, backbone, chat)
        self._tokens: dict[str, list[Tokenized]] = {}  # per split, tokenized once (data errors surface here)
        cut = 0
        for s in ("train", "val", "test"):
            self._tokens[s], c = tokenize(splits.split(s).examples, meta, self.tokenizer, self.context)
            cut += c
        if cut:
            log.warning("%d example(s) longer than the context (%d tokens) lost the end of their answer", cut,
                        self.context)
        answers = [len(t.ids) - t.prompt_len for t in self._tokens["train"]] or [8]
        if cfg.generation.max_new_tokens is None:
            meta = meta.model_copy(update={"max_new_tokens": int(min(512, max(16, 2 * max(answers))))})
        self.meta = meta
        self.truncated = cut

    def tokens(self, ds: ExampleSet) -> list[Tokenized]:
        """The tokenized examples of a split (cached) or of any other example set (e.g. a subset)."""
        for s in ("train", "val", "test"):
            if ds is self.splits.split(s):
                return self._tokens[s]
        return tokenize(ds.examples, self.meta, self.tokenizer, self.context)[0]

    @property
    def labels(self) -> list[str]:
        return []

    def data(self, split: str, augment: bool = False) -> TokenBatches:
        return TokenBatches(self.tokens(self.splits.split(split)), self.pad_id)

    def probe(self):
        batch, _ = collate(self.tokens(self.splits.train)[:1], self.pad_id)
        return self.backbone.batch_to(batch, target_device(self.backbone))

    def batch_loss(self, model, batch, labels, bf16=False):
        with model.applied(), autocast_ctx(labels.device, bf16):
            return response_ce(model.backbone, batch, labels)

    @torch.no_grad()
    def evaluate(self, model, data: TokenBatches, batch_size: int, bf16: bool = False) -> dict:
        """Token-weighted answer CE, perplexity and token accuracy of ``model`` (``None``: the base)."""
        model_was = model.training if model is not None else None
        if model is not None:
            model.eval()
        dev = target_device(self.backbone)
        tot, n, hits = 0.0, 0, 0
        for batch, labels in data.batches(batch_size):
            batch, labels = self.backbone.batch_to(batch, dev), labels.to(dev)
            if model is None:
                with autocast_ctx(dev, bf16):
                    ce, k, h = response_ce(self.backbone, batch, labels)
            else:
                ce, k, h = self.batch_loss(model, batch, labels, bf16)
            tot, n, hits = tot + float(ce) * k, n + k, hits + h
        if model is not None and model_was:
            model.train()
        loss = tot / max(n, 1)
        return {"loss": loss, "ppl": math.exp(min(loss, 50.0)), "acc": hits / max(n, 1), "n": len(data), "tokens": n}

    def score(self, res):
        return (-res["loss"],)

    def grad_batches(self, ds, batch_size, rng):
        return TokenBatches(self.tokens(ds), self.pad_id).batches(batch_size, shuffle=True, rng=rng)

    def grad_loss(self, item, device, cfg):
        batch, labels = item
        with autocast_ctx(device, False):
            ce, _, _ = response_ce(self.backbone, self.backbone.batch_to(batch, device), labels.to(device))
        return ce, int(labels.shape[0])

    def grad_info(self):
        return {"objective": self.name, "loss": "answer-token cross-entropy"}

    def package_fields(self):
        return {"kind": self.kind, "labels": [], "generation": self.meta}

    def final_metrics(self, model, split, batch_size):
        ds = self.splits.split(split)
        if not len(ds):
            return {}
        res = answer_scores(model, self.backbone, ds.examples, self.meta, batch_size)
        return {f"{split}_exact_match": res["exact_match"], f"{split}_rouge_l": res["rouge_l"]}
