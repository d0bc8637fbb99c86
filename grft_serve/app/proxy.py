"""A cap on request-line + header bytes, in Ray Serve's HTTP proxy and again in the ingress.

Serve's proxy runs uvicorn with its default ``http="auto"`` protocol (httptools, whose parser puts no
bound on header size); uvicorn's own h11 bound (``h11_max_incomplete_event_size``) is unreachable,
since Serve builds the ``uvicorn.Config`` itself and ``http_options`` has no field for it. What Serve
does offer is a hook that every proxy calls at start: ``RAY_SERVE_HTTP_PROXY_CALLBACK_IMPORT_PATH``
names a function returning Starlette middlewares to wrap the proxy's ASGI app. Set it, in the
environment of every Ray node before ``ray start`` (``grft-serve up`` sets it for the Ray it starts)::

    RAY_SERVE_HTTP_PROXY_CALLBACK_IMPORT_PATH=grft_serve.app.proxy:middlewares
    GRFT_MAX_HEADER_BYTES=65536            # optional; the default

and the proxy answers **431** ``headers_too_large`` to a request whose path, query and headers
exceed the cap, before it is routed to any replica. The ingress wraps its app in the same
:class:`HeaderLimit` with ``limits.max_header_bytes``, for proxies started without the hook. Errors
use the project's shape (``{"error": {"code", "message"}}``; under ``/v2`` the OIP one).
"""
from __future__ import annotations

import json
import os

__all__ = ["CALLBACK", "ENV_MAX_HEADER_BYTES", "DEFAULT_MAX_HEADER_BYTES", "HeaderLimit", "middlewares"]

CALLBACK = "grft_serve.app.proxy:middlewares"
ENV_MAX_HEADER_BYTES = "GRFT_MAX_HEADER_BYTES"
DEFAULT_MAX_HEADER_BYTES = 64 << 10


def header_bytes(scope: dict) -> int:
    """Bytes of the request line and headers as received (names, values, separators)."""
    n = len(scope.get("raw_path") or scope.get("path", "").encode()) + len(scope.get("query_string", b""))
    return n + sum(len(k) + len(v) + 4 for k, v in scope.get("headers", ()))


class HeaderLimit:
    """ASGI middleware: 431 for an HTTP request whose request line + headers exceed ``limit`` bytes.
    ``limit=None`` reads :attr:`default_limit` at each request (the ingress sets it from its config)."""

    default_limit = DEFAULT_MAX_HEADER_BYTES

    def __init__(self, app, limit: int | None = None):
        self.app, self.limit = app, limit

    async def __call__(self, scope, receive, send):
        limit = self.limit or self.default_limit
        if scope["type"] != "http" or header_bytes(scope) <= limit:
            return await self.app(scope, receive, send)
        msg = f"the request line and headers exceed {limit} bytes"
        err: object = msg if scope.get("path", "").startswith("/v2") else {"code": "headers_too_large",
                                                                           "message": msg}
        body = json.dumps({"error": err}).encode()
        await send({"type": "http.response.start", "status": 431,
                    "headers": [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode()),
                                (b"connection", b"close")]})
        await send({"type": "http.response.body", "body": body})


def middlewares() -> list:
    """The proxy callback (see the module docstring): ``[Middleware(HeaderLimit)]``."""
    from starlette.middleware import Middleware

    raw = os.environ.get(ENV_MAX_HEADER_BYTES, "")
    limit = int(raw) if raw.isascii() and raw.isdigit() and int(raw) > 0 else DEFAULT_MAX_HEADER_BYTES
    return [Middleware(HeaderLimit, limit=limit)]
