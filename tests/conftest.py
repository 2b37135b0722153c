"""Shared fixtures: the embedded model's real tokenizer, a tiny Llama built in-process, dataset folders."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

FIXTURES = Path(__file__).parent / "fixtures"


@pytest.fixture(scope="session")
def tokenizer():
    """SmolLM2's real tokenizer (from the embedded model folder; converted once, offline)."""
    from tuneforge.config.schema import ModelConfig
    from tuneforge.models.load import load_tokenizer

    return load_tokenizer(ModelConfig())


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory, tokenizer) -> Path:
    """A 2-layer, hidden-64 Llama with SmolLM2's vocabulary, saved as a model folder."""
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=len(tokenizer), hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=1024,
                         bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id,
                         pad_token_id=tokenizer.pad_token_id, tie_word_embeddings=True)
    folder = tmp_path_factory.mktemp("tiny-llama")
    LlamaForCausalLM(config).save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return folder


def write_json(path: Path, data) -> Path:
    """Write JSON (UTF-8, unescaped) and return the path."""
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(data, ensure_ascii=False, indent=1), encoding="utf-8")
    return path


@pytest.fixture
def dataset_dir(tmp_path) -> Path:
    """An empty dataset folder; tests add files and a dataset_info.json."""
    folder = tmp_path / "data"
    folder.mkdir()
    return folder


@pytest.fixture(autouse=True)
def _fresh_accelerator_state():
    """accelerate keeps process-wide state; each test starts from a clean one."""
    from accelerate.state import AcceleratorState, GradientState, PartialState

    yield
    AcceleratorState._reset_state(True)
    GradientState._reset_state()
    PartialState._reset_state()


@pytest.fixture(autouse=True)
def _isolated_cache(tmp_path, monkeypatch):
    """Each test gets its own tokenized-data cache so results never leak between tests."""
    monkeypatch.setenv("TUNEFORGE_DATA_CACHE", str(tmp_path / "cache"))


def train_tiny_run(out: Path, tiny_model_dir: Path, *extra: str) -> Path:
    """A tiny LoRA run: a full run folder with adapter/ and checkpoints/step-2/adapter."""
    from accelerate.state import AcceleratorState, GradientState, PartialState

    from tuneforge.config import load
    from tuneforge.run import train

    cfg = load(None, [f"model.path={tiny_model_dir}", "data.dataset=identity", "data.template=chatml",
                      "data.max_samples=8", "data.cutoff_len=64", "train.max_steps=3", "train.save_steps=2",
                      "train.learning_rate=5e-2", "train.precision=fp32", f"output.dir={out}",
                      "finetune.lora.rank=4", *extra])
    try:
        return train(cfg)
    finally:
        AcceleratorState._reset_state(True)
        GradientState._reset_state()
        PartialState._reset_state()


@pytest.fixture(scope="session")
def tiny_run(tmp_path_factory, tiny_model_dir) -> Path:
    """A trained tiny LoRA run folder."""
    return train_tiny_run(tmp_path_factory.mktemp("runs") / "tiny_a", tiny_model_dir)


@pytest.fixture(scope="session")
def tiny_run_b(tmp_path_factory, tiny_model_dir) -> Path:
    """A second tiny LoRA run (different seed and learning rate)."""
    return train_tiny_run(tmp_path_factory.mktemp("runs") / "tiny_b", tiny_model_dir, "train.seed=7",
                          "train.learning_rate=1e-1")


def pytest_sessionfinish(session, exitstatus):
    """Under CI=true a skipped test fails the run: every test must run where CI runs (scripts/test.sh installs
    every extra and chromium)."""
    import os

    reporter = session.config.pluginmanager.get_plugin("terminalreporter")
    skipped = reporter.stats.get("skipped", []) if reporter is not None else []
    if os.environ.get("CI") and skipped and session.exitstatus == 0:
        reporter.write_line(f"CI=true: {len(skipped)} test(s) skipped; a skipped test fails the run here",
                            red=True)
        session.exitstatus = 1
