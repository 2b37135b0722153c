"""How much host memory a run pages in ahead of its loop (run.warm_heap), and where it does not."""

from __future__ import annotations

import json
from types import SimpleNamespace

import pytest
import torch

from tuneforge import run

CONFIG = {"hidden_size": 1024, "intermediate_size": 4096, "num_hidden_layers": 8, "num_attention_heads": 8,
          "vocab_size": 32000}


@pytest.fixture
def warm(tmp_path, monkeypatch, make_cfg):
    """warm_heap on a model folder holding only CONFIG, with HeapWarmer replaced by a recorder: the bytes asked."""
    folder = tmp_path / "model"
    folder.mkdir()
    (folder / "config.json").write_text(json.dumps(CONFIG))
    asked: list[int] = []
    monkeypatch.setattr(run, "HeapWarmer", lambda nbytes: asked.append(nbytes) or nbytes)
    monkeypatch.setattr(run, "heap_retained", lambda: True)
    monkeypatch.setattr(run, "available_memory", lambda: 64 * 2**30)
    stage = SimpleNamespace(row_length=lambda row: len(row["input_ids"]))

    def call(lengths, *overrides, processes=1, path=folder, precision="bf16"):
        cfg = make_cfg("train.device=cpu", *overrides)
        acc = SimpleNamespace(device=torch.device("cpu"), num_processes=processes)
        rows = [{"input_ids": [0] * n} for n in lengths]
        return run.warm_heap(cfg, acc, SimpleNamespace(name_or_path=str(path)), stage, rows, precision)

    return call


def test_one_pass_of_the_largest_forward_is_paged_in(warm):
    # batch 2 x the longest row (256) = 512 tokens, bf16 (2 bytes a value), by hand:
    activations = 512 * 8 * (10 * 1024 + 4 * 4096) * 2  # tokens x layers x values kept a token and layer
    probabilities = 8 * (512 * 8 * 256) * 2  # the CPU attention keeps heads x length values a token and layer
    loss_chunk = 512 * 32000 * 4 * 2  # fp32 logits and their gradient for the loss's chunk
    assert warm([256, 100, 30], "train.batch_size=2") == activations + probabilities + loss_chunk == 365_953_024
    # fp32 values are 4 bytes (the loss chunk is fp32 either way)
    assert warm([256, 100, 30], "train.batch_size=2", precision="fp32") == \
        2 * (activations + probabilities) + loss_chunk
    # with SDPA no probabilities are kept
    assert warm([256, 100, 30], "train.batch_size=2", "model.attn_implementation=sdpa") == \
        activations + loss_chunk


def test_the_forward_token_budget_and_the_caps_bound_it(warm, monkeypatch):
    # batch 4 x 400 = 1,600 tokens are cut into passes of at most train.forward_tokens (1,024 on a CPU)
    tokens = 1024
    expected = tokens * 8 * (10 * 1024 + 4 * 4096) * 2 + 8 * (tokens * 8 * 400) * 2 + tokens * 32000 * 8
    assert warm([400, 400, 300, 200], "train.batch_size=4") == expected
    assert warm([400, 400, 300, 200], "train.batch_size=4", "train.forward_tokens=512") == \
        512 * 8 * (10 * 1024 + 4 * 4096) * 2 + 8 * (512 * 8 * 400) * 2 + 512 * 32000 * 8
    # at most WARM_HEAP_MAX (glibc returns a free heap top of 2 GiB to the kernel)
    assert warm([1000] * 4, "train.batch_size=4", "train.forward_tokens=4096") == run.WARM_HEAP_MAX == 1.5 * 2**30
    # and at most half the memory available
    monkeypatch.setattr(run, "available_memory", lambda: 2**29)
    assert warm([1000] * 4, "train.batch_size=4", "train.forward_tokens=4096") == 2**28


def test_nothing_is_paged_in_where_it_cannot_help(warm, tmp_path):
    assert warm([256, 100], processes=2) is None  # processes share the cores the warming would use
    assert warm([256, 100], path=tmp_path / "missing") is None  # no config.json to size it from
    assert warm([20, 10]) is None  # 2 x 20 tokens: under 64 MiB


def test_available_memory_agrees_with_psutil():
    import psutil  # (accelerate's dependency)

    from tuneforge.devices import available_memory

    assert abs(available_memory() - psutil.virtual_memory().available) < 0.1 * psutil.virtual_memory().available
