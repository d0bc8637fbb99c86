"""The FastAPI application object of the ingress: description, error handlers, request metrics.

Every error leaves as the project's ``{"error": {"code", "message"}}`` shape — also FastAPI's own
(unknown route 404, wrong method 405, body validation 422). Unexpected exceptions are logged with
their trace and answered 500 with a generic message: library messages never reach the caller.
"""
from __future__ import annotations

import logging

from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse
from fastapi.exceptions import RequestValidationError
from pydantic import ValidationError
from starlette.exceptions import HTTPException as StarletteHTTPException

from .. import __version__
from .proxy import HeaderLimit
from .schemas import ApiError
from .task_metrics import RequestMetrics

__all__ = ["OPENAI_PATHS", "api", "pyd_error"]

log = logging.getLogger("grft_serve.app")

DESCRIPTION = """
Serve many GRFT fine-tuned tasks from one frozen backbone per base model.

* **Tasks** are uploaded as `.grft.safetensors` packages; each is routed to the backbone whose base
  fingerprint it carries, validated there, and stored (the store is the source of truth: every
  replica answers for a task once it is registered; registrations survive restarts).
* **Predict**: all inputs of a request travel to their backbone in one call; replicas batch inputs
  across concurrent requests and tasks (one forward per batch).
* **Auth**: `Authorization: Bearer <token>`. Register/delete need the admin token (env var named by
  `admin_token_env`); reads, `/metrics` and the API docs need the read token when `read_token_env`
  names a set variable. Auth and body size are decided from the headers, before a body is read.
* **Errors** are JSON `{"error": {"code", "message"}}` with a 4xx status; a rejected request changes nothing.
"""

api = FastAPI(title="grft-serve", version=__version__, description=DESCRIPTION, docs_url=None,
              redoc_url=None, openapi_url=None, redirect_slashes=False)


def pyd_error(e: ValidationError) -> ApiError:
    first = e.errors()[0] if e.errors() else {}
    loc = ".".join(str(x) for x in first.get("loc", ()) if x != "body")
    msg = first.get("msg", "invalid request")
    return ApiError(422, "invalid_request", f"{loc}: {msg}" if loc else msg)


OPENAI_PATHS = ("/v1/models", "/v1/completions", "/v1/chat/completions")


def _answer(request: Request, exc: ApiError):
    """``exc`` in the project's shape, or OpenAI's on the OpenAI-compatible routes (clients such as the
    ``openai`` package read ``error.message`` / ``error.type`` / ``error.code``)."""
    if request.url.path in OPENAI_PATHS:
        from .openai_schemas import openai_error_body

        headers = {"WWW-Authenticate": "Bearer"} if exc.status == 401 else None
        return JSONResponse(openai_error_body(exc.status, exc.code, exc.message, exc.extra.get("param")),
                            status_code=exc.status, headers=headers)
    return exc.response()


@api.exception_handler(ApiError)
async def _api_error(request: Request, exc: ApiError):
    return _answer(request, exc)


@api.exception_handler(RequestValidationError)
async def _validation_error(request: Request, exc: RequestValidationError):
    errs = exc.errors()
    first = errs[0] if errs else {}
    loc = ".".join(str(x) for x in first.get("loc", ()))
    return _answer(request, ApiError(422, "invalid_request", f"{loc}: {first.get('msg', 'invalid request')}"))


@api.exception_handler(StarletteHTTPException)
async def _http_error(request: Request, exc: StarletteHTTPException):
    codes = {404: "not_found", 405: "method_not_allowed"}
    return _answer(request, ApiError(exc.status_code, codes.get(exc.status_code, "http_error"), str(exc.detail)))


@api.exception_handler(Exception)
async def _internal_error(request: Request, exc: Exception):
    log.error("unhandled error", exc_info=exc)
    return _answer(request, ApiError(500, "internal", "internal server error (see the server log)"))


api.add_middleware(RequestMetrics)
api.add_middleware(HeaderLimit)  # limit: Limits.max_header_bytes, set by the ingress
