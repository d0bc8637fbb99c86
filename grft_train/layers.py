"""Layers of a backbone in forward order, and GRFT's regularised set R.

GRFT's loss is ``CE + λ·Σ_{l∈R} ‖W_l − W_l,pre‖²`` where R is "the last L layers, the patch
embedding and the classification head" (GRFT paper, Eq. 8). A *layer* here is:

- the **stem**: patchable modules defined before the first block (ViT ``patch_embed.proj``,
  EfficientNet ``conv_stem``, ResNet ``conv1``); the paper's patch embedding;
- one **block**: the modules sharing a block path, keyed by every index along it —
  ``blocks.3`` (ViT), ``encoder.layer.3`` (BERT), ``layers.3`` (LLaMA), ``blocks.5.2`` (EfficientNet
  stage 5, block 2: each MBConv block counts, not each stage), ``stages.2.blocks.1``, ``layer3.1``;
- the **final** layer: modules defined after the last block (EfficientNet ``conv_head``, a BERT
  pooler), which is the last layer of the network and the first one the last-L count takes.

The head of a task is regularised separately (towards its initialisation, ``fit.l2_head``).
"""
from __future__ import annotations

import re
from dataclasses import dataclass, field

__all__ = ["Layers", "block_key", "describe_regularised", "layers_of", "regularised_modules"]

_BLOCK_WORD = re.compile(r"(?:blocks|block|layers|layer|h|stages|stage)(\d*)")
_INNER_WORD = re.compile(r"(?:blocks|block|layers|layer)")


def block_key(name: str) -> tuple[int, ...] | None:
    """Indices of the block a module belongs to (``None`` outside every block).

    ``net.blocks.5.2.conv_pw`` -> (5, 2); ``net.stages.2.blocks.1.conv`` -> (2, 1);
    ``net.encoder.layer.3.attention.self.query`` -> (3,); ``net.layer3.1.conv1`` -> (3, 1)."""
    parts = name.split(".")
    for i, p in enumerate(parts):
        m = _BLOCK_WORD.fullmatch(p)
        if not m or not (m.group(1) or (i + 1 < len(parts) and parts[i + 1].isdigit())):
            continue
        nums = [int(m.group(1))] if m.group(1) else []
        for q in parts[i + 1:]:
            if q.isdigit():
                nums.append(int(q))
            elif not _INNER_WORD.fullmatch(q):
                break
        return tuple(nums)
    return None


@dataclass
class Layers:
    """Module names grouped into stem, blocks (forward order) and final layer."""

    stem: list[str] = field(default_factory=list)
    blocks: list[list[str]] = field(default_factory=list)
    block_keys: list[tuple[int, ...]] = field(default_factory=list)
    final: list[str] = field(default_factory=list)

    def ordered(self) -> list[list[str]]:
        """The layers the last-L count walks backwards over: the blocks, then the final layer."""
        return [*self.blocks, *([self.final] if self.final else [])]

    def labels(self) -> list[str]:
        out = [".".join(map(str, k)) for k in self.block_keys]
        return [*(f"block {x}" for x in out), *(["final"] if self.final else [])]


def layers_of(names: list[str]) -> Layers:
    """Group patchable module names (in definition order) into layers."""
    keys = [block_key(n) for n in names]
    in_block = [i for i, k in enumerate(keys) if k is not None]
    out = Layers()
    if not in_block:  # no block structure: every module is one layer of its own
        out.blocks = [[n] for n in names]
        out.block_keys = [(i,) for i in range(len(names))]
        return out
    first, last = in_block[0], in_block[-1]
    groups: dict[tuple[int, ...], list[str]] = {}
    for i, (n, k) in enumerate(zip(names, keys)):
        if k is not None:
            groups.setdefault(k, []).append(n)
        elif i < first:
            out.stem.append(n)
        elif i > last:
            out.final.append(n)
        else:  # a module between blocks (e.g. a downsampling conv): part of the block before it
            prev = next(keys[j] for j in range(i - 1, -1, -1) if keys[j] is not None)
            groups[prev].append(n)
    out.block_keys = sorted(groups)
    out.blocks = [groups[k] for k in out.block_keys]
    return out


def regularised_modules(names: list[str], all_names: list[str], last_layers: int, embed: bool) -> list[str]:
    """The modules of ``names`` in GRFT's regularised set R.

    ``all_names``: every module the forward uses, in definition order (defines the layers);
    ``last_layers``: L (−1: every layer, stem included; 0: none); ``embed``: add the stem."""
    lay = layers_of(all_names)
    keep: set[str] = set()
    ordered = lay.ordered()
    if last_layers < 0:
        keep.update(n for layer in ordered for n in layer)
        keep.update(lay.stem)
    elif last_layers > 0:
        keep.update(n for layer in ordered[-last_layers:] for n in layer)
    if embed:
        keep.update(lay.stem)
    return [n for n in names if n in keep]


def describe_regularised(all_names: list[str], last_layers: int, embed: bool, head: bool = True) -> dict:
    """Summary of R for ``grft-train select`` / ``fit``: which layers and how many modules."""
    lay = layers_of(all_names)
    ordered, labels = lay.ordered(), lay.labels()
    chosen = labels if last_layers < 0 else (labels[-last_layers:] if last_layers > 0 else [])
    mods = regularised_modules(all_names, all_names, last_layers, embed)
    return {"last_layers": last_layers, "layers_total": len(ordered),
            "layers": ((["stem"] if (embed or last_layers < 0) and lay.stem else []) + chosen
                       + (["head"] if head else [])),
            "stem": lay.stem, "modules": len(mods)}
