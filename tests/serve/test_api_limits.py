"""What no request may do to the server: exceed the model's context, hold a generation past the time limit or
after its client left, sneak loose types past validation, or read exception text from a 500."""

from __future__ import annotations

import time

import httpx
import pytest

from tuneforge.chat.batching import BatchSettings
from tuneforge.chat.engine import load_engine
from tuneforge.config.schema import ModelConfig
from tuneforge.serve.api import create_app

from .test_api import serve as serve_app

HI = [{"role": "user", "content": "hi"}]


def serve(engine, **options):
    return serve_app(engine, name="tiny", **options)


@pytest.fixture(scope="module")
def engine(tiny_model_dir):
    return load_engine(ModelConfig(path=str(tiny_model_dir)), "chatml")


@pytest.fixture(scope="module")
def url(engine):
    server, url = serve(engine, time_limit=0.3)
    yield url
    server.should_exit = True


def counting(engine):
    """Forward passes of the model, counted."""
    calls = []
    hook = engine.model.register_forward_pre_hook(lambda module, args: calls.append(1))
    return calls, hook


def test_context_length_is_enforced_with_openai_errors(url, engine):
    context = engine.max_positions()
    long_prompt = [{"role": "user", "content": "word " * (context + 10)}]
    for body in ({"messages": long_prompt}, {"messages": HI, "max_tokens": 1_000_000_000}):
        response = httpx.post(f"{url}/chat/completions", json={"model": "tiny", **body})
        assert response.status_code == 400, response.text
        error = response.json()["error"]
        assert error["code"] == "context_length_exceeded" and f"maximum context length is {context}" in \
            error["message"]


@pytest.mark.parametrize(("field", "value"), [("stream", "yes"), ("n", "2"), ("max_tokens", 2.5),
                                              ("temperature", "0.5"), ("messages", "hi")])
def test_loose_types_are_refused(url, field, value):
    response = httpx.post(f"{url}/chat/completions", json={"model": "tiny", "messages": HI, field: value})
    assert response.status_code == 400 and response.json()["error"]["param"].startswith(field), response.text


def test_an_answer_is_cut_at_the_time_limit(url, engine):
    """With a 0.3 s limit, 900 tokens cannot be generated: the answer ends early, finish reason 'length', and the
    model is free at once for the next request."""
    start = time.time()
    reply = httpx.post(f"{url}/chat/completions", json={"model": "tiny", "messages": HI, "max_tokens": 900},
                       timeout=60).json()
    assert time.time() - start < 10
    assert reply["choices"][0]["finish_reason"] == "length" and 0 < reply["usage"]["completion_tokens"] < 900


def test_a_client_that_leaves_stops_its_generation(url, engine):
    calls, hook = counting(engine)
    try:
        with httpx.stream("POST", f"{url}/chat/completions", timeout=60, json={
                "model": "tiny", "messages": HI, "max_tokens": 900, "stream": True}) as response:
            next(response.iter_lines())
        time.sleep(0.5)
        settled = len(calls)
        time.sleep(0.5)
        assert len(calls) == settled  # no more forward passes once the reader is gone
    finally:
        hook.remove()
    assert engine.lock.acquire(timeout=5)  # and the model is free
    engine.lock.release()


def test_batched_answers_obey_the_limit_and_the_leaving_client(tiny_model_dir):
    engine = load_engine(ModelConfig(path=str(tiny_model_dir)), "chatml")
    engine.start_batching(BatchSettings(max_sequences=4, cache_tokens=4096))
    server, url = serve(engine, time_limit=0.3)
    try:
        reply = httpx.post(f"{url}/chat/completions", json={"model": "tiny", "messages": HI, "max_tokens": 900},
                           timeout=60).json()
        assert reply["choices"][0]["finish_reason"] == "length" and reply["usage"]["completion_tokens"] < 900
        with httpx.stream("POST", f"{url}/chat/completions", timeout=60, json={
                "model": "tiny", "messages": HI, "max_tokens": 900, "stream": True}) as response:
            next(response.iter_lines())
        deadline = time.time() + 5
        while engine.batcher.manager.output_router.result_handlers and time.time() < deadline:
            time.sleep(0.05)
        assert engine.batcher.manager.output_router.result_handlers == {}
    finally:
        server.should_exit = True
        time.sleep(0.5)
        engine.stop_batching()


def test_a_server_error_names_no_internals(engine, monkeypatch):
    from fastapi.testclient import TestClient

    def broken(*args, **kwargs):
        raise RuntimeError("secret path /home/x/key.pem")

    monkeypatch.setattr(engine, "prompt_ids", broken)
    client = TestClient(create_app(engine, "tiny"), raise_server_exceptions=False)
    response = client.post("/v1/chat/completions", json={"model": "tiny", "messages": HI})
    assert response.status_code == 500 and "secret" not in response.text and "RuntimeError" not in response.text
