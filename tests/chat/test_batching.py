"""Continuous batching: concurrent greedy requests decode together and give exactly the locked path's answers."""

from __future__ import annotations

import asyncio
from contextlib import aclosing
from dataclasses import replace

import pytest

from tuneforge.chat.batching import BatchSettings
from tuneforge.chat.engine import BASE, load_engine
from tuneforge.config.schema import GenerationConfig, ModelConfig
from tuneforge.data.types import Message
from tuneforge.errors import ConfigError

GEN = GenerationConfig(max_new_tokens=12)
QUESTIONS = ["Who are you?", "你是谁？", "Name three colours.", "What is 2 + 2?", "Say hi.", "Write a haiku."]


@pytest.fixture(scope="module")
def lively(tmp_path_factory, tokenizer):
    """A tiny Llama with large random weights (its greedy answers depend on the prompt, unlike the shared tiny
    model's) and a random LoRA adapter that changes them."""
    import torch
    from peft import LoraConfig, get_peft_model
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=len(tokenizer), hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=1024,
                         initializer_range=0.5, eos_token_id=tokenizer.eos_token_id,
                         pad_token_id=tokenizer.pad_token_id, tie_word_embeddings=True)
    folder = tmp_path_factory.mktemp("lively")
    model = LlamaForCausalLM(config)
    model.save_pretrained(folder / "model")
    tokenizer.save_pretrained(folder / "model")
    lora = LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"], init_lora_weights=False)
    get_peft_model(model, lora).save_pretrained(folder / "adapter")
    return folder


@pytest.fixture(scope="module")
def batched(lively):
    engine = load_engine(ModelConfig(path=str(lively / "model")), "chatml", named={"tuned": str(lively / "adapter")})
    engine.start_batching(BatchSettings(max_sequences=8, cache_tokens=4096))
    yield engine
    engine.stop_batching()


def usage(done):
    return done.text, done.prompt_tokens, done.completion_tokens, done.finish_reason


def test_concurrent_requests_share_steps_and_match_the_locked_path(batched):
    expected = [usage(batched.complete([Message("user", q)], GEN)) for q in QUESTIONS]
    assert len({e[0] for e in expected}) > 1  # the prompts give different answers, so a mix-up would show
    widths: list[int] = []
    hook = batched.model.get_base_model().register_forward_pre_hook(
        lambda module, args, kwargs: widths.append(kwargs["input_ids"].shape[-1]), with_kwargs=True)

    async def ask_all():
        return await asyncio.gather(*(batched.acomplete([Message("user", q)], GEN) for q in QUESTIONS))

    try:
        answers = asyncio.run(ask_all())
    finally:
        hook.remove()
    assert [usage(a) for a in answers] == expected
    # one request at a time would take >= 6 x 12 single-row forwards; batched, the decode steps carry all six
    assert len(widths) < len(QUESTIONS) * GEN.max_new_tokens / 2, widths
    assert max(widths) >= len(QUESTIONS)


def test_stop_words_and_streaming_pieces_match(batched):
    question = [Message("user", QUESTIONS[0])]
    whole = batched.complete(question, GEN).text
    stop = [whole[4:6]]
    cut = batched.complete(question, GEN, stop=stop)
    assert cut.text == whole[: whole.index(stop[0])] and cut.finish_reason == "stop"

    async def streamed(stop_words):
        return [p async for p in batched.astream(question, GEN, stop=stop_words)]

    assert "".join(asyncio.run(streamed(None))) == whole
    result = asyncio.run(batched.acomplete(question, GEN, stop=stop))
    assert usage(result) == usage(cut)


def test_a_stop_word_counts_the_same_tokens_when_updates_bring_several(batched, monkeypatch):
    """Under load the batcher's updates can carry several new tokens; the answer still ends at the token that
    completes the stop word (the locked path's count), not at the last token of the update."""
    question = [Message("user", QUESTIONS[0])]
    whole = batched.complete(question, GEN).text
    stop = [whole[4:6]]
    cut = batched.complete(question, GEN, stop=stop)
    tokens = batched.batcher.tokens

    async def coalesced(*args, **kwargs):  # only every third update reaches the reader (and the last one)
        async with aclosing(tokens(*args, **kwargs)) as updates:
            async for generated, finished in updates:
                if finished or len(generated) % 3 == 0:
                    yield generated, finished

    monkeypatch.setattr(batched.batcher, "tokens", coalesced)
    result = asyncio.run(batched.acomplete(question, GEN, stop=stop))
    assert usage(result) == usage(cut) and cut.completion_tokens % 3 != 0  # the stop falls inside an update


def test_other_weights_and_sampling_run_exclusively_beside_the_batch(batched):
    question = [Message("user", QUESTIONS[2])]
    sampled = replace(GEN, temperature=1.0, seed=3)
    expected = [usage(batched.complete(question, GEN)), usage(batched.complete(question, GEN, adapter=BASE)),
                usage(batched.complete(question, sampled))]
    assert expected[0][0] != expected[1][0]  # the adapter changes the answer

    async def mixed():
        return await asyncio.gather(batched.acomplete(question, GEN), batched.acomplete(question, GEN, adapter=BASE),
                                    batched.acomplete(question, sampled), batched.acomplete(question, GEN))

    answers = [usage(a) for a in asyncio.run(mixed())]
    assert answers == [*expected, expected[0]]


def test_leaving_a_stream_early_cancels_its_request(batched):
    async def first_piece():
        pieces = batched.astream([Message("user", QUESTIONS[1])], replace(GEN, max_new_tokens=64))
        async for piece in pieces:
            await pieces.aclose()
            return piece

    assert asyncio.run(first_piece())
    assert batched.batcher.manager.output_router.result_handlers == {}
    assert usage(asyncio.run(batched.acomplete([Message("user", QUESTIONS[3])], GEN))) == \
        usage(batched.complete([Message("user", QUESTIONS[3])], GEN))


def test_batch_settings_are_checked():
    with pytest.raises(ConfigError, match="--batch-size 1"):
        BatchSettings(max_sequences=1)
    with pytest.raises(ConfigError, match="--kv-cache-tokens 8"):
        BatchSettings(cache_tokens=8)


def test_unseeded_sampling_joins_the_batch(batched):
    """Sampled requests without a seed decode in the same steps as greedy ones; top_k=1 leaves one candidate, so
    that 'sample' must be the greedy answer, and a temperature-1 sample differs from it for some prompt."""
    questions = [[Message("user", q)] for q in QUESTIONS]
    greedy = [batched.complete(q, GEN).text for q in questions]
    one_candidate = replace(GEN, temperature=1.0, top_k=1)
    free = replace(GEN, temperature=1.5)
    widths: list[int] = []
    hook = batched.model.get_base_model().register_forward_pre_hook(
        lambda module, args, kwargs: widths.append(kwargs["input_ids"].shape[-1]), with_kwargs=True)

    async def ask_all():
        return await asyncio.gather(*(batched.acomplete(q, one_candidate) for q in questions),
                                    *(batched.acomplete(q, free) for q in questions))

    try:
        answers = [a.text for a in asyncio.run(ask_all())]
    finally:
        hook.remove()
    assert answers[:len(questions)] == greedy
    assert answers[len(questions):] != greedy
    assert max(widths) >= 2 * len(questions) and len(widths) < 2 * len(QUESTIONS) * GEN.max_new_tokens / 2
