"""Can this base run a task's preprocessing? A pixel budget and a one-input dry run, per preprocessing.

A package can be valid (every tensor fits the base) and still unservable: a timm ViT built with a
fixed 32 px position table cannot take the 64 px inputs a package asks for, and a package may ask for
``input_size`` 1024 with ``crop_pct`` 0.5 (every input upscaled to 2048 px, then a 1024 px forward).
Before a task is registered (the ``validate`` call of a registration) and before a replica serves a
stored one (its lazy load), :class:`RunnableCheck` answers:

* **pixel budget**: an image preprocessing whose model input (height × width) exceeds the deployment's
  ``max_input_pixels`` (default: 4× the base's own input, i.e. twice its resolution) is refused;
* **dry run** (classification bases): one neutral input (a mid-grey image at the task's input size, or a short text) is
  preprocessed and run through the engine *with the task*, under the engine's lock like any batch. A
  package not registered yet runs under a temporary id, removed in a ``finally``.

Both outcomes are cached per preprocessing (:func:`~.prepare.prep_key`): the base is frozen and the
task's rows cannot change shapes, so one dry run per preprocessing and replica suffices. A failure
raises :class:`~grft_serve.core.package.PreprocessingUnrunnableError` (422 ``preprocessing_unrunnable``).
"""
from __future__ import annotations

import logging
import math
import threading
import uuid

import torch

from ..core.package import PreprocessingUnrunnableError, TaskPackage
from ..core.package_header import CLASSIFICATION
from .prepare import prep_key

__all__ = ["TEMP_PREFIX", "RunnableCheck"]

TEMP_PREFIX = "dry-run."  # ids of packages registered for a dry run (the replica's sync leaves them alone)

log = logging.getLogger("grft_serve.app")


def _input_hw(preprocessing: dict) -> tuple[int, int] | None:
    dc = (preprocessing or {}).get("timm_data_config") or {}
    size = dc.get("input_size")
    return (int(size[-2]), int(size[-1])) if size else None


class RunnableCheck:
    """Pixel budget + dry run for one engine (see the module docstring)."""

    def __init__(self, engine, max_input_pixels: int | None = None):
        self.engine = engine
        own = _input_hw(engine.backbone.preprocessing_meta())
        self.max_pixels = max_input_pixels or (4 * math.prod(own) if own else None)
        self._known: dict[str, str | None] = {}  # prep_key -> why it cannot run (None: it runs)
        self._lock = threading.Lock()

    def check_registered(self, task_id: str) -> None:
        """The task the engine holds under ``task_id`` can run (dry run under its own id)."""
        prep = self.engine.task(task_id).meta.preprocessing
        self._check(prep, lambda batch: self.engine.run(batch, [task_id], top_k=1))

    def check_package(self, pkg: TaskPackage) -> None:
        """A validated package not registered here can run (dry run under a temporary id)."""
        def run(batch):
            meta = pkg.meta.model_copy(update={"task_id": f"{TEMP_PREFIX}{uuid.uuid4().hex}"})
            tmp = TaskPackage(meta, pkg.deltas, pkg.head_weight, pkg.head_bias)
            self.engine.register(tmp)
            try:
                self.engine.run(batch, [meta.task_id], top_k=1)
            finally:
                self.engine.unregister(meta.task_id)
        self._check(pkg.meta.preprocessing, run)

    def _check(self, prep: dict, run) -> None:
        key = prep_key(prep)
        with self._lock:
            known = key in self._known
            why = self._known.get(key)
        if not known:
            why = self._why(prep, run)
            with self._lock:
                self._known[key] = why
        if why is not None:
            raise PreprocessingUnrunnableError(why)

    def _why(self, prep: dict, run) -> str | None:
        bb = self.engine.backbone
        hw = _input_hw(prep) or _input_hw(bb.preprocessing_meta())
        if hw and self.max_pixels and hw[0] * hw[1] > self.max_pixels:
            return (f"the task's preprocessing asks for {hw[0]}x{hw[1]} px inputs; this deployment runs at most "
                    f"{self.max_pixels} px per input (max_input_pixels)")
        if bb.task_kind != CLASSIFICATION:  # generation runs through the decode loop, not engine.run
            return None
        if bb.kind == "image":
            from PIL import Image

            raw = Image.new("RGB", (hw[1], hw[0]) if hw else (224, 224), (124, 116, 104))
        elif bb.kind == "text":
            raw = "dry run"
        else:
            return None
        try:
            run(bb.preprocess([raw], prep))
        except (MemoryError, torch.OutOfMemoryError) as e:  # says nothing about the package: not cached
            raise PreprocessingUnrunnableError(f"out of memory in a one-input dry run ({type(e).__name__})") from None
        except Exception as e:  # noqa: BLE001 - whatever the base raises on it, the task cannot be served
            log.warning("base %s cannot run preprocessing %s: %s: %s", bb.model_id, prep, type(e).__name__, e)
            return (f"base {bb.model_id} cannot run the task's preprocessing {str(prep)[:200]}: a one-input dry "
                    f"run failed ({type(e).__name__}: {str(e)[:160]})")
        return None
