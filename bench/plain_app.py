"""The plain one-model Ray Serve app that bench/serve.py measures grft-serve against.

What a user gets by deploying ONE fine-tuned task as an ordinary model with Ray Serve: one deployment
with a FastAPI ingress (``@serve.ingress``). A request ``{"inputs": [base64 PNG, ...], "top_k"}`` is
decoded with PIL, prepared with the timm eval transform of the task package's
``preprocessing.timm_data_config`` (the backbone's own ``preprocess``, as grft-serve does), and run
as ONE forward through the task merged into the backbone (:class:`grft_serve.export.MergedTask`:
the task's rows written into a copy of the base + its linear head); the answer is the softmax top-k
per input. Decoding runs concurrently in threads; forwards run one at a time (a lock), like a single
model server.
"""
# no `from __future__ import annotations`: FastAPI must see real annotation objects in the Ray replica
import asyncio
import base64
import io
import threading

import torch
from fastapi import FastAPI, HTTPException, Request
from pydantic import BaseModel, Field, ValidationError
from ray import serve

from grft_serve.core.device import resolve_device, resolve_dtype

__all__ = ["PlainModel"]


class PlainRequest(BaseModel):
    inputs: list[str] = Field(min_length=1, description="base64-encoded images")
    top_k: int = Field(5, ge=1)


plain_api = FastAPI(title="plain one-model baseline")


def _resolve_device(spec: dict) -> tuple[str, str]:
    device = str(resolve_device(spec.get("device", "auto")))
    return device, resolve_dtype(spec.get("dtype", "auto"), device)


@serve.deployment(name="PlainModel")
@serve.ingress(plain_api)
class PlainModel:
    """One task as an ordinary model: decode → task preprocessing → one forward → head → top-k."""

    def __init__(self, spec: dict, package: bytes):
        from grft_serve.core.backbones import load_backbone
        from grft_serve.core.package import load_package
        from grft_serve.export import merge_task

        if spec.get("torch_threads"):
            torch.set_num_threads(int(spec["torch_threads"]))
        if spec.get("seed") is not None:
            torch.manual_seed(int(spec["seed"]))
        self.device, dtype = _resolve_device(spec)
        self.dtype = getattr(torch, dtype)
        backbone = load_backbone(spec["backbone"])
        pkg = load_package(package, base=backbone.describe())  # same base as grft-serve, checked
        self.model = merge_task(backbone, pkg)
        self.model.backbone.to(device=self.device, dtype=self.dtype)
        self.model.head.to(self.device)
        self.prep, self.labels = pkg.meta.preprocessing, list(pkg.meta.labels)
        self._lock = threading.Lock()

    @plain_api.get("/healthz")
    async def healthz(self) -> dict:
        return {"ok": True, "device": self.device, "dtype": str(self.dtype).replace("torch.", "")}

    @plain_api.post("/predict")
    async def predict(self, request: Request) -> dict:
        try:
            body = PlainRequest.model_validate(await request.json())
        except (ValueError, ValidationError) as e:
            raise HTTPException(422, f"expected {{'inputs': [base64 images], 'top_k'}}: {e}") from None
        return {"predictions": await asyncio.to_thread(self._run, body.inputs, body.top_k)}

    def _run(self, inputs: list[str], top_k: int) -> list[dict]:
        from PIL import Image

        from grft_serve.core.backbones import Backbone

        images = []
        for i, s in enumerate(inputs):
            try:
                img = Image.open(io.BytesIO(base64.b64decode(s, validate=True)))
                images.append(img.convert("RGB"))
            except Exception as e:  # noqa: BLE001
                raise HTTPException(422, f"input {i}: not a base64 image: {e}") from None
        batch = Backbone.batch_to(self.model.backbone.preprocess(images, self.prep), self.device, self.dtype)
        with self._lock, torch.inference_mode():
            probs = self.model(batch).float().softmax(-1).cpu()
        sc, ix = probs.topk(min(top_k, probs.shape[1]), dim=1)
        return [{"label": self.labels[int(i[0])], "score": float(s[0]),
                 "top_k": [{"label": self.labels[int(a)], "score": float(b)} for b, a in zip(s, i)]}
                for s, i in zip(sc, ix)]
