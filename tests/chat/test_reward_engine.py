"""The engine as a reward model: the value head saved beside the adapter loads with it, and scores equal the
head applied by hand (weights read with safetensors) to transformers' own last hidden state."""

from __future__ import annotations

import shutil

import pytest

from tuneforge.chat.engine import load_engine
from tuneforge.config.schema import ModelConfig
from tuneforge.data.types import Message
from tuneforge.errors import ModelError

from ..evaluate.preference_runs import peft_model, reference_score, saved_head


def test_engine_loads_the_saved_value_head(tiny_model_dir, rm_run, tokenizer):
    engine = load_engine(ModelConfig(path=str(tiny_model_dir), adapter_path=[str(rm_run)]))
    assert engine.is_reward_model() and not engine.is_reward_model(False) and engine.info["stage"] == "rm"
    model, head = peft_model(tiny_model_dir, rm_run / "adapter"), saved_head(rm_run / "adapter")
    texts = ["Hello there", "A much longer text, so that the batch needs right padding for the others.", "x"]
    ids = [tokenizer.encode(t, add_special_tokens=False) for t in texts]
    expected = [reference_score(model, head, i) for i in ids]
    assert engine.score(ids, batch_size=2) == pytest.approx(expected, abs=1e-4)
    with pytest.raises(ModelError, match="the model has no value head"):
        engine.score(ids[:1], adapter=False)


def test_answer_ids_are_the_training_encoding_of_a_pair_side(tiny_model_dir, rm_run, tokenizer):
    engine = load_engine(ModelConfig(path=str(tiny_model_dir), adapter_path=[str(rm_run)]))
    ids = engine.answer_ids([Message("user", "Hi"), Message("assistant", "Hello!")], None)
    text = "<|im_start|>user\nHi<|im_end|>\n<|im_start|>assistant\nHello!<|im_end|>\n"  # chatml, by hand
    assert ids == tokenizer.encode(text, add_special_tokens=False)
    assert engine.text_ids(text, max_length=3) == ids[:3]


def test_an_rm_run_without_its_value_head_is_one_clear_error(tmp_path, tiny_model_dir, rm_run):
    broken = tmp_path / "adapter"
    shutil.copytree(rm_run / "adapter", broken)
    (broken / "value_head.safetensors").unlink()
    with pytest.raises(ModelError, match="trained with stage rm but its value head is missing"):
        load_engine(ModelConfig(path=str(tiny_model_dir), adapter_path=[str(broken)]))
