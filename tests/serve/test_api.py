"""The OpenAI-compatible API, exercised with the real `openai` client over loopback."""

from __future__ import annotations

import concurrent.futures
import json
import threading
import time
from dataclasses import replace

import httpx
import openai  # the api extra: installed by scripts/setup.sh
import pytest
import uvicorn

from tuneforge.chat.batching import BatchSettings
from tuneforge.chat.engine import Completion, load_engine
from tuneforge.cli.api_cmd import adapter_names
from tuneforge.config.schema import GenerationConfig, ModelConfig
from tuneforge.data.types import Message
from tuneforge.serve.api import create_app, parse_tool_calls
from tuneforge.train.distributed import free_port

GEN = GenerationConfig(max_new_tokens=8)


@pytest.fixture(scope="module")
def engine(tiny_model_dir, tiny_run, tiny_run_b):
    named = adapter_names([str(tiny_run)], [f"second={tiny_run_b}"])
    engine = load_engine(ModelConfig(path=str(tiny_model_dir)), "chatml", named=named)
    engine.start_batching(BatchSettings(max_sequences=16, cache_tokens=4096))  # greedy 'second' requests batch
    yield engine
    engine.stop_batching()


def serve(engine, api_key=None, name="tiny-base", **options):
    """The app on a free loopback port, served in a thread (stopped by setting should_exit)."""
    port = free_port()
    app = create_app(engine, name, api_key, GEN, **options)
    server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=port, log_level="error"))
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    deadline = time.time() + 30
    while not server.started and time.time() < deadline:
        time.sleep(0.05)
    return server, f"http://127.0.0.1:{port}/v1"


@pytest.fixture(scope="module")
def open_server(engine):
    server, url = serve(engine)
    yield url
    server.should_exit = True


@pytest.fixture(scope="module")
def locked_server(engine):
    server, url = serve(engine, api_key="s3cret")
    yield url
    server.should_exit = True


def test_models_lists_base_and_each_adapter(open_server):
    client = openai.OpenAI(base_url=open_server, api_key="unused")
    assert sorted(m.id for m in client.models.list().data) == ["second", "tiny-base", "tiny_a"]


def test_completion_matches_the_engine_and_counts_usage(open_server, engine):
    client = openai.OpenAI(base_url=open_server, api_key="unused")
    reply = client.chat.completions.create(model="tiny_a", messages=[{"role": "user", "content": "Who are you?"}],
                                           max_tokens=8, temperature=0)
    expected = engine.complete([Message("user", "Who are you?")], GEN, adapter="tiny_a")
    assert reply.choices[0].message.content == expected.text
    assert reply.usage.prompt_tokens == expected.prompt_tokens
    assert reply.usage.completion_tokens == expected.completion_tokens > 0
    assert reply.choices[0].finish_reason == expected.finish_reason


@pytest.mark.parametrize("model", ["second", "tiny_a"])  # batched, and run one at a time
def test_stop_words_and_top_p_through_the_api(open_server, engine, model):
    client = openai.OpenAI(base_url=open_server, api_key="unused")
    question = [{"role": "user", "content": "Who are you?"}]
    full = engine.generate([Message("user", "Who are you?")], replace(GEN, max_new_tokens=12), adapter=model)
    stop = full[3:5]
    cut = client.chat.completions.create(model=model, messages=question, max_tokens=12, stop=[stop])
    assert cut.choices[0].message.content == full[: full.index(stop)] and cut.choices[0].finish_reason == "stop"
    # top_p so small that only the most likely token survives: sampling then gives the greedy answer
    narrow = client.chat.completions.create(model=model, messages=question, max_tokens=12, temperature=1.0,
                                            top_p=1e-6)
    assert narrow.choices[0].message.content == full


def test_adapters_answer_differently_by_name(open_server):
    client = openai.OpenAI(base_url=open_server, api_key="unused")
    answers = {name: client.chat.completions.create(model=name, messages=[{"role": "user", "content": "hi"}],
                                                    max_tokens=8).choices[0].message.content
               for name in ("tiny-base", "tiny_a", "second")}
    assert len(set(answers.values())) == 3, answers


def test_streaming_gives_the_same_text_and_ends_with_done(open_server):
    client = openai.OpenAI(base_url=open_server, api_key="unused")
    messages = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Who are you?"}]
    whole = client.chat.completions.create(model="tiny_a", messages=messages, max_tokens=8)
    chunks = list(client.chat.completions.create(model="tiny_a", messages=messages, max_tokens=8, stream=True))
    text = "".join(c.choices[0].delta.content or "" for c in chunks)
    assert text == whole.choices[0].message.content
    assert chunks[-1].choices[0].finish_reason in ("stop", "length")
    with httpx.stream("POST", f"{open_server}/chat/completions",
                      json={"model": "tiny_a", "messages": messages, "max_tokens": 4, "stream": True}) as r:
        lines = [line for line in r.iter_lines() if line]
    assert lines[-1] == "data: [DONE]"


def test_n_and_seed_give_several_choices(open_server):
    client = openai.OpenAI(base_url=open_server, api_key="unused")
    reply = client.chat.completions.create(model="tiny_a", messages=[{"role": "user", "content": "hi"}], n=3,
                                           max_tokens=6, temperature=1.0, seed=11)
    assert [c.index for c in reply.choices] == [0, 1, 2]
    again = client.chat.completions.create(model="tiny_a", messages=[{"role": "user", "content": "hi"}], n=3,
                                           max_tokens=6, temperature=1.0, seed=11)
    assert [c.message.content for c in again.choices] == [c.message.content for c in reply.choices]


def test_auth_is_required_when_a_key_is_set(locked_server):
    bad = openai.OpenAI(base_url=locked_server, api_key="wrong")
    with pytest.raises(openai.AuthenticationError):
        bad.models.list()
    good = openai.OpenAI(base_url=locked_server, api_key="s3cret")
    assert good.chat.completions.create(model="tiny_a", messages=[{"role": "user", "content": "hi"}],
                                        max_tokens=4).choices[0].message.content is not None
    assert httpx.get(f"{locked_server}/models").status_code == 401


def test_fifty_concurrent_requests_all_complete(open_server, engine):
    """Greedy requests for the default adapter ('second') go through the batcher, those for 'tiny_a' run one at a
    time beside it; streamed or not, each gets its own model's answer."""
    models = ["second", "second", "tiny_a", "tiny_a"]
    expected = {name: engine.generate([Message("user", "Who are you?")], GEN, adapter=name) for name in set(models)}
    assert expected["second"] != expected["tiny_a"]

    def ask(i: int) -> str:
        client = openai.OpenAI(base_url=open_server, api_key="unused", timeout=300)
        kwargs = dict(model=models[i % 4], messages=[{"role": "user", "content": "Who are you?"}], max_tokens=8)
        if i % 2:
            return "".join(c.choices[0].delta.content or "" for c in
                           client.chat.completions.create(stream=True, **kwargs))
        return client.chat.completions.create(**kwargs).choices[0].message.content

    with concurrent.futures.ThreadPoolExecutor(max_workers=50) as pool:
        answers = list(pool.map(ask, range(50)))
    assert answers == [expected[models[i % 4]] for i in range(50)]


@pytest.mark.parametrize(("body", "status", "fragment"), [
    ({"model": "tiny_a"}, 400, "messages"),
    ({"model": "nope", "messages": [{"role": "user", "content": "x"}]}, 404, "does not exist"),
    ({"model": "tiny_a", "messages": []}, 400, "messages"),
    ({"model": "tiny_a", "messages": [{"role": "wizard", "content": "x"}]}, 400, "role"),
    ({"model": "tiny_a", "messages": [{"role": "assistant", "content": "x"}]}, 400, "last message"),
    ({"model": "tiny_a", "messages": [{"role": "user", "content": "a"}, {"role": "user", "content": "b"}]}, 400,
     "alternate"),
    ({"model": "tiny_a", "messages": [{"role": "user", "content": "x"}], "temperature": 9}, 400, "temperature"),
    ({"model": "tiny_a", "messages": [{"role": "user", "content": "x"}], "max_tokens": 0}, 400, "max_tokens"),
    ({"model": "tiny_a", "messages": [{"role": "user", "content": "x"}], "n": 0}, 400, "n"),
])
def test_malformed_requests_get_openai_errors(open_server, body, status, fragment):
    response = httpx.post(f"{open_server}/chat/completions", json=body)
    assert response.status_code == status
    payload = response.json()
    assert fragment in payload["error"]["message"] and payload["error"]["type"]
    assert "Traceback" not in response.text


def test_broken_json_body_is_a_400(open_server):
    response = httpx.post(f"{open_server}/chat/completions", content=b"{not json",
                          headers={"content-type": "application/json"})
    assert response.status_code == 400 and "error" in response.json()


def test_tool_calls_are_parsed_from_the_answer():
    calls = parse_tool_calls('<tool_call>\n{"name": "get_weather", "arguments": {"city": "Paris"}}\n</tool_call>')
    assert calls[0]["function"]["name"] == "get_weather"
    assert json.loads(calls[0]["function"]["arguments"]) == {"city": "Paris"}
    assert parse_tool_calls("just text") == []


WEATHER = [{"type": "function", "function": {"name": "get_weather", "description": "Weather of a city",
                                            "parameters": {"type": "object",
                                                           "properties": {"city": {"type": "string"},
                                                                          "unit": {"type": "string"}}}}}]
# chatml names no tool format, so the default (ReAct-style) one applies: what a model trained on it writes
CALL = 'Action: get_weather\nAction Input: {"city": "Paris", "unit": "celsius"}'


@pytest.fixture
def calling_model(engine, monkeypatch):
    """The engine answers every request with CALL (streamed in three pieces); the tools each request passed to
    the engine are recorded."""
    seen = []

    async def acomplete(messages, gen, adapter, tools, stop, limit):
        seen.append(tools)
        return Completion(text=CALL, prompt_tokens=7, completion_tokens=20)

    async def astream(messages, gen, adapter, tools, stop, result, limit):
        seen.append(tools)
        for piece in (CALL[:9], CALL[9:30], CALL[30:]):
            yield piece
        result.text, result.finish_reason = CALL, "stop"

    monkeypatch.setattr(engine, "acomplete", acomplete)
    monkeypatch.setattr(engine, "astream", astream)
    return seen


def test_tool_call_answer_is_an_openai_tool_calls_response(open_server, calling_model):
    client = openai.OpenAI(base_url=open_server, api_key="unused")
    reply = client.chat.completions.create(model="tiny-base", messages=[{"role": "user", "content": "Paris?"}],
                                           tools=WEATHER)
    (answer,) = reply.choices
    assert answer.finish_reason == "tool_calls" and answer.message.content is None
    (call,) = answer.message.tool_calls
    assert call.type == "function" and call.id.startswith("call_") and call.function.name == "get_weather"
    assert json.loads(call.function.arguments) == {"city": "Paris", "unit": "celsius"}
    assert "get_weather" in calling_model[0] and "Weather of a city" in calling_model[0]
    # without tools offered the same answer is plain text
    plain = client.chat.completions.create(model="tiny-base", messages=[{"role": "user", "content": "Paris?"}])
    assert plain.choices[0].message.content == CALL and plain.choices[0].finish_reason == "stop"
    assert calling_model[1] is None


def test_streamed_tool_call_arrives_as_tool_calls_deltas_never_as_text(open_server, calling_model):
    client = openai.OpenAI(base_url=open_server, api_key="unused")
    chunks = list(client.chat.completions.create(model="tiny-base", messages=[{"role": "user", "content": "Paris?"}],
                                                 tools=WEATHER, stream=True))
    deltas = [c.choices[0].delta for c in chunks]
    assert "".join(d.content or "" for d in deltas) == ""
    calls = [call for d in deltas for call in (d.tool_calls or [])]
    assert [(c.index, c.function.name) for c in calls] == [(0, "get_weather")] and calls[0].id.startswith("call_")
    assert json.loads(calls[0].function.arguments) == {"city": "Paris", "unit": "celsius"}
    assert [c.choices[0].finish_reason for c in chunks if c.choices[0].finish_reason] == ["tool_calls"]


def test_streamed_answer_with_tools_offered_but_no_call_is_the_whole_text(open_server):
    client = openai.OpenAI(base_url=open_server, api_key="unused")
    question = {"model": "tiny_a", "messages": [{"role": "user", "content": "Paris?"}], "tools": WEATHER,
                "max_tokens": 8, "temperature": 0}
    whole = client.chat.completions.create(**question).choices[0]
    assert whole.message.content and not whole.message.tool_calls  # the tiny model calls nothing
    chunks = list(client.chat.completions.create(**question, stream=True))
    assert "".join(c.choices[0].delta.content or "" for c in chunks) == whole.message.content
    assert [c.choices[0].finish_reason for c in chunks if c.choices[0].finish_reason] == [whole.finish_reason]


def test_tools_reach_the_prompt(engine):
    tools = json.dumps([{"type": "function", "function": {"name": "get_weather", "parameters": {}}}])
    ids = engine.prompt_ids([Message("user", "Weather?")], None, tools)
    assert "get_weather" in engine.tokenizer.decode(ids)


def test_api_command_binds_loopback_and_honours_api_key_env(tiny_model_dir, tiny_run):
    import os
    import subprocess
    import sys

    port = free_port()
    env = dict(os.environ, API_PORT=str(port), API_KEY="k")
    proc = subprocess.Popen([sys.executable, "-m", "tuneforge", "api", f"model.path={tiny_model_dir}",
                             f"model.adapter_path={tiny_run}", "data.template=chatml"],
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=env)
    try:
        line = proc.stdout.readline()
        assert f"http://127.0.0.1:{port}/v1" in line, line
        deadline = time.time() + 60
        while time.time() < deadline:
            try:
                response = httpx.get(f"http://127.0.0.1:{port}/v1/models")
                break
            except httpx.ConnectError:
                time.sleep(0.2)
        assert response.status_code == 401
        ok = httpx.get(f"http://127.0.0.1:{port}/v1/models", headers={"Authorization": "Bearer k"})
        assert [m["id"] for m in ok.json()["data"]] == [tiny_model_dir.name, "tiny_a"]

        def long_stream():  # an answer that would take far longer than the shutdown allows
            body = {"model": "tiny_a", "messages": [{"role": "user", "content": "hi"}], "max_tokens": 900,
                    "stream": True}
            try:
                with httpx.stream("POST", f"http://127.0.0.1:{port}/v1/chat/completions", json=body, timeout=60,
                                  headers={"Authorization": "Bearer k"}) as r:
                    for _ in r.iter_lines():
                        pass
            except httpx.HTTPError:
                pass  # cut by the shutdown: an error for the client, never a hang

        reader = threading.Thread(target=long_stream, daemon=True)
        reader.start()
        time.sleep(1.0)
        start = time.time()
        proc.terminate()  # SIGTERM
        proc.wait(timeout=30)
        assert time.time() - start < 5, "the server took more than 5 s to stop after SIGTERM"
        reader.join(timeout=10)
        assert not reader.is_alive()
    finally:
        proc.kill()
        proc.wait(timeout=30)
