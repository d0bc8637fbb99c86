"""The HTTP contract: request / response models (OpenAPI) and the ONE error type of the HTTP layer.

Every error leaves the app as ``{"error": {"code": str, "message": str, ...}}`` with a 4xx status
(5xx only for faults of the server, whose messages never echo library internals). Backbone replicas
return :func:`error_item` dicts across the Ray call; :meth:`ApiError.from_item` turns them back.
"""
from __future__ import annotations

from typing import Any

from fastapi.responses import JSONResponse
from pydantic import BaseModel, ConfigDict, Field

__all__ = ["ApiError", "error_item", "ErrorBody", "ErrorResponse", "TaskOut", "BrokenTask", "TaskList", "TopK",
           "Prediction", "PredictResponse", "PredictRequest", "PredictItem", "BatchPredictRequest", "ERR",
           "ERRORS_READ", "ERRORS_PREDICT"]


class ApiError(Exception):
    """An HTTP error in the project's shape. ``extra`` fields are added to the error body."""

    def __init__(self, status: int, code: str, message: str, **extra: Any):
        super().__init__(message)
        self.status, self.code, self.message, self.extra = status, code, message, extra

    def body(self) -> dict:
        return {"error": {"code": self.code, "message": self.message, **self.extra}}

    def response(self) -> JSONResponse:
        headers = {"WWW-Authenticate": "Bearer"} if self.status == 401 else None
        return JSONResponse(self.body(), status_code=self.status, headers=headers)

    def item(self) -> dict:
        """This error as a plain dict that crosses a Ray call (see :func:`error_item`)."""
        return error_item(self.status, self.code, self.message)

    @classmethod
    def from_item(cls, err: dict, prefix: str = "") -> "ApiError":
        e = err["error"]
        return cls(e["status"], e["code"], f"{prefix}{e['message']}")


def error_item(status: int, code: str, message: str) -> dict:
    return {"error": {"status": status, "code": code, "message": message}}


class ErrorBody(BaseModel):
    code: str = Field(description="machine-readable error code, e.g. unknown_task, bad_base64, shape_mismatch")
    message: str = Field(description="what was wrong")


class ErrorResponse(BaseModel):
    error: ErrorBody


class TaskOut(BaseModel):
    model_config = ConfigDict(extra="allow")

    task_id: str
    version: str = Field(description="content hash of the package (first 16 hex digits of SHA-256)")
    kind: str = Field("classification", description="classification (a head over labels) or generation "
                                                    "(served by /v1/completions and /v1/chat/completions)")
    backbone: str | None = Field(description="backbone deployment serving it (null: no backbone has its base)")
    base_model_id: str
    base_fingerprint: str
    mode: str
    labels: list[str] = []
    num_params: int = Field(description="backbone parameters the task changes (rows/columns and biases; "
                                        "the classification head is not counted)")
    bytes: int
    metrics: dict = {}
    preprocessing: dict = {}
    created: float | None = None
    pinned: bool | None = Field(None, description="pinned on the device of every replica (OIP repository load)")
    residency: dict | None = Field(None, description="{'tier': best of device/host/store over the replicas, "
                                                     "'replicas': {replica: tier}}")


class BrokenTask(BaseModel):
    task_id: str
    version: str
    reason: str = Field(description="why the stored package cannot be served")


class TaskList(BaseModel):
    tasks: list[TaskOut]
    broken: list[BrokenTask] = []
    next: str | None = Field(None, description="cursor of the next page (pass it as `after`); null on the last")


class TopK(BaseModel):
    label: str
    score: float


class Prediction(BaseModel):
    task: str
    version: str = Field(description="version of the task that computed this answer")
    label: str
    score: float
    top_k: list[TopK]
    backbone: str
    replica: str = Field(description="id of the backbone replica that answered")
    batch_size: int = Field(description="inputs in the forward that computed this answer (dynamic batching)")
    batch_tasks: int = Field(description="distinct tasks in that forward (>1: override path)")


class PredictResponse(BaseModel):
    predictions: list[Prediction]


class PredictRequest(BaseModel):
    model_config = ConfigDict(extra="forbid")

    inputs: list[Any] = Field(description="texts (text tasks) or base64 / data-URL encoded images (image tasks)")
    top_k: int = Field(5, ge=1)


class PredictItem(BaseModel):
    model_config = ConfigDict(extra="forbid")

    task: str
    input: Any = Field(description="a text, or a base64 / data-URL encoded image, matching the task's backbone")


class BatchPredictRequest(BaseModel):
    model_config = ConfigDict(extra="forbid")

    items: list[PredictItem]
    top_k: int = Field(5, ge=1)


ERR = {"model": ErrorResponse}
ERRORS_READ = {401: ERR, 403: ERR}
ERRORS_PREDICT = {400: ERR, 401: ERR, 403: ERR, 404: ERR, 408: ERR, 413: ERR, 415: ERR, 422: ERR}
