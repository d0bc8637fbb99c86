"""The models of the engine benchmark (random init, offline): ViT and LLaMA shapes at three sizes."""
from __future__ import annotations

import types
from dataclasses import dataclass
from typing import Any, Callable

import torch

from grft_serve.core.backbones import Backbone, HFTextBackbone, TimmBackbone

__all__ = ["Bench", "llama_bench", "vit_bench"]


@dataclass
class Bench:
    name: str
    kind: str  # "vit" | "llama"
    backbone: Backbone
    make_batch: Callable[[int, torch.Generator], Any]  # (batch size, generator) -> CPU batch
    shape: dict  # extra facts for the records (seq, image size)


def vit_bench(size: str) -> Bench:
    """ViT: smoke (tiny, 32 px), cpu (ViT-S/16, 224 px) or full (ViT-B/16, 224 px); random init."""
    if size == "smoke":
        bb = TimmBackbone("vit_tiny_patch16_224", weights="random",
                          model_kwargs=dict(img_size=32, patch_size=8, depth=2))
        name, px = "vit_tiny_smoke(img32,p8,depth2)", 32
    elif size == "cpu":
        bb = TimmBackbone("vit_small_patch16_224", weights="random")
        name, px = "vit_small_patch16_224", 224
    else:
        bb = TimmBackbone("vit_base_patch16_224", weights="random")
        name, px = "vit_base_patch16_224", 224

    def make(b: int, g: torch.Generator):
        return torch.randn((b, 3, px, px), generator=g)

    return Bench(name, "vit", bb, make, {"image_size": px})


def llama_bench(size: str, seq: int, device: torch.device) -> Bench:
    """LLaMA-shaped body: smoke (h64 l2), cpu (h512 l4) or full (LLaMA-3.2-1B shape); random init."""
    from transformers import LlamaConfig, LlamaModel

    if size == "smoke":
        cfg = LlamaConfig(hidden_size=64, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                          intermediate_size=128, vocab_size=256, max_position_embeddings=max(seq, 64))
        name = "llama_tiny_smoke(h64,l2)"
    elif size == "cpu":  # LLaMA-shaped, mid size
        cfg = LlamaConfig(hidden_size=512, num_hidden_layers=4, num_attention_heads=8, num_key_value_heads=8,
                          intermediate_size=1408, vocab_size=8192, max_position_embeddings=max(seq, 256))
        name = "llama-shape(h512,l4)"
    else:  # LLaMA-3.2-1B shape, random init
        cfg = LlamaConfig(hidden_size=2048, num_hidden_layers=16, num_attention_heads=32, num_key_value_heads=8,
                          intermediate_size=8192, vocab_size=128256, max_position_embeddings=131072,
                          rope_theta=500000.0, tie_word_embeddings=True)
        name = "llama-3.2-1b-shape"
    with torch.device(device):  # random init on the device: seconds instead of a minute on CPU
        model = LlamaModel(cfg)
    # The bench feeds pre-tokenised batches straight to Engine.forward: no tokenizer is needed, but
    # HFTextBackbone's constructor wants one (for preprocess), so give it an inert stand-in.
    tok = types.SimpleNamespace(pad_token="<pad>", eos_token="<pad>", padding_side="right")
    bb = HFTextBackbone(name, pooling="last", max_length=seq, model=model, tokenizer=tok, model_id=f"bench/{name}")
    vocab = cfg.vocab_size

    def make(b: int, g: torch.Generator):
        return {"input_ids": torch.randint(0, vocab, (b, seq), generator=g),
                "attention_mask": torch.ones((b, seq), dtype=torch.long)}

    return Bench(name, "llama", bb, make, {"seq": seq})
