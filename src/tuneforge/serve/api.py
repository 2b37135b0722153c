"""An OpenAI-compatible HTTP API over the chat engine: /v1/models and /v1/chat/completions (with SSE streaming);
reward models (stage rm) answer LLaMA-Factory's POST /v1/score/evaluation instead."""

# No `from __future__ import annotations`: FastAPI must see the real request-model classes (request_models).

import asyncio
import hmac
import json
import logging
import time
import uuid
from dataclasses import replace
from typing import Any, Literal

from tuneforge.chat.engine import BASE, ChatEngine, Completion
from tuneforge.config.schema import GenerationConfig
from tuneforge.data.types import Message
from tuneforge.errors import TuneforgeError
from tuneforge.serve.messages import as_openai, openai_tool_calls, score_sequences, to_messages
from tuneforge.templates.tools import read_hermes_or_json

log = logging.getLogger(__name__)

MAX_SCORE_ITEMS = 128  # texts per score request; each batch of SCORE_BATCH holds the engine's lock only briefly
DEFAULT_TIME_LIMIT = 300.0  # seconds one answer may take before it is cut (finish reason 'length')


def create_app(engine: ChatEngine, base_name: str, api_key: str | None = None,
               defaults: GenerationConfig | None = None, reward: bool = False,
               time_limit: float | None = DEFAULT_TIME_LIMIT) -> Any:
    """The FastAPI app. Models: `base_name` (no adapter) and one per loaded adapter, by adapter name. Weights with
    a value head are reward models: they score (POST /v1/score/evaluation) and do not chat; with `reward`
    (stage rm) no model chats. Each answer is cut after `time_limit` seconds (finish reason 'length'); at
    shutdown every generation ends at once."""
    from contextlib import asynccontextmanager

    from fastapi import FastAPI

    @asynccontextmanager
    async def lifespan(app: Any) -> Any:
        yield
        engine.shutdown()

    models = {base_name: BASE, **{name: name for name in engine.adapters}}
    chat_request, score_request = request_models()
    app = FastAPI(title="tuneforge API", version="1", lifespan=lifespan)
    app.state.time_limit = time_limit
    add_guards(app, api_key)

    @app.get("/v1/models")
    async def list_models() -> dict[str, Any]:
        return {"object": "list", "data": [{"id": name, "object": "model", "created": 0, "owned_by": "tuneforge"}
                                           for name in models]}

    add_chat_route(app, engine, models, defaults or GenerationConfig(), reward, chat_request)
    add_score_route(app, engine, models, score_request)
    return app


def request_models() -> tuple[Any, Any]:
    """The pydantic request bodies: chat completions, and score evaluation (LLaMA-Factory's, plus chat arrays)."""
    from pydantic import BaseModel, ConfigDict, Field

    class ChatMessage(BaseModel):
        model_config = ConfigDict(strict=True)  # "stream": "yes" or "n": "2" are errors, as OpenAI's API has them

        role: Literal["system", "user", "assistant", "tool", "function"]
        content: str | list[dict[str, Any]] | None = None
        tool_calls: list[dict[str, Any]] | None = None
        name: str | None = None

    class ChatRequest(BaseModel):
        model_config = ConfigDict(strict=True)
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

    class ScoreRequest(BaseModel):
        model: str
        messages: list[str | list[ChatMessage]]  # raw texts (as LLaMA-Factory) or conversations ending in an answer
        max_length: int | None = Field(None, ge=1)

    return ChatRequest, ScoreRequest


def error(status: int, message: str, kind: str = "invalid_request_error", param: str | None = None,
          code: str | None = None) -> Any:
    """An OpenAI-style error response."""
    from fastapi.responses import JSONResponse

    return JSONResponse(status_code=status, content={
        "error": {"message": message, "type": kind, "param": param, "code": code}})


def no_such_model(requested: str, models: dict[str, Any]) -> Any:
    """404 naming the served models."""
    return error(404, f"model '{requested}' does not exist; available: {', '.join(models)}", param="model",
                 code="model_not_found")


def add_guards(app: Any, api_key: str | None) -> None:
    """Errors as OpenAI-style JSON (bad requests are 400), and the bearer key on every /v1 route when set."""
    from fastapi import Request
    from fastapi.exceptions import RequestValidationError
    from starlette.exceptions import HTTPException as StarletteHTTPException

    @app.exception_handler(RequestValidationError)
    async def invalid(request: Request, exc: RequestValidationError) -> Any:
        first = exc.errors()[0] if exc.errors() else {}
        where = ".".join(str(p) for p in first.get("loc", []) if p != "body")
        return error(400, f"{where}: {first.get('msg', 'invalid request')}" if where else "invalid JSON body",
                     param=where or None)

    @app.exception_handler(StarletteHTTPException)
    async def http_error(request: Request, exc: StarletteHTTPException) -> Any:
        return error(exc.status_code, str(exc.detail), kind="invalid_request_error")

    @app.exception_handler(Exception)
    async def unexpected(request: Request, exc: Exception) -> Any:
        log.error("request %s %s failed", request.method, request.url.path, exc_info=exc)
        return error(500, "internal server error (the server log has the details)", kind="server_error")

    @app.middleware("http")
    async def authenticate(request: Request, call_next: Any) -> Any:
        if api_key and request.url.path.startswith("/v1"):
            sent = request.headers.get("authorization", "").encode()
            if not hmac.compare_digest(sent, f"Bearer {api_key}".encode()):
                return error(401, "missing or wrong API key: send 'Authorization: Bearer <key>'",
                             kind="authentication_error", code="invalid_api_key")
        return await call_next(request)


def add_chat_route(app: Any, engine: ChatEngine, models: dict[str, Any], defaults: GenerationConfig,
                   reward: bool, chat_request: Any) -> None:
    """POST /v1/chat/completions, streaming or not, n choices; reward models are refused (405, as LLaMA-Factory)."""
    from sse_starlette.sse import EventSourceResponse

    @app.post("/v1/chat/completions")
    async def chat(body: chat_request) -> Any:
        if body.model not in models:
            return no_such_model(body.model, models)
        if reward or engine.is_reward_model(models[body.model]):
            what = f"'{body.model}' is a reward model" if engine.is_reward_model(models[body.model]) else \
                "this server runs stage rm"
            return error(405, f"Not allowed: {what}; reward models score texts at POST /v1/score/evaluation and "
                         "do not chat", code="not_allowed")
        try:
            messages, system = to_messages(body.messages)
        except TuneforgeError as err:
            return error(400, str(err), param="messages")
        stop = [body.stop] if isinstance(body.stop, str) else list(body.stop or [])
        tools = json.dumps(body.tools, ensure_ascii=False) if body.tools else None
        asked = body.max_completion_tokens or body.max_tokens
        try:
            prompt = len(engine.prompt_ids(messages, system if system is not None else defaults.system, tools))
        except TuneforgeError as err:
            return error(400, str(err), param="messages")
        context = engine.max_positions()
        if prompt + (asked or 1) > context:
            return error(400, f"This model's maximum context length is {context} tokens. However, you requested "
                         f"{prompt + (asked or 1)} tokens ({prompt} in the messages, {asked or 1} in the "
                         "completion). Please reduce the length of the messages or completion.",
                         param="messages", code="context_length_exceeded")
        gen = replace(defaults, max_new_tokens=asked or min(defaults.max_new_tokens, context - prompt),
                      temperature=defaults.temperature if body.temperature is None else body.temperature,
                      top_p=body.top_p or defaults.top_p, seed=body.seed, do_sample=None,
                      system=system if system is not None else defaults.system)
        adapter = models[body.model]
        limit = app.state.time_limit
        created, cid = int(time.time()), f"chatcmpl-{uuid.uuid4().hex[:24]}"
        if body.stream:
            return EventSourceResponse(stream_chunks(engine, messages, gen, adapter, tools, stop, body.model, cid,
                                                     created, body.n, limit), sep="\n")
        choices, usage = [], {"prompt_tokens": 0, "completion_tokens": 0}
        for index in range(body.n):
            seeded = replace(gen, seed=None if gen.seed is None else gen.seed + index)
            try:
                done = await engine.acomplete(messages, seeded, adapter, tools, stop, limit)
            except TuneforgeError as err:
                return error(400, str(err))
            choices.append(choice(index, done, tools, engine.template))
            usage["prompt_tokens"] = done.prompt_tokens
            usage["completion_tokens"] += done.completion_tokens
        usage["total_tokens"] = usage["prompt_tokens"] + usage["completion_tokens"]
        return {"id": cid, "object": "chat.completion", "created": created, "model": body.model,
                "choices": choices, "usage": usage}


def add_score_route(app: Any, engine: ChatEngine, models: dict[str, Any], score_request: Any) -> None:
    """POST /v1/score/evaluation: value-head scores of texts (LLaMA-Factory's request and response) or of
    conversations rendered with the trained template (the response then names it); generative models get 405."""

    @app.post("/v1/score/evaluation")
    async def score(body: score_request) -> Any:
        name = scoring_model(engine, models, body.model)
        if name is None:
            return no_such_model(body.model, models)
        if not engine.is_reward_model(models[name]):
            return error(405, f"Not allowed: '{name}' is not a reward model (no value head); scores come from "
                         "models trained with stage rm", code="not_allowed")
        if not body.messages or len(body.messages) > MAX_SCORE_ITEMS:
            return error(400, f"messages: give 1 to {MAX_SCORE_ITEMS} texts (or chat message arrays) to score, "
                         f"got {len(body.messages)}", param="messages")
        try:
            sequences, chats = score_sequences(engine, body.messages, body.max_length)
        except TuneforgeError as err:
            return error(400, str(err), param="messages")
        scores = await asyncio.to_thread(engine.score, sequences, models[name])
        answer = {"id": f"scoreval-{uuid.uuid4().hex}", "object": "score.evaluation", "model": name,
                  "scores": scores}
        return {**answer, "template": engine.template.name} if chats else answer


def scoring_model(engine: ChatEngine, models: dict[str, Any], requested: str) -> str | None:
    """The served model a score request names; an unknown name means the one reward model when there is exactly
    one (LLaMA-Factory ignores the name; its PPO sends "model")."""
    if requested in models:
        return requested
    rewards = [name for name, adapter in models.items() if engine.is_reward_model(adapter)]
    return rewards[0] if len(rewards) == 1 else None


def choice(index: int, done: Completion, tools: str | None, template: Any = None) -> dict[str, Any]:
    """One choice of a non-streaming response; tool calls are read in the template's tool format when tools
    were offered."""
    calls = (openai_tool_calls(template, done.text) if template is not None else parse_tool_calls(done.text)) \
        if tools else []
    if calls:
        return {"index": index, "finish_reason": "tool_calls",
                "message": {"role": "assistant", "content": None, "tool_calls": calls}}
    return {"index": index, "finish_reason": done.finish_reason,
            "message": {"role": "assistant", "content": done.text}}


def parse_tool_calls(text: str) -> list[dict[str, Any]]:
    """Tool calls in `<tool_call>{json}</tool_call>` blocks, or an answer that is one {"name", "arguments"} object
    (for templates that name no tool format)."""
    return as_openai(read_hermes_or_json(text) or [])


async def stream_chunks(engine: ChatEngine, messages: list[Message], gen: GenerationConfig, adapter: Any,
                        tools: str | None, stop: list[str], model: str, cid: str, created: int, n: int,
                        time_limit: float | None = None) -> Any:
    """SSE events: a role chunk, content chunks, a finish chunk per choice, then [DONE].

    With tools offered an answer is held until it ends (a call's text must not reach the client as content): it
    then arrives as one tool_calls delta (finish_reason "tool_calls"), or as one content delta when it is no call.
    """
    def chunk(index: int, delta: dict[str, Any], finish: str | None = None) -> str:
        return json.dumps({"id": cid, "object": "chat.completion.chunk", "created": created, "model": model,
                           "choices": [{"index": index, "delta": delta, "finish_reason": finish}]},
                          ensure_ascii=False)

    for index in range(n):
        seeded = replace(gen, seed=None if gen.seed is None else gen.seed + index)
        result = Completion()
        yield {"data": chunk(index, {"role": "assistant", "content": ""})}
        held: list[str] = []
        async for piece in engine.astream(messages, seeded, adapter, tools, stop, result, time_limit):
            if tools:
                held.append(piece)
            else:
                yield {"data": chunk(index, {"content": piece})}
        calls = openai_tool_calls(engine.template, "".join(held)) if tools else []
        if calls:
            yield {"data": chunk(index, {"tool_calls": [{"index": i, **call} for i, call in enumerate(calls)]},
                                 "tool_calls")}
            continue
        if held:
            yield {"data": chunk(index, {"content": "".join(held)})}
        yield {"data": chunk(index, {}, result.finish_reason)}
    yield {"data": "[DONE]"}
