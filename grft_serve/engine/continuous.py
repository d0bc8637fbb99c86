"""The decode loop: continuous batching with a per-TOKEN row override, on transformers' paged KV cache.

transformers' ``ContinuousBatchingManager`` (pinned minor version, see pyproject) runs a background
thread that schedules requests into *packed* batches: ``input_ids`` is ``[1, N]`` (the prompt chunks
of new requests and one token per decoding request, back to back), so every linear layer sees
``x [1, N, H]`` and a task's rows must apply per TOKEN. Two hooks on the causal LM make each of the
manager's forwards a mixed-task forward without writing a weight:

- **before** the forward: the manager's batch (request id and query length per request, in token
  order) becomes ``token_slot [N]`` (request → task key → slot; base-model requests read the empty
  slot). New task keys are written into the slot tables here, on the decode thread, and the
  per-module plans go live on the row-op hooks (:class:`~grft_serve.engine.decode_slots.DecodeSlots`);
- **after** the forward: the plans are cleared, every logits row (one per request that produces a
  token now; the manager passes ``logits_to_keep``) is sampled with its request's own parameters
  and generator (:func:`~grft_serve.engine.sequences.sample_rows`), the token is delivered to the
  request and written back as a one-hot row — so the manager's own argmax takes exactly that token.

Must-haves: KV block sharing is OFF (two tasks with the same prompt would otherwise share KV blocks
computed under different weights); a key is held while any of its requests is in flight; at most
``max_tasks_per_batch`` task keys are in flight — more wait, FIFO, at admission — so a batch never
needs more slots than exist; the cache is sized explicitly (``num_blocks`` × ``page_size`` tokens).
A request that ends on our side (stop string, cancellation) is cancelled in the manager, which frees
its KV blocks; a failure of the manager's loop fails the requests in flight and the manager restarts.
"""
from __future__ import annotations

import logging
import queue
import threading
from collections import Counter, deque

import torch
from torch import nn

from .decode_slots import DecodeSlots
from .sequences import GenerationRequest, sample_rows

log = logging.getLogger("grft_serve.engine")

__all__ = ["ContinuousDecoder"]


class ContinuousDecoder:
    """Continuous batching of :class:`GenerationRequest` s on ``lm`` (see the module docstring)."""

    name = "continuous"

    def __init__(self, lm: nn.Module, slots: DecodeSlots, *, max_tasks_per_batch: int = 8, max_requests: int = 32,
                 max_batch_tokens: int = 512, num_blocks: int = 64, page_size: int = 64):
        from transformers import GenerationConfig
        from transformers.generation.configuration_utils import ContinuousBatchingConfig

        self.lm, self.slots = lm, slots
        self.max_tasks = max_tasks_per_batch
        self._gen = GenerationConfig(do_sample=False, eos_token_id=-1)
        self._cbc = ContinuousBatchingConfig(
            num_blocks=num_blocks, page_size=page_size, max_batch_tokens=max_batch_tokens,
            max_requests_per_batch=max_requests, allow_block_sharing=False, use_cuda_graph=False,
            use_async_batching=False, auto_switch_to_flash=False)
        self._reqs: dict[str, GenerationRequest] = {}
        self._inflight: Counter[str] = Counter()  # task key -> requests in flight
        self._waiting: deque[GenerationRequest] = deque()
        self._lock = threading.Lock()
        self._rows: list[GenerationRequest | None] = []
        self.counters: Counter[str] = Counter()
        self._handles = [lm.register_forward_pre_hook(self._before, with_kwargs=True),
                         lm.register_forward_hook(self._after, with_kwargs=True)]
        self._stop = threading.Event()
        self.mgr = self._start()
        self._monitor = threading.Thread(target=self._watch, name="grft-decode-monitor", daemon=True)
        self._monitor.start()

    def _start(self):
        from transformers.generation.continuous_batching.continuous_api import ContinuousBatchingManager

        mgr = ContinuousBatchingManager(self.lm, self._gen, self._cbc)
        with torch.inference_mode():
            mgr.start()  # the loop runs in the caller's inference mode
        return mgr

    # -- admission --------------------------------------------------------------------------------
    def submit(self, req: GenerationRequest) -> str:
        with self._lock:
            if self._waiting or not self._fits(req.key):
                self._waiting.append(req)
                self.counters["waited"] += 1
                self._admit_waiting()
            else:
                self._admit(req)
        return req.rid

    def _fits(self, key: str | None) -> bool:
        return key is None or key in self._inflight or len(self._inflight) < self.max_tasks

    def _admit(self, req: GenerationRequest) -> bool:
        """Hand ``req`` to the manager (caller holds ``_lock``); False: the manager is down — the request
        waits at the head of the queue for the restart."""
        if self.mgr.add_request(req.prompt_ids, request_id=req.rid, max_new_tokens=req.params.max_new_tokens,
                                eos_token_id=list(req.params.eos_ids) or -1) is None:
            self._waiting.appendleft(req)
            return False
        self._reqs[req.rid] = req
        if req.key is not None:
            if req.key not in self._inflight:
                self.slots.hold(req.key)
            self._inflight[req.key] += 1
        self.counters["admitted"] += 1
        return True

    def _admit_waiting(self) -> None:
        """Admit waiting requests, in order, while they fit (caller holds ``_lock``)."""
        while self._waiting and self._fits(self._waiting[0].key):
            if not self._admit(self._waiting.popleft()):
                return

    def _done(self, req: GenerationRequest) -> None:
        """``req`` left the decoder: its key may free up, and waiting requests may enter."""
        with self._lock:
            if self._reqs.pop(req.rid, None) is None:
                return
            if req.key is not None:
                self._inflight[req.key] -= 1
                if self._inflight[req.key] <= 0:
                    del self._inflight[req.key]
                    self.slots.release(req.key)
            self._admit_waiting()

    def cancel(self, rid: str) -> None:
        """Stop a request (e.g. its client left): it leaves the batch and its KV blocks are freed."""
        with self._lock:
            for w in self._waiting:
                if w.rid == rid:
                    self._waiting.remove(w)
                    self.counters["cancelled"] += 1
                    w.end("cancelled")
                    return
        req = self._reqs.get(rid)
        if req is not None:
            self.counters["cancelled"] += 1
            req.end("cancelled")
            self.mgr.cancel_request(rid)
            self._done(req)

    def pending(self) -> int:
        return len(self._reqs) + len(self._waiting)

    # -- the two hooks (decode thread) --------------------------------------------------------------
    def _before(self, module, args, kwargs):
        batch = self.mgr.batch_processor.inputs_and_outputs.requests_in_batch
        reqs = [self._reqs.get(fs.state.request_id) for fs in batch]
        self._rows = [r for fs, r in zip(batch, reqs) if fs.has_new_token]
        keyed = {r.key: r.resident for r in reqs if r is not None and r.key is not None}
        if not keyed:
            self.slots.deactivate()
            return None
        got, loads = self.slots.assign(list(keyed), list(keyed.values()))
        slot_of = dict(zip(keyed, got))
        empty = self.slots.empty
        token_slot: list[int] = []
        for fs, r in zip(batch, reqs):
            token_slot += [slot_of.get(r.key, empty) if r is not None else empty] * fs.query_length
        self.slots.activate(token_slot)
        self.counters["slot_loads"] += loads
        self.counters["plans_reused"] += self.slots.reused
        return None

    def _after(self, module, args, kwargs, output):
        self.slots.deactivate()
        rows = self._rows
        # [1, requests in batch, vocab]: the first rows belong, in order, to the requests that produce
        # a token now; any further rows are padding the manager never reads
        logits = output.logits
        if logits.shape[1] < len(rows):
            raise RuntimeError(f"decode step: {logits.shape[1]} logits rows for {len(rows)} sequences")
        live = [i for i, r in enumerate(rows) if r is not None]
        picks = iter(sample_rows(logits[0, live], [rows[i] for i in live]) if live else [])
        chosen = []
        for i, r in enumerate(rows):
            tok = next(picks) if r is not None else int(logits[0, i].argmax())  # cancelled meanwhile
            chosen.append(tok)
            if r is not None and r.push(tok):
                self.mgr.cancel_request(r.rid)  # ended on our side (stop, length): free its blocks now
                self._done(r)
        self.counters["steps"] += 1
        self.counters["tokens"] += len(live)
        onehot = torch.zeros_like(logits)
        onehot[0, torch.arange(len(chosen)), torch.tensor(chosen, device=logits.device)] = 1.0
        output.logits = onehot
        return output

    # -- the manager's outputs and failures (monitor thread) ----------------------------------------
    def _watch(self) -> None:
        while not self._stop.is_set():
            try:
                out = self.mgr.output_router.output_queue.get(timeout=0.5)
            except queue.Empty:
                if self.mgr.background_thread_status.fatal_error is not None and not self._stop.is_set():
                    self._recover()
                continue
            req = self._reqs.get(out.request_id)
            if req is None:
                continue
            if out.error:
                req.end("error", out.error)
            else:
                req.end("length")  # the manager ended it before we did: its own token limit
            self._done(req)

    def _recover(self) -> None:
        """The manager's loop died: the sequences it held lost their KV cache and fail; a new manager
        starts, and the waiting requests (also those refused while it was down) go to it."""
        old = self.mgr
        lost = list(self._reqs.values())
        log.error("decode loop failed (%s); failing %d sequences and restarting",
                  old.background_thread_status.fatal_error, len(lost))
        try:
            old.stop(block=True, timeout=10)
        except Exception:  # noqa: BLE001 - it is dead already
            pass
        self.mgr = self._start()
        self.counters["restarts"] += 1
        for r in lost:
            r.end("error", "the decoder failed on this batch")
            self._done(r)
        with self._lock:
            self._admit_waiting()

    def close(self) -> None:
        self._stop.set()
        try:
            self.mgr.stop(block=True, timeout=10)
        finally:
            for h in self._handles:
                h.remove()
            self.slots.reset()
