"""OpenAI-compatible generation routes: ``/v1/models``, ``/v1/completions``, ``/v1/chat/completions``.

::

    GET  /v1/models             the generation bases (id = backbone name) and every generation task
                                (``parent`` = its base)
    POST /v1/completions        prompt(s) → text, or an SSE stream of chunks ending in ``data: [DONE]``
    POST /v1/chat/completions   messages → assistant message, or an SSE stream of ``chat.completion.chunk``

``model`` is resolved like every task route: the task index gives the stored version and base
fingerprint, and the request goes to the generation backbone with that fingerprint (a classification
task is refused with 400 ``unsupported_model``; an unknown id is 404 ``model_not_found``). A
backbone's own name (or ``name:task``, OpenAI/vLLM-style) selects it without / with a task. Same
auth and body limits as ``/v1``.

One call per request: the whole request (all prompts × ``n``) goes to one generation replica as a
:class:`~grft_serve.app.messages.GenerateCall`, which streams back one :class:`GenerateStarted`
(prompt token counts, or the error that stops it before any token) and then batches of
:class:`GenerateEvents` (text deltas per choice; several tokens per item when they come faster than
the hop). A client that disconnects cancels the stream: the replica cancels its sequences and their KV
blocks are freed.
"""
from __future__ import annotations

import asyncio
import json
import logging
import time
from typing import Any, AsyncIterator

from fastapi import Request
from fastapi.responses import JSONResponse, StreamingResponse
from pydantic import ValidationError

from .api import OPENAI_PATHS, api
from .messages import GenerateCall, GenerateEvents, GenerateStarted
from .openai_schemas import (ChatRequest, CompletionRequest, chat_chunk, chat_response, completion_chunk,
                             completion_response, model_card, new_id, usage)
from .schemas import ApiError

__all__ = ["OPENAI_PATHS", "OpenAIRoutes"]

log = logging.getLogger("grft_serve.app")

_TAGS = ["openai-compatible generation"]


def _invalid(e: ValidationError) -> ApiError:
    first = e.errors()[0] if e.errors() else {}
    loc = ".".join(str(x) for x in first.get("loc", ()))
    msg = str(first.get("msg", "invalid request")).removeprefix("Value error, ")
    return ApiError(400, "invalid_request", f"{loc}: {msg}" if loc else msg, param=loc or None)


def _sse(obj: Any) -> bytes:
    return b"data: " + json.dumps(obj, separators=(",", ":")).encode() + b"\n\n"


class OpenAIRoutes:
    """Route handlers mixed into the ingress; they use its ``guard``, ``index``, ``limits``,
    ``handles`` and ``backbones()``."""

    # -- model resolution ---------------------------------------------------------------------------
    async def _generation_backbones(self) -> dict[str, dict]:
        return {n: i for n, i in (await self.backbones()).items() if i.get("task_kind") == "generation"}

    async def _resolve_model(self, model: str) -> tuple[str, str | None, str | None]:
        """(backbone, task id or None, version or None) of an OpenAI ``model`` string."""
        gen = await self._generation_backbones()
        if model in gen:
            return model, None, None
        base, sep, task = model.partition(":")
        if sep and base in gen:
            model = task
        entry = await asyncio.to_thread(self.index.get, model)
        if entry is None:
            raise ApiError(404, "model_not_found", f"the model {model!r} does not exist", param="model")
        if entry.broken:
            raise ApiError(422, "broken_task", f"stored task {model!r} cannot be read: {entry.broken}", param="model")
        kind = entry.meta.get("kind", "classification")
        if kind != "generation":
            raise ApiError(400, "unsupported_model", f"task {model!r} is a {kind} task: it does not generate text "
                                                     "(use /v1/tasks/{id}/predict)", param="model")
        bb = next((n for n, i in gen.items() if i["fingerprint"] == entry.fingerprint), None)
        if bb is None or (sep and bb != base):
            raise ApiError(404, "model_not_found", f"no generation backbone of this app serves the base of {model!r}",
                           param="model")
        return bb, model, entry.version

    # -- routes ---------------------------------------------------------------------------------------
    @api.get("/v1/models", summary="Generation models: bases and tasks (OpenAI list)", tags=_TAGS)
    async def openai_models(self, request: Request):
        self.guard.reader(request)
        gen = await self._generation_backbones()
        data = [model_card(n, None, i["model_id"], None, task_kind="generation") for n, i in sorted(gen.items())]
        by_fp = {i["fingerprint"]: n for n, i in gen.items()}
        entries = await asyncio.to_thread(self.index.snapshot)
        for tid, e in sorted(entries.items()):
            if e.broken is None and e.meta.get("kind") == "generation" and e.fingerprint in by_fp:
                data.append(model_card(tid, e.meta.get("created"), gen[by_fp[e.fingerprint]]["model_id"],
                                       by_fp[e.fingerprint], version=e.version))
        return JSONResponse({"object": "list", "data": data})

    @api.post("/v1/completions", summary="Text completion (OpenAI-compatible)", tags=_TAGS)
    async def openai_completions(self, request: Request):
        self.guard.reader(request)
        req = await self._openai_body(request, CompletionRequest)
        bb, task, version = await self._resolve_model(req.model)
        call = GenerateCall(task=task, version=version, prompts=req.prompts, messages=None, **self._sampling(req))
        return await self._generate(bb, call, req, chat=False)

    @api.post("/v1/chat/completions", summary="Chat completion (OpenAI-compatible)", tags=_TAGS)
    async def openai_chat(self, request: Request):
        self.guard.reader(request)
        req = await self._openai_body(request, ChatRequest)
        bb, task, version = await self._resolve_model(req.model)
        call = GenerateCall(task=task, version=version, prompts=None, messages=req.plain_messages(),
                            **{**self._sampling(req), "max_tokens": req.token_budget})
        return await self._generate(bb, call, req, chat=True)

    # -- helpers ----------------------------------------------------------------------------------------
    async def _openai_body(self, request: Request, model):
        body = await self.guard.json(request, self.limits.max_request_bytes)
        try:
            req = model.model_validate(body)
        except ValidationError as e:
            raise _invalid(e) from None
        gl = self.limits
        if req.n > gl.max_choices:
            raise ApiError(400, "invalid_request", f"n is {req.n}; this server returns at most {gl.max_choices} "
                                                   "choices per prompt", param="n")
        texts = req.prompts if isinstance(req, CompletionRequest) else [m.text() for m in req.messages]
        if len(texts) * req.n > gl.max_choices:
            raise ApiError(400, "invalid_request", f"{len(texts)} prompts x n={req.n} choices; at most "
                                                   f"{gl.max_choices} per request", param="prompt")
        if sum(len(t) for t in texts) > gl.max_prompt_chars:
            raise ApiError(400, "invalid_request", f"the prompt is longer than {gl.max_prompt_chars} characters",
                           param="messages" if isinstance(req, ChatRequest) else "prompt")
        for t in texts:
            if "\x00" in t or any(0xD800 <= ord(c) <= 0xDFFF for c in t):
                raise ApiError(400, "invalid_request", "the prompt contains NUL or a lone surrogate",
                               param="messages" if isinstance(req, ChatRequest) else "prompt")
        return req

    @staticmethod
    def _sampling(req) -> dict:
        return {"n": req.n, "max_tokens": req.max_tokens, "temperature": req.temperature, "top_p": req.top_p,
                "stop": list(req.stop), "seed": req.seed}

    async def _generate(self, bb: str, call: GenerateCall, req, chat: bool):
        gen = self.handles[bb].options(stream=True).generate.remote(call)
        try:
            first: GenerateStarted = await gen.__anext__()
        except BaseException:
            gen.cancel()
            raise
        if first.error is not None:
            gen.cancel()
            raise ApiError(first.error["status"], first.error["code"], first.error["message"],
                           param=first.error.get("param"))
        rid, created = new_id("chatcmpl" if chat else "cmpl"), int(time.time())
        if req.stream:
            return StreamingResponse(self._sse(gen, first, rid, created, req, chat), media_type="text/event-stream",
                                     headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"})
        texts: dict[int, list[str]] = {}
        finish: dict[int, str | None] = {}
        done_tokens = 0
        try:
            async for ev in gen:
                for e in ev.items:
                    texts.setdefault(e.index, []).append(e.text)
                    if e.finish_reason is not None:
                        if e.finish_reason == "error":
                            raise ApiError(500, "generation_failed", "the backbone failed while generating")
                        finish[e.index] = e.finish_reason
                        done_tokens += e.completion_tokens
        finally:
            gen.cancel()
        choices = [{"index": i, "text": "".join(texts.get(i, [])), "finish_reason": finish.get(i)}
                   for i in range(first.choices)]
        use = usage(sum(first.prompt_tokens), done_tokens)
        build = chat_response if chat else completion_response
        return JSONResponse(build(rid, req.model, created, choices, use))

    async def _sse(self, gen, first: GenerateStarted, rid: str, created: int, req, chat: bool) -> AsyncIterator[bytes]:
        model = req.model
        done_tokens = 0
        try:
            if chat:
                for i in range(first.choices):
                    yield _sse(chat_chunk(rid, model, created, i, {"role": "assistant", "content": ""}))
            async for ev in gen:
                ev: GenerateEvents
                for e in ev.items:
                    if e.finish_reason == "error":
                        yield _sse({"error": {"message": "the backbone failed while generating", "type": "server_error",
                                              "param": None, "code": "generation_failed"}})
                        return
                    if e.finish_reason is not None:
                        done_tokens += e.completion_tokens
                    if chat:
                        if e.text:
                            yield _sse(chat_chunk(rid, model, created, e.index, {"content": e.text}))
                        if e.finish_reason is not None:
                            yield _sse(chat_chunk(rid, model, created, e.index, {}, e.finish_reason))
                    elif e.text or e.finish_reason is not None:
                        yield _sse(completion_chunk(rid, model, created, e.index, e.text, e.finish_reason))
            if req.include_usage:
                use = usage(sum(first.prompt_tokens), done_tokens)
                yield _sse(chat_chunk(rid, model, created, use=use) if chat else
                           completion_chunk(rid, model, created, use=use))
            yield b"data: [DONE]\n\n"
        finally:
            gen.cancel()  # a client that left cancels its sequences on the replica
