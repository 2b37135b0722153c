"""POST /v1/score/evaluation (LLaMA-Factory's reward-model API) on a tiny reward model; expected scores come from
transformers/peft directly (output_hidden_states) and the head read from value_head.safetensors."""

from __future__ import annotations

import fastapi.testclient as fastapi_testclient  # the api extra: installed by scripts/setup.sh
import pytest

from tuneforge.chat.engine import load_engine
from tuneforge.config.schema import ModelConfig
from tuneforge.errors import ConfigError
from tuneforge.serve.api import MAX_SCORE_ITEMS, create_app

from ..evaluate.preference_runs import peft_model, reference_score, saved_head

URL = "/v1/score/evaluation"


@pytest.fixture(scope="module")
def engine(tiny_model_dir, rm_run, tiny_run):
    return load_engine(ModelConfig(path=str(tiny_model_dir)), named={"rm": str(rm_run), "chat": str(tiny_run)})


@pytest.fixture(scope="module")
def client(engine):
    return fastapi_testclient.TestClient(create_app(engine, "tiny-base"))


@pytest.fixture(scope="module")
def reference(tiny_model_dir, rm_run):
    model, head = peft_model(tiny_model_dir, rm_run / "adapter"), saved_head(rm_run / "adapter")
    return lambda ids: reference_score(model, head, ids)


def test_raw_strings_are_scored_as_llamafactory_does(client, reference, tokenizer):
    texts = ["Hello there", "The capital of France is Paris, a city on the Seine.", "ok"]
    response = client.post(URL, json={"model": "rm", "messages": texts})
    assert response.status_code == 200, response.text
    body = response.json()
    assert body["object"] == "score.evaluation" and body["model"] == "rm" and "template" not in body
    assert body["id"].startswith("scoreval-") and len(body["id"]) > len("scoreval-")
    # no template, no special tokens; the value at the last token
    expected = [reference(tokenizer.encode(t, add_special_tokens=False)) for t in texts]
    assert body["scores"] == pytest.approx(expected, abs=1e-4)
    cut = client.post(URL, json={"model": "rm", "messages": [texts[1]], "max_length": 4}).json()["scores"]
    assert cut == pytest.approx([reference(tokenizer.encode(texts[1], add_special_tokens=False)[:4])], abs=1e-4)


def test_chat_arrays_are_rendered_with_the_trained_template(client, tokenizer):
    chat = [{"role": "system", "content": "Be kind."}, {"role": "user", "content": "What is 2+2?"},
            {"role": "assistant", "content": "It is 4."}]
    # chatml, the template the reward model was trained with, written out by hand
    text = ("<|im_start|>system\nBe kind.<|im_end|>\n<|im_start|>user\nWhat is 2+2?<|im_end|>\n"
            "<|im_start|>assistant\nIt is 4.<|im_end|>\n")
    got = client.post(URL, json={"model": "rm", "messages": [chat, text]}).json()
    assert got["template"] == "chatml"
    assert got["scores"][0] == pytest.approx(got["scores"][1], abs=1e-5)
    no_system = client.post(URL, json={"model": "rm", "messages": [chat[1:]]}).json()["scores"][0]
    plain = client.post(URL, json={"model": "rm", "messages": [text[len("<|im_start|>system\nBe kind.<|im_end|>\n"):]]})
    assert no_system == pytest.approx(plain.json()["scores"][0], abs=1e-5)


def test_an_unknown_model_name_means_the_one_reward_model(client):
    # LLaMA-Factory ignores the name, and its PPO api reward sends "model"
    assert client.post(URL, json={"model": "model", "messages": ["hi"]}).json()["model"] == "rm"


@pytest.mark.parametrize(("body", "status", "fragment"), [
    ({"model": "rm", "messages": []}, 400, "messages"),
    ({"model": "rm", "messages": ["x"] * (MAX_SCORE_ITEMS + 1)}, 400, f"1 to {MAX_SCORE_ITEMS}"),
    ({"model": "rm", "messages": [""]}, 400, "nothing to score"),
    ({"model": "rm", "messages": [[{"role": "user", "content": "hi"}]]}, 400, "must end with an assistant"),
    ({"model": "rm", "messages": [[{"role": "assistant", "content": "a"}, {"role": "assistant", "content": "b"}]]},
     400, "alternate"),
    ({"model": "rm", "messages": ["x"], "max_length": 0}, 400, "max_length"),
    ({"model": "chat", "messages": ["x"]}, 405, "Not allowed"),
    ({"model": "tiny-base", "messages": ["x"]}, 405, "Not allowed"),
])
def test_bad_score_requests(client, body, status, fragment):
    response = client.post(URL, json=body)
    assert response.status_code == status, response.text
    assert fragment in response.json()["error"]["message"]


def test_a_reward_model_does_not_chat(client):
    ask = {"messages": [{"role": "user", "content": "hi"}], "max_tokens": 2}
    refused = client.post("/v1/chat/completions", json={"model": "rm", **ask})
    assert refused.status_code == 405 and "Not allowed" in refused.json()["error"]["message"]
    assert client.post("/v1/chat/completions", json={"model": "chat", **ask}).status_code == 200


def test_stage_rm_refuses_every_chat_and_needs_a_value_head(engine, tiny_model_dir, tiny_run):
    from tuneforge.cli.api_cmd import reward_models

    client = fastapi_testclient.TestClient(create_app(engine, "tiny-base", reward=True))
    ask = {"model": "chat", "messages": [{"role": "user", "content": "hi"}]}
    assert client.post("/v1/chat/completions", json=ask).status_code == 405
    assert reward_models(engine, "tiny-base", required=True) == ["rm"]
    generative = load_engine(ModelConfig(path=str(tiny_model_dir), adapter_path=[str(tiny_run)]))
    with pytest.raises(ConfigError, match="none of the served weights has a value head"):
        reward_models(generative, "tiny-base", required=True)


def test_score_needs_the_api_key(engine):
    client = fastapi_testclient.TestClient(create_app(engine, "tiny-base", api_key="k"))
    assert client.post(URL, json={"model": "rm", "messages": ["hi"]}).status_code == 401
    ok = client.post(URL, json={"model": "rm", "messages": ["hi"]}, headers={"Authorization": "Bearer k"})
    assert ok.status_code == 200 and len(ok.json()["scores"]) == 1
