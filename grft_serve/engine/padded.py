"""The padded alternative to the continuous decoder: static batches, requests join at batch boundaries.

What ``generate()`` under ``@serve.batch`` does, with the same per-request sampling and the same row
override: a background thread takes up to ``max_requests`` waiting requests (at most
``max_tasks_per_batch`` tasks), left-pads their prompts into one ``[B, L]`` batch and decodes it to
the end with a ``DynamicCache``. The override is per SAMPLE here (``x [B, T, H]``, ``sample_slot
[B]``). A finished sequence leaves the batch at once (its cache rows are dropped), so a short answer
does not keep paying for a long one; a request that arrives while a batch runs waits for it to end.
"""
from __future__ import annotations

import logging
import threading
from collections import Counter, deque

import torch
from torch import nn

from .decode_slots import DecodeSlots
from .sequences import GenerationRequest, sample_rows

log = logging.getLogger("grft_serve.engine")

__all__ = ["PaddedDecoder"]


class PaddedDecoder:
    """Static batches of :class:`GenerationRequest` s on ``lm`` (see the module docstring)."""

    name = "padded"

    def __init__(self, lm: nn.Module, slots: DecodeSlots, *, pad_id: int, max_tasks_per_batch: int = 8,
                 max_requests: int = 32, batch_wait_s: float = 0.005):
        self.lm, self.slots, self.pad_id = lm, slots, pad_id
        self.max_tasks, self.max_requests, self.batch_wait_s = max_tasks_per_batch, max_requests, batch_wait_s
        self.device = next(lm.parameters()).device
        self._waiting: deque[GenerationRequest] = deque()
        self._cv = threading.Condition()
        self._cancelled: set[str] = set()
        self._running = 0
        self.counters = Counter()
        self._stop = False
        self._thread = threading.Thread(target=self._loop, name="grft-decode-padded", daemon=True)
        self._thread.start()

    def submit(self, req: GenerationRequest) -> str:
        with self._cv:
            self._waiting.append(req)
            self._cv.notify()
        return req.rid

    def cancel(self, rid: str) -> None:
        with self._cv:
            self._cancelled.add(rid)

    def close(self) -> None:
        with self._cv:
            self._stop = True
            self._cv.notify()
        self._thread.join(timeout=10)
        self.slots.reset()

    def _take(self) -> list[GenerationRequest]:
        batch, tasks, rest = [], set(), deque()
        while self._waiting and len(batch) < self.max_requests:
            r = self._waiting.popleft()
            if r.key is not None and r.key not in tasks and len(tasks) >= self.max_tasks:
                rest.append(r)
                continue
            if r.key is not None:
                tasks.add(r.key)
            batch.append(r)
        self._waiting.extendleft(reversed(rest))
        return batch

    def _loop(self) -> None:
        while True:
            with self._cv:
                while not self._waiting and not self._stop:
                    self._cv.wait()
                if self._stop:
                    return
                if len(self._waiting) < self.max_requests:  # what @serve.batch does: wait for company
                    self._cv.wait(self.batch_wait_s)
                batch = self._take()
                self._running = len(batch)
            try:
                with torch.inference_mode():
                    self._run(batch)
            except Exception:  # noqa: BLE001 - fail this batch, keep serving
                log.exception("padded decode batch failed")
                for r in batch:
                    r.end("error", "the decoder failed on this batch")
                self.counters["failed_batches"] += 1
            finally:
                self._running = 0

    def pending(self) -> int:
        return len(self._waiting) + self._running

    def _slots(self, batch: list[GenerationRequest]) -> list[int]:
        keyed = {r.key: r.resident for r in batch if r.key is not None}
        if not keyed:
            return [self.slots.empty] * len(batch)
        got, loads = self.slots.assign(list(keyed), list(keyed.values()))
        self.counters["slot_loads"] += loads
        of = dict(zip(keyed, got))
        return [of.get(r.key, self.slots.empty) for r in batch]

    def _run(self, batch: list[GenerationRequest]) -> None:
        from transformers import DynamicCache

        slot = self._slots(batch)
        L = max(len(r.prompt_ids) for r in batch)
        ids = torch.full((len(batch), L), self.pad_id, dtype=torch.long)
        am = torch.zeros((len(batch), L), dtype=torch.long)
        for i, r in enumerate(batch):
            ids[i, L - len(r.prompt_ids):] = torch.tensor(r.prompt_ids)
            am[i, L - len(r.prompt_ids):] = 1
        ids, am = ids.to(self.device), am.to(self.device)
        pos = (am.cumsum(-1) - 1).clamp(min=0)
        cache = DynamicCache()
        live = list(range(len(batch)))
        while live:
            reqs = [batch[i] for i in live]
            try:
                self.slots.activate([slot[i] for i in live])
                self.counters["plans_reused"] += self.slots.reused
                out = self.lm(input_ids=ids, attention_mask=am, position_ids=pos, cache=cache, use_cache=True,
                              logits_to_keep=1)
            finally:
                self.slots.deactivate()
            tokens = sample_rows(out.logits[:, -1].float(), reqs)
            self.counters["steps"] += 1
            self.counters["tokens"] += len(reqs)
            keep = []
            for j, (r, t) in enumerate(zip(reqs, tokens)):
                if r.rid in self._cancelled:
                    self.counters["cancelled"] += 1
                    r.end("cancelled")
                    continue
                if not r.push(t):
                    keep.append(j)
            if not keep:
                break
            next_ids = torch.tensor(tokens, dtype=torch.long, device=self.device).unsqueeze(1)
            am = torch.cat([am, am.new_ones((am.shape[0], 1))], 1)
            pos = pos[:, -1:] + 1
            if len(keep) < len(live):
                k = torch.tensor(keep, device=self.device)
                cache.batch_select_indices(k)
                am, pos, next_ids = am[k], pos[k], next_ids[k]
                live = [live[j] for j in keep]
            ids = next_ids
        with self._cv:
            self._cancelled.difference_update(r.rid for r in batch)
