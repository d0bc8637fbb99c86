"""A random-init causal LM of a known shape, saved as a transformers directory (for machines without
the zoo's weights, e.g. a bare GPU machine: ``bench/gpu_check.sh``).

    python -m bench.random_lm OUT_DIR --shape smollm2-135m --tokenizer DIR

The tokenizer (and its chat template) is copied from ``--tokenizer`` (default: the SmolLM2 zoo
cache), so prompts and chat templates are real; only the weights are random. Throughput does not
depend on the weights' values, so a random model of the right shape measures the decode loop.
"""
from __future__ import annotations

import argparse
from pathlib import Path
from typing import Sequence

import torch

__all__ = ["SHAPES", "save_random_lm"]

# LlamaConfig fields of each shape (vocabulary: the tokenizer's)
SHAPES = {
    "smollm2-135m": dict(hidden_size=576, num_hidden_layers=30, num_attention_heads=9, num_key_value_heads=3,
                         intermediate_size=1536, max_position_embeddings=8192, tie_word_embeddings=True),
    "llama-1b": dict(hidden_size=2048, num_hidden_layers=16, num_attention_heads=32, num_key_value_heads=8,
                     intermediate_size=8192, max_position_embeddings=8192, tie_word_embeddings=True),
    "tiny": dict(hidden_size=64, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                 intermediate_size=128, max_position_embeddings=256, tie_word_embeddings=True),
}


def save_random_lm(out: str | Path, shape: str, tokenizer: str | Path | None = None, seed: int = 0,
                   **overrides) -> Path:
    """Write a random ``LlamaForCausalLM`` of ``shape`` (``overrides``: other config fields) + the
    tokenizer to ``out``; an ``out`` that already holds a model is kept as it is."""
    from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM

    out = Path(out)
    if (out / "config.json").exists():
        return out
    if shape not in SHAPES:
        raise ValueError(f"unknown shape {shape!r}; known: {', '.join(SHAPES)}")
    if tokenizer is None:
        from grft_serve.core.backbones import zoo

        tokenizer = zoo.smollm2_dir()
    tok = AutoTokenizer.from_pretrained(str(tokenizer))
    cfg = LlamaConfig(vocab_size=len(tok), bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id,
                      pad_token_id=tok.pad_token_id, **{**SHAPES[shape], **overrides})
    torch.manual_seed(seed)
    model = LlamaForCausalLM(cfg).eval()
    out.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(str(out))
    tok.save_pretrained(str(out))
    return out


def main(argv: Sequence[str] | None = None) -> None:
    p = argparse.ArgumentParser(prog="python -m bench.random_lm", description=__doc__.split("\n\n")[0])
    p.add_argument("out")
    p.add_argument("--shape", default="smollm2-135m", choices=sorted(SHAPES))
    p.add_argument("--tokenizer", default=None, help="a tokenizer directory (default: the SmolLM2 zoo cache)")
    p.add_argument("--seed", type=int, default=0)
    a = p.parse_args(argv)
    print(save_random_lm(a.out, a.shape, a.tokenizer, a.seed))


if __name__ == "__main__":
    main()
