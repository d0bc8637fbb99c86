"""A peer row for the engine benchmark: PEFT LoRA serving a mixed-adapter batch on the same backbone.

PEFT (``pip install -e '.[bench]'``) serves a batch whose samples use different LoRA adapters through
``PeftModel(..., adapter_names=[...])``: per adapter present, the LoRA branch runs on that adapter's
sub-batch. The rank is chosen so that one LoRA adapter has about as many parameters per module as a
GRFT task with ``k`` rows (``r (in + out) ≈ k · in``, at least 1).
"""
from __future__ import annotations

import copy
from typing import Any, Callable

import torch
from torch import nn

__all__ = ["matched_rank", "peft_forward"]

TARGETS = {"vit": ["qkv", "proj", "fc1", "fc2"],
           "llama": ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]}


def matched_rank(model: nn.Module, targets: list[str], k: int) -> tuple[int, int]:
    """(LoRA rank, LoRA parameters per adapter) matching ``k`` rows per targeted linear."""
    lins = [m for n, m in model.named_modules() if isinstance(m, nn.Linear) and n.rsplit(".", 1)[-1] in targets]
    ins = sum(m.in_features for m in lins)
    both = sum(m.in_features + m.out_features for m in lins)
    r = max(1, round(k * ins / both))
    return r, r * both


def peft_forward(kind: str, model: nn.Module, n_adapters: int, k: int, device, dtype,
                 head: Callable[[torch.Tensor], Any]) -> tuple[Callable[[Any, list[str]], Any], dict]:
    """``fn(batch, adapter_names)`` running a deep copy of ``model`` with ``n_adapters`` LoRA adapters
    (random, non-zero) and ``head`` on its pooled features; plus facts for the records."""
    from peft import LoraConfig, get_peft_model

    targets = TARGETS[kind]
    base = copy.deepcopy(model)
    r, params = matched_rank(base, targets, k)
    cfg = LoraConfig(r=r, lora_alpha=2 * r, target_modules=targets, lora_dropout=0.0, init_lora_weights=False)
    pm = get_peft_model(base, cfg, adapter_name="a0")
    for j in range(1, n_adapters):
        pm.add_adapter(f"a{j}", cfg)
    pm.to(device=device, dtype=dtype).eval().requires_grad_(False)

    if kind == "llama":
        def fn(batch, names):
            out = pm(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"], adapter_names=names)
            return head(out.last_hidden_state[:, -1])  # the batches are unpadded: last token
    else:
        def fn(batch, names):
            return head(pm(batch, adapter_names=names))
    return fn, {"lora_rank": r, "lora_params": params}
