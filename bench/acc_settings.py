"""Datasets and budgets of ``bench/accuracy.py`` (shared config keys, select keys, fit keys)."""
from __future__ import annotations

import copy
from dataclasses import dataclass, field
from pathlib import Path

__all__ = ["GEN_SETTINGS", "SETTINGS", "Setting", "merge", "smoke_setting"]


@dataclass
class Setting:
    """One dataset at one budget: shared config keys, select keys and fit keys (as in the YAML runs)."""

    key: str
    title: str
    common: dict
    select: dict = field(default_factory=dict)
    fit: dict = field(default_factory=dict)
    # full fine-tuning moves every pretrained weight: it gets the usual small rate for them (its
    # new head keeps the shared rate, ``fit.lr``); every other method trains at ``fit.lr``
    full_lr: float = 1e-4
    # generation settings: the offline dataset converted to JSONL before the run (``bench.acc_gen``)
    convert: dict | None = None

    @property
    def generation(self) -> bool:
        return self.common.get("objective") == "causal_lm"


def merge(a: dict, b: dict) -> dict:
    out = copy.deepcopy(a)
    for k, v in b.items():
        out[k] = merge(out[k], v) if isinstance(v, dict) and isinstance(out.get(k), dict) else v
    return out


# the data split is fixed (data.seed 0): seeds vary selection views, head init and batch order
_RT = dict(backbone={"type": "zoo", "name": "minilm", "max_length": 64},
           data={"format": "rotten_tomatoes", "val_fraction": 0.1, "test_fraction": 0.1, "seed": 0})
_FM = dict(backbone={"type": "zoo", "name": "efficientnet_lite0"},
           data={"format": "fashion_mnist", "val_fraction": 0.1, "seed": 0})
_FIT = dict(l2_lambda=1e-4, l2_last_layers=2, warmup_epochs=0.5)

SETTINGS: dict[str, dict[str, Setting]] = {
    # 2 shared CPU cores, 1 thread: one seed of all 14 methods takes roughly 15-25 min per dataset
    "cpu": {
        "rt": Setting("rt", "all-MiniLM-L6-v2 + Rotten Tomatoes",
                      merge(_RT, {"batch_size": 32, "data": {"max_per_class": 150, "max_eval_per_class": 100}}),
                      {}, dict(_FIT, epochs=3, lr=2e-3)),
        "fmnist": Setting("fmnist", "EfficientNet-Lite0 + Fashion-MNIST",
                          merge(_FM, {"batch_size": 32, "input_size": 64,
                                      "data": {"max_per_class": 60, "max_eval_per_class": 30}}),
                          {}, dict(_FIT, epochs=3, lr=3e-3)),
    },
    # one GPU: full Rotten Tomatoes, 15k Fashion-MNIST train images at 96 px
    "gpu": {
        "rt": Setting("rt", "all-MiniLM-L6-v2 + Rotten Tomatoes",
                      merge(_RT, {"batch_size": 32}), {}, dict(_FIT, epochs=5, lr=2e-3)),
        "fmnist": Setting("fmnist", "EfficientNet-Lite0 + Fashion-MNIST",
                          merge(_FM, {"batch_size": 64, "input_size": 96,
                                      "data": {"max_per_class": 1500, "max_eval_per_class": 500}}),
                          {}, dict(_FIT, epochs=5, lr=3e-3)),
    },
}


def smoke_setting(root: Path) -> Setting:
    """A random-init tiny ViT on generated colour images: checks the plumbing in seconds."""
    import numpy as np
    from PIL import Image

    rng = np.random.default_rng(0)
    for c, col in enumerate([(200, 40, 40), (40, 200, 40), (40, 40, 200)]):
        d = root / f"class{c}"
        d.mkdir(parents=True, exist_ok=True)
        for i in range(12):
            a = (rng.normal(0, 50, (24, 24, 3)) + np.array(col)).clip(0, 255).astype(np.uint8)
            Image.fromarray(a).save(d / f"{i}.png")
    return Setting("smoke", "tiny random ViT + generated colours",
                   {"backbone": {"type": "timm", "name": "test_vit", "weights": "random",
                                 "model_kwargs": {"img_size": 32, "patch_size": 8}},
                    "data": {"format": "imagefolder", "path": str(root), "val_fraction": 0.25,
                             "test_fraction": 0.25},
                    "batch_size": 12},
                   {"num_batches": 2}, dict(_FIT, epochs=2, lr=1e-2, l2_lambda=1e-3))


# Generation on SmolLM2-135M-Instruct (causal LM): a few hundred short examples and a fixed step
# budget, sized for 2 shared CPU cores at 1 thread (about 2.5 s per step of 16 examples); the data
# split is fixed (data.seed 0), seeds vary the batch order. `data.path` is filled in by the bench
# (the converted JSONL under its workdir).
_GEN = dict(backbone={"type": "zoo", "name": "smollm2_lm", "max_length": 64}, objective="causal_lm",
            generation={"prompt_template": "Question: {prompt}\nAnswer: ", "stop": ["\n"]}, batch_size=16)
_GEN_FIT = dict(l2_lambda=1e-4, l2_last_layers=2, warmup_epochs=0.2, lr=3e-3)
GEN_SETTINGS: dict[str, Setting] = {
    "math": Setting("math", "SmolLM2-135M + mathematics_dataset arithmetic__add_or_sub (easy)",
                    merge(_GEN, {"data": {"format": "jsonl", "val_fraction": 0.1, "test_fraction": 0.15, "seed": 0,
                                          "max_per_class": 400, "max_eval_per_class": 64}}),
                    {}, dict(_GEN_FIT, epochs=2), full_lr=3e-5,
                    convert={"kind": "math", "module": "arithmetic__add_or_sub", "n": 600, "seed": 0}),
    "trivia": Setting("trivia", "SmolLM2-135M + chatterbot-corpus trivia",
                      merge(_GEN, {"data": {"format": "jsonl", "val_fraction": 0.1, "test_fraction": 0.2, "seed": 0}}),
                      {}, dict(_GEN_FIT, epochs=4), full_lr=3e-5,
                      convert={"kind": "chatterbot", "categories": ["trivia"]}),
}
