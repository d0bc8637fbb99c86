"""Decode and preprocess one request's inputs on the replica's thread pool, in bounded slices.

::

    Prepare(items)                         grouped by their tasks' preprocessing (prep_key)
      step 1   images: every header read (size, JPEG scans, draft) and the request's decoded bytes
               summed against max_decoded_bytes, before a single pixel is decoded; texts: tokenised
      step 2.. images decoded one at a time (deadline, cancel) as ONE preprocess call per slice
               iterates over them: the full-size image is dropped before the next one is decoded
      done     one Chunk per preprocessing (its tensors concatenated)

The replica runs a request's steps one after the other on its pool, each for at most
:data:`SLICE_S` of work (or one image, whose decode is bounded by ``decode_timeout_s``), then puts the
rest back at the end of the pool's queue. So a request holds at most one pool thread at a time, and a
request with many slow images is interleaved with the others instead of holding a thread until it is
done; a request that stops (client gone: :attr:`Prepare.cancel`) stops at the next image or block.
"""
from __future__ import annotations

import json
import threading
import time
from dataclasses import dataclass
from typing import Any, Callable

from .config import Limits
from .inputs import decoded_bytes, load_image, open_image
from .schemas import ApiError

__all__ = ["SLICE_S", "Chunk", "Prepare", "collate", "prep_key"]

SLICE_S = 0.05


def prep_key(preprocessing: dict) -> str:
    """Tasks with equal keys share a preprocessing, hence a batch."""
    return json.dumps(preprocessing, sort_keys=True, default=str)


@dataclass
class Chunk:
    """Preprocessed inputs of one request that share a preprocessing (at most max_batch_size)."""

    batch: Any
    task_ids: list[str]
    prep_key: str
    top_k: int

    def __len__(self) -> int:
        return len(self.task_ids)

    def split(self, size: int) -> list[tuple[slice, "Chunk"]]:
        """Consecutive parts of at most ``size`` inputs, each with the slice of inputs it holds."""
        if len(self) <= size:
            return [(slice(0, len(self)), self)]
        out = []
        for i in range(0, len(self), size):
            s = slice(i, min(i + size, len(self)))
            batch = {k: v[s] for k, v in self.batch.items()} if isinstance(self.batch, dict) else self.batch[s]
            out.append((s, Chunk(batch, self.task_ids[s], self.prep_key, self.top_k)))
        return out


def collate(batches: list[Any], pad_id: int = 0) -> Any:
    """Concatenate preprocessed batches along dim 0; token batches are right-padded to one length."""
    import torch

    if len(batches) == 1:
        return batches[0]
    if isinstance(batches[0], dict):
        length = max(b["input_ids"].shape[1] for b in batches)
        out = {}
        for key in batches[0]:
            fill = pad_id if key == "input_ids" else 0
            out[key] = torch.cat([torch.nn.functional.pad(b[key], (0, length - b[key].shape[1]), value=fill)
                                  for b in batches])
        return out
    return torch.cat(batches)


def _indexed(i: int, fn, *args):
    """``fn(*args)``; an ApiError it raises names input ``i``."""
    try:
        return fn(*args)
    except ApiError as e:
        e.extra["index"] = i
        raise


class Prepare:
    """One request's inputs → ``groups``: ``[(input indices, Chunk)]``, one per preprocessing.

    ``engine``: the replica's engine (tasks' preprocessing); ``ensure_task(task, version)`` loads a
    task; call :meth:`step` until :attr:`done` (ApiErrors carry the input's ``index``)."""

    def __init__(self, engine, kind: str, limits: Limits, ensure_task: Callable[[str, str | None], None],
                 items: list[dict], top_k: int):
        self.engine, self.kind, self.limits, self.ensure_task = engine, kind, limits, ensure_task
        self.items, self.top_k = items, top_k
        self.cancel = threading.Event()
        self.groups: list[tuple[list[int], Chunk]] = []
        self.done = False
        self._todo: list[tuple[str, dict, list[int]]] = []  # (key, preprocessing, indices) left
        self._images: dict[int, Any] = {}  # opened, not decoded
        self._parts: list = []  # preprocessed slices of the group being decoded
        self._decoded = 0  # images of that group decoded so far
        self._started = False

    def step(self) -> None:
        """One slice of work (see the module docstring)."""
        t0 = time.monotonic()
        if not self._started:
            self._start()
            self._started = True
            if time.monotonic() - t0 > SLICE_S:
                return
        while self._todo:
            key, prep, idx = self._todo[0]
            if self.kind != "image":
                self._finish(key, idx, self._preprocess([self.items[i]["input"] for i in idx], prep, idx[0]))
                continue
            first = self._decoded
            part = self._preprocess(self._decode(idx, t0), prep, idx[first])  # ONE call per slice
            self._parts.append(part)
            if self._decoded < len(idx):
                return  # the slice is used up: the rest goes to the back of the pool's queue
            import torch

            self._finish(key, idx, torch.cat(self._parts) if len(self._parts) > 1 else self._parts[0])
            self._parts, self._decoded = [], 0
            if time.monotonic() - t0 > SLICE_S:
                break
        self.done = not self._todo

    def _decode(self, idx: list[int], t0: float):
        """The group's next images, decoded one at a time as the preprocessing asks for them (so only
        one full-size image is alive), until the slice is used up."""
        while self._decoded < len(idx):
            i = idx[self._decoded]
            if self.cancel.is_set():
                raise ApiError(408, "cancelled", "the request was cancelled", index=i)
            img = _indexed(i, load_image, self._images.pop(i), self.limits, i, self.cancel)
            self._decoded += 1
            yield img
            del img
            if time.monotonic() - t0 > SLICE_S:
                return

    def _start(self) -> None:
        for tid, version in dict.fromkeys((it["task"], it.get("version")) for it in self.items):
            self.ensure_task(tid, version)
        by_prep: dict[str, tuple[dict, list[int]]] = {}
        for i, it in enumerate(self.items):
            try:
                prep = self.engine.task(it["task"]).meta.preprocessing
            except KeyError:
                raise ApiError(404, "unknown_task", f"unknown task {it['task']!r}", index=i) from None
            by_prep.setdefault(prep_key(prep), (prep, []))[1].append(i)
        self._todo = [(k, p, idx) for k, (p, idx) in by_prep.items()]
        if self.kind != "image":
            return
        total = 0
        for _, prep, idx in self._todo:
            side = self.engine.backbone.min_decode_side(prep)
            for i in idx:
                img = _indexed(i, open_image, self.items[i]["input"], self.limits, i, side)
                self._images[i] = img
                total += decoded_bytes(img)
                if total > self.limits.max_decoded_bytes:
                    raise ApiError(413, "too_many_pixels", f"the request's images decode to more than "
                                                           f"{self.limits.max_decoded_bytes} bytes (width x height"
                                                           " x channels, summed)", index=i)

    def _preprocess(self, raws, prep: dict, index: int):
        try:
            return self.engine.backbone.preprocess(raws, prep)
        except ApiError:  # a decode error of one of the images, raised through the preprocessing
            raise
        except Exception as e:  # noqa: BLE001 - this request's inputs only
            raise ApiError(422, "bad_input", f"cannot preprocess the inputs ({type(e).__name__})",
                           index=index) from None

    def _finish(self, key: str, idx: list[int], batch: Any) -> None:
        self.groups.append((idx, Chunk(batch, [self.items[i]["task"] for i in idx], key, self.top_k)))
        self._todo.pop(0)
