"""Supervised contrastive loss (Khosla et al., 2020) and the two-view batches GPS/GRFT feed it.

Features are L2-normalised, temperature 0.07. Image views: GPS augmentations (RandomResizedCrop
0.08–1, horizontal flip, ColorJitter 0.4/0.4/0.4/0.1 with p=0.8, grayscale p=0.2) at the backbone's
input size. Text views: two forward passes with dropout on when the backbone has active dropout
(BERT-style encoders, as SimCSE); a backbone without any (LLaMA / SmolLM2: every dropout rate is 0)
would give two identical views, so each view then deletes one random span of tokens instead
(token cutoff): ``⌈ratio·n⌉`` consecutive tokens of the ``n`` real ones, never the first or the
last (special / pooled tokens), the rest shifted left and re-padded.
"""
from __future__ import annotations

import math
from contextlib import contextmanager
from typing import Any, Sequence

import torch
import torch.nn.functional as F
from torch import nn

DEFAULT_TEMPERATURE = 0.07
SPAN_RATIO = 0.15

__all__ = ["SCLViews", "dropout_mode", "gps_transform", "has_active_dropout", "span_deletion", "supcon_loss"]


def supcon_loss(features: torch.Tensor, labels: torch.Tensor, temperature: float = DEFAULT_TEMPERATURE,
                base_temperature: float | None = None) -> torch.Tensor:
    """SupCon loss ("L_out") of ``features`` [B, V, D] (V views per sample) with ``labels`` [B].

    Each of the B·V embeddings is an anchor; its positives are all other embeddings with the same
    label (its other views included). Anchors without any positive (possible with V=1) are left out;
    if no anchor has a positive the loss is 0 (with a graph, never NaN).
    """
    if features.dim() == 2:
        features = features.unsqueeze(1)
    if features.dim() != 3:
        raise ValueError(f"features must be [B, V, D], got {tuple(features.shape)}")
    B, V, _ = features.shape
    if labels.shape[0] != B:
        raise ValueError(f"{labels.shape[0]} labels for {B} samples")
    base_temperature = temperature if base_temperature is None else base_temperature
    z = F.normalize(features.float(), dim=-1)
    z = z.transpose(0, 1).reshape(V * B, -1)  # view-major, like the reference implementation
    lab = labels.to(z.device).repeat(V)
    logits = z @ z.T / temperature
    n = logits.shape[0]
    self_mask = torch.eye(n, dtype=torch.bool, device=z.device)
    logits = logits.masked_fill(self_mask, float("-inf"))
    logits = logits - logits.detach().max(dim=1, keepdim=True).values  # stability (exact shift)
    log_prob = logits - torch.logsumexp(logits, dim=1, keepdim=True)
    pos = (lab[:, None] == lab[None, :]) & ~self_mask
    n_pos = pos.sum(1)
    valid = n_pos > 0
    if not bool(valid.any()):
        return features.sum() * 0.0
    mean_log_prob_pos = log_prob.masked_fill(~pos, 0.0).sum(1)[valid] / n_pos[valid]
    return -(temperature / base_temperature) * mean_log_prob_pos.mean()


# ---------------------------------------------------------------------------------------------
# views
# ---------------------------------------------------------------------------------------------
def gps_transform(data_config: dict):
    """GPS's SCL augmentation at the backbone's input size and normalisation."""
    from torchvision import transforms as T

    size = data_config.get("input_size", (3, 224, 224))
    size = (int(size[-2]), int(size[-1]))
    interp = {"bicubic": T.InterpolationMode.BICUBIC, "bilinear": T.InterpolationMode.BILINEAR,
              "nearest": T.InterpolationMode.NEAREST}.get(data_config.get("interpolation", "bicubic"),
                                                          T.InterpolationMode.BICUBIC)
    return T.Compose([
        T.RandomResizedCrop(size, scale=(0.08, 1.0), interpolation=interp, antialias=True),
        T.RandomHorizontalFlip(),
        T.RandomApply([T.ColorJitter(0.4, 0.4, 0.4, 0.1)], p=0.8),
        T.RandomGrayscale(p=0.2),
        T.ToTensor(),
        T.Normalize(mean=data_config.get("mean", (0.485, 0.456, 0.406)),
                    std=data_config.get("std", (0.229, 0.224, 0.225))),
    ])


@contextmanager
def dropout_mode(module: nn.Module):
    """Train mode for dropout (and attention dropout) but eval mode for batch norms, so no running
    statistics of the frozen model change; the previous modes are restored afterwards."""
    modes = {m: m.training for m in module.modules()}
    module.train()
    for m in module.modules():
        if isinstance(m, nn.modules.batchnorm._BatchNorm):
            m.eval()
    try:
        yield module
    finally:
        for m, t in modes.items():
            m.train(t)


def has_active_dropout(module: nn.Module) -> bool:
    """Whether train mode would make ``module``'s forward random: a dropout layer with p > 0, or a
    transformers config whose attention dropout (applied functionally, without a module) is > 0."""
    for m in module.modules():
        if isinstance(m, nn.modules.dropout._DropoutNd) and m.p > 0:
            return True
        cfg = getattr(m, "config", None)
        for key in ("attention_dropout", "attention_probs_dropout_prob", "hidden_dropout_prob", "dropout"):
            v = getattr(cfg, key, None) if cfg is not None else None
            if isinstance(v, (int, float)) and not isinstance(v, bool) and v > 0:
                return True
    return False


def span_deletion(batch: dict, ratio: float = SPAN_RATIO, pad_id: int = 0,
                  generator: torch.Generator | None = None) -> dict:
    """A view of a right-padded token batch with one random span deleted per sequence.

    Of the ``n`` real tokens of a row, ``⌈ratio·n⌉`` consecutive ones are removed, chosen among
    positions 1 … n−2 so the first and last tokens (CLS/BOS, SEP/EOS, the token last-token pooling
    reads) stay; rows with fewer than 4 tokens are left as they are. Kept tokens are shifted left,
    the row is re-padded with ``pad_id`` and the attention mask shortened to match."""
    ids, mask = batch["input_ids"], batch["attention_mask"]
    B, T = ids.shape
    lengths = mask.sum(1)
    keep = mask.bool().clone()
    for r in range(B):
        n = int(lengths[r])
        if n < 4:
            continue
        span = min(max(1, math.ceil(ratio * n)), n - 2)
        start = 1 + int(torch.randint(0, n - 1 - span, (1,), generator=generator))
        keep[r, start:start + span] = False
    # stable order: kept tokens first (in their order), then everything else as padding
    order = torch.argsort((~keep).to(torch.int8), dim=1, stable=True)
    new_len = keep.sum(1, keepdim=True)
    pos = torch.arange(T, device=ids.device).unsqueeze(0)
    new_mask = (pos < new_len).to(mask.dtype)
    new_ids = torch.where(new_mask.bool(), ids.gather(1, order), torch.full_like(ids, pad_id))
    out = dict(batch, input_ids=new_ids, attention_mask=new_mask)
    width = int(new_len.max()) if B else T
    return {k: (v[:, :width] if torch.is_tensor(v) and v.dim() == 2 and v.shape[1] == T else v)
            for k, v in out.items()}


class SCLViews:
    """Makes SCL features ``[B, 2, D]`` for raw inputs with a given backbone.

    ``method`` says how the views differ: ``augment`` (image transforms), ``dropout`` or ``span``
    (token span deletion, for text backbones without active dropout)."""

    def __init__(self, backbone, n_views: int = 2, span_ratio: float = SPAN_RATIO,
                 preprocessing: dict | None = None):
        self.backbone = backbone
        self.n_views = n_views
        self.span_ratio = span_ratio
        self.preprocessing = preprocessing if preprocessing is not None else backbone.preprocessing_meta()
        self._tf = None
        if backbone.kind == "image":
            self._tf = gps_transform(self.preprocessing.get("timm_data_config") or {})
            self.method = "augment"
        elif backbone.kind == "text" and not has_active_dropout(backbone):
            self.method = "span"
        else:
            self.method = "dropout"

    def features(self, raws: Sequence[Any], device, autocast_dtype: torch.dtype | None = None) -> torch.Tensor:
        bb = self.backbone
        def ctx():
            return (torch.autocast(device_type=torch.device(device).type, dtype=autocast_dtype)
                    if autocast_dtype is not None else _null())
        if bb.kind == "image":
            views = []
            for _ in range(self.n_views):
                views.append(torch.stack([self._tf(r.convert("RGB") if hasattr(r, "convert") else r) for r in raws]))
            batch = torch.cat(views).to(device)
            prev = bb.training
            bb.eval()  # batch norms keep their statistics; the two views differ by augmentation
            try:
                with ctx():
                    f = bb(batch)
            finally:
                bb.train(prev)
            B = len(raws)
            return f.float().view(self.n_views, B, -1).transpose(0, 1)
        batch = bb.batch_to(bb.preprocess(list(raws), self.preprocessing), device)
        outs = []
        if self.method == "span":
            tok = getattr(bb, "tokenizer", None)
            pad = int(getattr(tok, "pad_token_id", None) or 0)
            for _ in range(self.n_views):
                with ctx():
                    outs.append(bb(span_deletion(batch, self.span_ratio, pad)).float())
            return torch.stack(outs, dim=1)
        with dropout_mode(bb):
            for _ in range(self.n_views):
                with ctx():
                    outs.append(bb(batch).float())
        return torch.stack(outs, dim=1)


@contextmanager
def _null():
    yield
