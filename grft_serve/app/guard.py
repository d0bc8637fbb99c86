"""Who may call, and how much they may send — decided from the headers, before a body is read.

* **Auth**: ``Authorization: Bearer <token>``. Task administration needs the admin token; reads and
  predictions need the read token when one is configured (the admin token also reads). Tokens live
  in environment variables named by the config, compared in constant time.
* **Bodies**: a declared ``Content-Length`` over the route's cap is refused with 413 at once; a
  chunked body is counted while it streams and cut at the cap; a body that does not arrive in
  ``body_idle_timeout_s`` (slow drip, or a length that is never sent) is answered 408. Nothing is
  parsed until the whole body is in; a JSON body over its value budget is refused before it is parsed
  (:mod:`.bodies`), and large JSON is parsed off the event loop. Multipart bodies (package uploads,
  image files) go through starlette's form parser with the files, fields and part sizes bounded.
"""
from __future__ import annotations

import asyncio
import hmac
import json
import os
import time
from typing import Any

from fastapi import Request

from .bodies import check_json_budget, header_int
from .config import AppConfig
from .schemas import ApiError

__all__ = ["MULTIPART_SLACK", "Guard"]

MULTIPART_SLACK = 1 << 20  # multipart framing allowed beyond the payload caps


class Guard:
    def __init__(self, cfg: AppConfig):
        self.cfg = cfg
        self.limits = cfg.limits

    # -- auth -------------------------------------------------------------------------------------
    @staticmethod
    def _bearer(request: Request) -> str | None:
        got = request.headers.get("authorization", "")
        scheme, _, tok = got.partition(" ")
        return tok.strip() if scheme.lower() == "bearer" and tok.strip() else None

    def _check(self, request: Request, env: str, what: str, also: str | None = None) -> None:
        want = os.environ.get(env, "")
        if not want:
            raise ApiError(403, "admin_disabled", f"{what} is disabled: no token configured (set ${env} "
                                                  "in the serving processes' environment)")
        if not request.headers.get("authorization"):
            raise ApiError(401, "unauthorized", f"{what} needs 'Authorization: Bearer <token>'")
        tok = self._bearer(request)
        if tok is None:
            raise ApiError(401, "unauthorized", f"{what} needs 'Authorization: Bearer <token>' (Bearer scheme)")
        ok = hmac.compare_digest(tok.encode(), want.encode())
        if not ok and also:
            ok = hmac.compare_digest(tok.encode(), also.encode())
        if not ok:
            raise ApiError(403, "forbidden", f"invalid token for {what}")

    def admin(self, request: Request) -> None:
        self._check(request, self.cfg.admin_token_env, "task administration")

    def reads_open(self) -> bool:
        env = self.cfg.read_token_env
        return not env or not os.environ.get(env)

    def reader(self, request: Request) -> None:
        if self.reads_open():
            return
        self._check(request, self.cfg.read_token_env, "reading",  # type: ignore[arg-type]
                    also=os.environ.get(self.cfg.admin_token_env, "") or None)

    # -- bodies -----------------------------------------------------------------------------------
    async def body(self, request: Request, cap: int, what: str = "request body") -> bytes:
        """The whole body, at most ``cap`` bytes, within the idle timeout (413 / 408 / 400 otherwise)."""
        clen = header_int(request.headers.get("content-length"), "Content-Length")
        if clen is not None and clen > cap:
            raise ApiError(413, "too_large", f"{what} is {clen} bytes; the limit is {cap}")
        chunks, n = [], 0
        stream = request.stream().__aiter__()
        deadline = time.monotonic() + 6 * self.limits.body_idle_timeout_s
        while True:
            wait = min(self.limits.body_idle_timeout_s, deadline - time.monotonic())
            try:
                chunk = await asyncio.wait_for(stream.__anext__(), timeout=max(wait, 0.001))
            except StopAsyncIteration:
                break
            except asyncio.TimeoutError:
                raise ApiError(408, "body_timeout", f"the {what} did not arrive in time") from None
            n += len(chunk)
            if n > cap:
                raise ApiError(413, "too_large", f"{what} is larger than the limit of {cap} bytes")
            chunks.append(chunk)
        data = b"".join(chunks)
        request._body = data  # starlette re-reads it for form parsing  # noqa: SLF001
        return data

    async def json(self, request: Request, cap: int) -> Any:
        ctype = request.headers.get("content-type", "application/json").split(";")[0].strip().lower()
        if ctype not in ("application/json", "") and not ctype.endswith("+json"):
            raise ApiError(415, "unsupported_media_type",
                           f"Content-Type {ctype!r} is not accepted here; send application/json")
        data = await self.body(request, cap)
        return await asyncio.to_thread(self.parse_json, data) if len(data) > 65536 else self.parse_json(data)

    def parse_json(self, data: bytes, what: str = "request body") -> Any:
        """JSON within the value budget (413 ``too_many_inputs`` before parsing), else 400 ``bad_json``."""
        check_json_budget(data, self.limits.max_json_values, self.limits.max_inputs_per_request)
        try:
            return json.loads(data)
        except (UnicodeDecodeError, json.JSONDecodeError, RecursionError):
            raise ApiError(400, "bad_json", f"{what} is not valid JSON") from None

    # -- multipart ---------------------------------------------------------------------------------
    async def package_upload(self, request: Request) -> tuple[bytes, bool]:
        """A package upload (multipart field ``file``, optional ``replace``) → (bytes, replace)."""
        ctype = request.headers.get("content-type", "")
        if not ctype.startswith("multipart/form-data"):
            raise ApiError(415, "unsupported_media_type", "upload the package as multipart/form-data (field 'file')")
        await self.body(request, self.limits.max_package_bytes + MULTIPART_SLACK, "package upload")
        try:
            form = await request.form(max_files=1, max_fields=4, max_part_size=self.limits.max_package_bytes)
        except Exception as e:  # noqa: BLE001 - starlette raises on malformed / too many parts
            raise ApiError(400, "bad_multipart", f"cannot read the multipart body: {getattr(e, 'detail', e)}") from None
        try:
            f = form.get("file")
            if f is None or isinstance(f, str):
                raise ApiError(422, "invalid_request", "multipart field 'file' (the package) is missing")
            data = await f.read(self.limits.max_package_bytes + 1)
            flag = str(form.get("replace", "false")).strip().lower()
            if flag not in ("true", "false", "1", "0", "yes", "no", ""):
                raise ApiError(422, "invalid_request", f"replace must be true or false, got {flag!r}")
            return data, flag in ("true", "1", "yes")
        finally:
            await form.close()

    async def multipart_inputs(self, request: Request, kind: str) -> tuple[list, Any]:
        """A multipart predict body → (inputs: image bytes or texts, top_k as sent)."""
        cap = self.limits.max_inputs_per_request * self.limits.max_image_bytes + MULTIPART_SLACK
        await self.body(request, min(cap, self.limits.max_request_bytes))
        try:
            form = await request.form(max_files=self.limits.max_inputs_per_request + 1,
                                      max_fields=self.limits.max_inputs_per_request + 8)
        except Exception as e:  # noqa: BLE001 - starlette raises on malformed / too many parts
            msg = str(getattr(e, "detail", e))
            code = 413 if "maximum" in msg.lower() or "too many" in msg.lower() else 400
            raise ApiError(code, "too_many_inputs" if code == 413 else "bad_multipart",
                           f"cannot read the multipart body: {msg}") from None
        top_k: Any = 5
        inputs = []
        try:
            for key, v in form.multi_items():
                if key == "top_k" and isinstance(v, str):
                    top_k = v
                    continue
                if isinstance(v, str):
                    if kind == "text" and key in ("inputs", "input", "text", "texts"):
                        inputs.append(v)
                    continue
                data = await v.read(self.limits.max_image_bytes + 1)
                if kind == "image":
                    inputs.append(data)
                else:
                    try:
                        inputs.append(data.decode("utf-8"))
                    except UnicodeDecodeError:
                        raise ApiError(422, "invalid_input", f"input {len(inputs)}: file is not UTF-8 text") \
                            from None
        finally:
            await form.close()
        return inputs, top_k
