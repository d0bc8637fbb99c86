"""The PEFT LoRA peer of the generation benchmark: mixed-adapter ``generate(adapter_names=[...])``.

What a user of HF PEFT does to serve many fine-tuned variants of one causal LM from one process:
a ``PeftModel`` over a copy of the base ``LlamaForCausalLM`` with one LoRA adapter per task on every
attention and MLP linear, and ONE left-padded ``generate`` call for a batch whose rows name their
adapters (PEFT runs each adapter's LoRA branch on its sub-batch, layer by layer). The rank matches
the parameters of a GRFT task (:func:`bench.engine_peft.matched_rank`: ``r (in + out) ≈ k · in``
summed over the targeted linears; k = 2 rows → rank 1). Its own baseline is the same base model's
plain ``generate`` without adapters, measured on the same prompts in the same run.

Timings: a streamer stamps every decoding step of the batch (``put`` is called once with the
prompt, then once per new token of every row), so each row's deliveries are the step times — the
batch moves in lock step, as it does in a static-batch server.
"""
from __future__ import annotations

import copy
import time
from typing import Sequence

import torch
from torch import nn

from bench.engine_peft import TARGETS, matched_rank
from bench.gen_workload import Timing, summarize

__all__ = ["lora_lm", "generate_wave"]


def lora_lm(lm: nn.Module, n_adapters: int, k: int) -> tuple[nn.Module, dict]:
    """A PEFT model over a deep copy of ``lm`` with adapters ``a0..a{n-1}`` (random, non-zero) of the
    rank matching ``k`` rows per linear; and facts for the records."""
    from peft import LoraConfig, get_peft_model

    base = copy.deepcopy(lm)
    r, params = matched_rank(base, TARGETS["llama"], k)
    cfg = LoraConfig(r=r, lora_alpha=2 * r, target_modules=TARGETS["llama"], lora_dropout=0.0,
                     init_lora_weights=False, task_type="CAUSAL_LM")
    pm = get_peft_model(base, cfg, adapter_name="a0")
    for j in range(1, n_adapters):
        pm.add_adapter(f"a{j}", cfg)
    pm.eval().requires_grad_(False)
    return pm, {"lora_rank": r, "lora_params": params, "lora_adapters": n_adapters}


class _StepClock:
    """A ``generate`` streamer that stamps every step after the prompt."""

    def __init__(self):
        self.steps: list[float] = []
        self._prompt_seen = False

    def put(self, value) -> None:
        if self._prompt_seen:
            self.steps.append(time.perf_counter())
        self._prompt_seen = True

    def end(self) -> None:
        pass


@torch.inference_mode()
def generate_wave(model: nn.Module, prompts: Sequence[list[int]], new_tokens: int, pad_id: int,
                  adapter_names: Sequence[str] | None = None) -> dict:
    """One left-padded greedy ``generate`` of exactly ``new_tokens`` tokens per prompt (EOS ignored),
    with ``adapter_names`` (one per prompt) when given; :func:`~bench.gen_workload.summarize` it."""
    L = max(len(p) for p in prompts)
    ids = torch.full((len(prompts), L), pad_id, dtype=torch.long)
    am = torch.zeros((len(prompts), L), dtype=torch.long)
    for i, p in enumerate(prompts):
        ids[i, L - len(p):] = torch.tensor(p)
        am[i, L - len(p):] = 1
    dev = next(model.parameters()).device
    ids, am = ids.to(dev), am.to(dev)
    extra = {"adapter_names": list(adapter_names)} if adapter_names is not None else {}
    clock = _StepClock()
    c0, t0 = time.process_time(), time.perf_counter()
    out = model.generate(input_ids=ids, attention_mask=am, max_new_tokens=new_tokens, min_new_tokens=new_tokens,
                         do_sample=False, eos_token_id=None, pad_token_id=pad_id, streamer=clock, **extra)
    if dev.type == "cuda":
        torch.cuda.synchronize(dev)
    cpu = time.process_time() - c0
    n = out.shape[1] - L
    timings = [Timing(t0, list(clock.steps), n, "length") for _ in prompts]
    return summarize(timings, cpu)
