"""Heat-map of a GRFT selection: gradient score per row/column of every module, selected ones marked."""
from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import torch

from .plots import pyplot, save_figure

__all__ = ["heatmap"]


def heatmap(sel: Any, spec, path: str | Path, bins: int = 64) -> Path:
    """PNG: one line per module; colour = gradient score (binned max, normalised per module),
    white dots = selected rows/columns (relative position within the matrix).

    ``sel``: a :class:`grft_train.select.Selection` (its ``mode``, ``indices``, ``scores``, ``k`` and
    ``meta``); this module depends on the plotting helpers only."""
    plt = pyplot()

    names = list(sel.meta.get("eligible_modules") or sel.indices)
    img = np.zeros((len(names), bins))
    pts_x, pts_y = [], []
    for r, n in enumerate(names):
        if n not in spec.modules:
            continue
        shape = spec.modules[n].weight_shape
        size = max(spec.modules[n].n_slices("column" if sel.mode == "column" else "row"), 1)
        sc = sel.scores.get(n)
        if sc is not None and float(sc.max()) > 0:
            v = (sc.float() / sc.max()).numpy()
            np.maximum.at(img[r], np.minimum((np.arange(len(v)) * bins) // size, bins - 1), v)
        idx = sel.indices.get(n)
        if idx is None:
            continue
        pos = (torch.arange(shape[0]).repeat_interleave(idx.shape[1]).numpy() if sel.mode == "sparse"
               else idx.numpy())
        for p_ in np.unique(np.minimum((pos * bins) // size, bins - 1)):
            pts_x.append(p_)
            pts_y.append(r)
    h = max(3.0, 0.18 * len(names) + 1.5)
    fig, ax = plt.subplots(figsize=(9, h))
    im = ax.imshow(img, aspect="auto", cmap="magma", interpolation="nearest", vmin=0, vmax=1)
    ax.scatter(pts_x, pts_y, s=10, c="white", edgecolors="cyan", linewidths=0.5, label="selected")
    ax.set_yticks(range(len(names)))
    ax.set_yticklabels([n.removeprefix("net.") for n in names], fontsize=6)
    ax.set_xlabel(f"relative {'column' if sel.mode == 'column' else 'row'} position ({bins} bins)")
    ax.set_title(f"GRFT selection ({sel.mode}, k={_k_label(sel.k)}) on {sel.meta.get('base_model_id')}")
    ax.legend(loc="upper right", fontsize=7)
    fig.colorbar(im, ax=ax, label="sum of squared loss gradients / layer max")
    return save_figure(fig, path)


def _k_label(k: dict[str, int]) -> str:
    vals = sorted(set(k.values()))
    return str(vals[0]) if len(vals) == 1 else f"{vals[0]}-{vals[-1]}" if vals else "0"
