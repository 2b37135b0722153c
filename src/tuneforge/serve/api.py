"""An OpenAI-compatible HTTP API over the chat engine: /v1/models and /v1/chat/completions (with SSE streaming)."""

# No `from __future__ import annotations`: FastAPI must see the real request-model classes defined in create_app.

import asyncio
import json
import re
import time
import uuid
from dataclasses import replace
from typing import Any, Literal

from tuneforge.chat.engine import BASE, ChatEngine, Completion
from tuneforge.config.schema import GenerationConfig
from tuneforge.data.types import Message
from tuneforge.errors import TuneforgeError


def create_app(engine: ChatEngine, base_name: str, api_key: str | None = None,
               defaults: GenerationConfig | None = None) -> Any:
    """The FastAPI app. Models: `base_name` (no adapter) and one per loaded adapter, by adapter name."""
    from fastapi import FastAPI, Request
    from fastapi.exceptions import RequestValidationError
    from fastapi.responses import JSONResponse
    from pydantic import BaseModel, Field
    from sse_starlette.sse import EventSourceResponse
    from starlette.exceptions import HTTPException as StarletteHTTPException

    defaults = defaults or GenerationConfig()
    models = {base_name: BASE, **{name: name for name in engine.adapters}}

    class ChatMessage(BaseModel):
        role: Literal["system", "user", "assistant", "tool", "function"]
        content: str | list[dict[str, Any]] | None = None
        tool_calls: list[dict[str, Any]] | None = None
        name: str | None = None

    class ChatRequest(BaseModel):
        model: str
        messages: list[ChatMessage] = Field(min_length=1)
        stream: bool = False
        n: int = Field(1, ge=1, le=8)
        stop: str | list[str] | None = None
        max_tokens: int | None = Field(None, ge=1)
        max_completion_tokens: int | None = Field(None, ge=1)
        temperature: float | None = Field(None, ge=0, le=2)
        top_p: float | None = Field(None, gt=0, le=1)
        seed: int | None = None
        tools: list[dict[str, Any]] | None = None
        tool_choice: Any = None
        presence_penalty: float | None = None
        frequency_penalty: float | None = None
        user: str | None = None

    app = FastAPI(title="tuneforge API", version="1")

    def error(status: int, message: str, kind: str = "invalid_request_error", param: str | None = None,
              code: str | None = None) -> JSONResponse:
        return JSONResponse(status_code=status, content={
            "error": {"message": message, "type": kind, "param": param, "code": code}})

    @app.exception_handler(RequestValidationError)
    async def invalid(request: Request, exc: RequestValidationError) -> JSONResponse:
        first = exc.errors()[0] if exc.errors() else {}
        where = ".".join(str(p) for p in first.get("loc", []) if p != "body")
        return error(400, f"{where}: {first.get('msg', 'invalid request')}" if where else "invalid JSON body",
                     param=where or None)

    @app.exception_handler(StarletteHTTPException)
    async def http_error(request: Request, exc: StarletteHTTPException) -> JSONResponse:
        return error(exc.status_code, str(exc.detail), kind="invalid_request_error")

    @app.exception_handler(Exception)
    async def unexpected(request: Request, exc: Exception) -> JSONResponse:
        return error(500, f"internal error: {type(exc).__name__}: {exc}", kind="server_error")

    @app.middleware("http")
    async def authenticate(request: Request, call_next: Any) -> Any:
        if api_key and request.url.path.startswith("/v1"):
            if request.headers.get("authorization", "") != f"Bearer {api_key}":
                return error(401, "missing or wrong API key: send 'Authorization: Bearer <key>'",
                             kind="authentication_error", code="invalid_api_key")
        return await call_next(request)

    @app.get("/v1/models")
    async def list_models() -> dict[str, Any]:
        return {"object": "list", "data": [{"id": name, "object": "model", "created": 0, "owned_by": "tuneforge"}
                                           for name in models]}

    @app.post("/v1/chat/completions")
    async def chat(body: ChatRequest) -> Any:
        if body.model not in models:
            return error(404, f"model '{body.model}' does not exist; available: {', '.join(models)}",
                         param="model", code="model_not_found")
        try:
            messages, system = to_messages(body.messages)
        except TuneforgeError as err:
            return error(400, str(err), param="messages")
        gen = replace(defaults, max_new_tokens=body.max_completion_tokens or body.max_tokens or defaults.max_new_tokens,
                      temperature=defaults.temperature if body.temperature is None else body.temperature,
                      top_p=body.top_p or defaults.top_p, seed=body.seed, do_sample=None,
                      system=system if system is not None else defaults.system)
        stop = [body.stop] if isinstance(body.stop, str) else list(body.stop or [])
        tools = json.dumps(body.tools, ensure_ascii=False) if body.tools else None
        adapter = models[body.model]
        created, cid = int(time.time()), f"chatcmpl-{uuid.uuid4().hex[:24]}"
        if body.stream:
            return EventSourceResponse(stream_chunks(engine, messages, gen, adapter, tools, stop, body.model, cid,
                                                     created, body.n), sep="\n")
        choices, usage = [], {"prompt_tokens": 0, "completion_tokens": 0}
        for index in range(body.n):
            seeded = replace(gen, seed=None if gen.seed is None else gen.seed + index)
            try:
                done = await asyncio.to_thread(engine.complete, messages, seeded, adapter, tools, stop)
            except TuneforgeError as err:
                return error(400, str(err))
            choices.append(choice(index, done, tools))
            usage["prompt_tokens"] = done.prompt_tokens
            usage["completion_tokens"] += done.completion_tokens
        usage["total_tokens"] = usage["prompt_tokens"] + usage["completion_tokens"]
        return {"id": cid, "object": "chat.completion", "created": created, "model": body.model,
                "choices": choices, "usage": usage}

    return app


def to_messages(raw: list[Any]) -> tuple[list[Message], str | None]:
    """OpenAI messages -> canonical turns (system apart); turns must alternate prompt/answer and end with a prompt."""
    system = None
    messages: list[Message] = []
    for i, m in enumerate(raw):
        content = m.content if isinstance(m.content, str) else "".join(
            part.get("text", "") for part in (m.content or []) if part.get("type") == "text")
        if m.role == "system":
            if i != 0:
                raise TuneforgeError(f"messages[{i}]: a system message must come first")
            system = content
        elif m.role == "user":
            messages.append(Message("user", content))
        elif m.role in ("tool", "function"):
            messages.append(Message("observation", content))
        elif m.tool_calls:
            calls = [c.get("function", c) for c in m.tool_calls]
            messages.append(Message("function", json.dumps(calls, ensure_ascii=False)))
        else:
            messages.append(Message("assistant", content))
    if not messages or messages[-1].role not in ("user", "observation"):
        raise TuneforgeError("messages: the last message must be from the user (or a tool result)")
    for i, message in enumerate(messages):
        prompt = message.role in ("user", "observation")
        if prompt != (i % 2 == 0):
            raise TuneforgeError(f"messages: turn {i + 1} is '{message.role}' but turns must alternate "
                                 "user (or tool) and assistant after the optional system message")
    return messages, system


def choice(index: int, done: Completion, tools: str | None) -> dict[str, Any]:
    """One choice of a non-streaming response; tool calls are parsed when tools were offered."""
    calls = parse_tool_calls(done.text) if tools else []
    if calls:
        return {"index": index, "finish_reason": "tool_calls",
                "message": {"role": "assistant", "content": None, "tool_calls": calls}}
    return {"index": index, "finish_reason": done.finish_reason,
            "message": {"role": "assistant", "content": done.text}}


TOOL_CALL = re.compile(r"<tool_call>\s*(\{.*?\})\s*</tool_call>", re.S)


def parse_tool_calls(text: str) -> list[dict[str, Any]]:
    """Tool calls in `<tool_call>{json}</tool_call>` blocks, or an answer that is one {"name", "arguments"} object."""
    blobs = TOOL_CALL.findall(text) or ([text.strip()] if text.strip().startswith("{") else [])
    calls = []
    for blob in blobs:
        try:
            data = json.loads(blob)
        except json.JSONDecodeError:
            continue
        if isinstance(data, dict) and "name" in data:
            arguments = data.get("arguments", {})
            calls.append({"id": f"call_{uuid.uuid4().hex[:16]}", "type": "function",
                          "function": {"name": data["name"], "arguments": arguments if isinstance(arguments, str)
                                       else json.dumps(arguments, ensure_ascii=False)}})
    return calls


async def stream_chunks(engine: ChatEngine, messages: list[Message], gen: GenerationConfig, adapter: Any,
                        tools: str | None, stop: list[str], model: str, cid: str, created: int, n: int) -> Any:
    """SSE events: a role chunk, content chunks, a finish chunk per choice, then [DONE]."""
    def chunk(index: int, delta: dict[str, Any], finish: str | None = None) -> str:
        return json.dumps({"id": cid, "object": "chat.completion.chunk", "created": created, "model": model,
                           "choices": [{"index": index, "delta": delta, "finish_reason": finish}]},
                          ensure_ascii=False)

    for index in range(n):
        seeded = replace(gen, seed=None if gen.seed is None else gen.seed + index)
        result = Completion()
        yield {"data": chunk(index, {"role": "assistant", "content": ""})}
        pieces = engine.stream(messages, seeded, adapter, tools, stop, result)
        while True:
            piece = await asyncio.to_thread(next, pieces, None)
            if piece is None:
                break
            yield {"data": chunk(index, {"content": piece})}
        yield {"data": chunk(index, {}, result.finish_reason)}
    yield {"data": "[DONE]"}
