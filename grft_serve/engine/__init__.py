"""The serving engine: one frozen base on one device, any number of GRFT tasks. Plain torch, no Ray.

The forms of a task, from the file to the forward
-------------------------------------------------
::

    bytes / file ──load_package──► TaskPackage ──Packer──► Packed ──upload──► Resident ──assign──► slot row
    (the store)                    (core, validated)       (host)             (device)             (slot tables)

- :class:`~grft_serve.core.package.TaskPackage` — a validated package: metadata, per-module
  :class:`~grft_serve.core.rowop.ModuleDelta` (indices + new rows / columns, optional bias) and the
  head. :meth:`Engine.register` builds it, checks it against the base, packs it and drops it.
- :class:`~grft_serve.engine.packed.Packed` — the task on the **host tier**: ONE contiguous ``uint8``
  buffer (pinned on CUDA) laid out by a :class:`~grft_serve.engine.packed.Layout` shared by every task
  of the same structure (modules, modes, k, dtype). About the package's own bytes.
- :class:`~grft_serve.engine.packed.Resident` — the task on the **device tier**: the same buffer after
  ONE host-to-device copy (on CPU: the host buffer itself) plus the few views the patch path and
  the heads read. Both tiers are :class:`~grft_serve.engine.tiers.TaskCache`, one
  :class:`~grft_serve.engine.lru.LRU` per tier (by bytes, pins, in-use holds).
- **slot row** — the task written into row ``s`` of every module's slot buffers
  (:class:`~grft_serve.engine.slots.SlotTables`; which task holds which row:
  :class:`~grft_serve.engine.assign.SlotAssigner`, an LRU with size 1 per slot). Used by mixed batches.

Two records describe a task without holding its weights: :class:`TaskInfo` (this engine's
registration: version, metadata, sizes — what a replica lists) and the app's
:class:`~grft_serve.store.StoredTask` (the store's listing: version and header facts read without
loading the package, or why it is broken).

Where weights are written
-------------------------
- **patch path** (:class:`~grft_serve.engine.patch.PatchPath`, one task per batch): the ONLY place the
  base weights change. :meth:`FlatWeights.patched <grft_serve.engine.flat.FlatWeights.patched>`
  ``index_copy_`` s the task's rows into the flat weight buffers (every patchable weight is a view
  into one of them, one buffer per row length), its columns into the weights, its biases into the
  flat bias buffer, runs the forward, and restores the saved pretrained values in a ``finally``.
- **override path** (:class:`~grft_serve.engine.override.OverridePath`, several tasks per batch): no
  weight is written. The slot tables are written once per task, when it first gets a slot
  (:meth:`SlotTables.write <grft_serve.engine.slots.SlotTables.write>`); a batch then carries only a
  sample → slot index (:class:`~grft_serve.engine.plan.BatchPlan`) and forward hooks correct each
  layer's output (:func:`~grft_serve.core.rowop.apply_mixed`).

The engine picks the path per batch and says which in its :class:`BatchReport`. One lock serialises
patching and every forward, so no forward ever sees half-patched weights.

Generation (a causal-LM base, ``kind: generation`` tasks)
---------------------------------------------------------
:class:`~grft_serve.engine.generate.TextGenerator` runs ONE decode loop over an engine whose backbone
is a causal LM: :class:`~grft_serve.engine.continuous.ContinuousDecoder` (transformers' continuous
batching, packed ``[1, N, H]`` batches, a task's rows applied per TOKEN through the same slot tables
and row op) or :class:`~grft_serve.engine.padded.PaddedDecoder` (static batches, per sample). It
writes no weight either: the patch path is never used while decoding. Slot keys are ``task@version``
(:mod:`.decode_slots`), held while a sequence of the task is in flight; one reserved, never-written
slot is the base model. Requests, sampling and stop rules: :mod:`.sequences`.

Modules: :mod:`.engine` (orchestration: registration, residency, run), :mod:`.patch`,
:mod:`.override`, :mod:`.plan` (per-batch plan), :mod:`.slots` (buffers), :mod:`.assign` (task → slot),
:mod:`.tiers` (store / host / device), :mod:`.lru`, :mod:`.packed`, :mod:`.flat`, :mod:`.graphs`
(CUDA graphs of both paths); generation: :mod:`.generate`, :mod:`.continuous`, :mod:`.padded`,
:mod:`.decode_slots`, :mod:`.sequences`.
"""
from .assign import SlotAssigner
from .engine import BatchReport, BatchResult, Engine, TaskExistsError, TaskInfo, UnknownTaskError
from .flat import FlatWeights
from .generate import DECODERS, GenerationInputError, TextGenerator
from .graphs import GraphRunner
from .lru import LRU
from .override import OverridePath
from .packed import Layout, Packed, Packer, Resident
from .patch import PatchPath
from .plan import BatchPlan
from .sequences import GenerationRequest, SamplingParams, StreamEvent
from .slots import SlotTables
from .tiers import TaskCache, Usage

__all__ = ["DECODERS", "LRU", "BatchPlan", "BatchReport", "BatchResult", "Engine", "FlatWeights",
           "GenerationInputError", "GenerationRequest", "GraphRunner", "Layout", "OverridePath", "Packed", "Packer",
           "PatchPath", "Resident", "SamplingParams", "SlotAssigner", "SlotTables", "StreamEvent", "TaskCache",
           "TaskExistsError", "TaskInfo", "TextGenerator", "UnknownTaskError", "Usage"]
