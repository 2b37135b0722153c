"""Packing as LLaMA-Factory means it: neat_packing keeps every packed row to itself; plain packing (packing: true)
lets a row attend to the rows packed before it."""

from __future__ import annotations

import pytest
import torch

from tuneforge.config import load
from tuneforge.data.build import packing_enabled
from tuneforge.stages.causal_lm import SFTStage
from tuneforge.train.batches import pack_rows

# Three rows of different lengths; labels train the second half of each row.
ROWS = [list(range(100, 100 + n)) for n in (9, 5, 7)]


def sft_rows() -> list[dict]:
    return [{"input_ids": ids, "labels": [-100] * (len(ids) // 2) + ids[len(ids) // 2:]} for ids in ROWS]


def logits(model, batch: dict) -> torch.Tensor:
    with torch.no_grad():
        # use_cache=False as in training: transformers reads packed position ids only without a KV cache
        return model(**{k: v for k, v in batch.items() if k != "labels"}, use_cache=False).logits


def alone(model, ids: list[int]) -> torch.Tensor:
    return logits(model, {"input_ids": torch.tensor([ids])})[0]


def segments(block: dict) -> list[tuple[int, int]]:
    """(start, end) of each packed row, from the position ids restarting at 0."""
    starts = [i for i, p in enumerate(block["position_ids"]) if p == 0] + [len(block["input_ids"])]
    return list(zip(starts, starts[1:]))


@pytest.fixture(scope="module")
def model(tiny_model_dir):
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(tiny_model_dir, dtype=torch.float32).eval()


@pytest.mark.parametrize("attn", ["sdpa", "eager"])
def test_neat_packed_rows_have_the_logits_they_have_alone(model, attn):
    model.config._attn_implementation = attn
    stage = SFTStage(0)
    packed = pack_rows(sft_rows(), cutoff=32, seed=0, neat=True)
    assert len(packed) == 1 and len(segments(packed[0])) == 3
    batch = stage.collate(packed)
    assert "attention_mask" not in batch  # transformers derives the block-diagonal mask from the position ids
    out = logits(model, batch)[0]
    for start, end in segments(packed[0]):
        ids = packed[0]["input_ids"][start:end]
        assert torch.allclose(out[start:end], alone(model, ids), atol=1e-5)


def test_plain_packed_rows_see_the_rows_before_them(model):
    model.config._attn_implementation = "sdpa"
    packed = pack_rows(sft_rows(), cutoff=32, seed=0, neat=False)
    batch = SFTStage(0).collate(packed)
    assert batch["attention_mask"].tolist() == [[1] * 21]
    out = logits(model, batch)[0]
    (s0, e0), *later = segments(packed[0])
    assert torch.allclose(out[s0:e0], alone(model, packed[0]["input_ids"][s0:e0]), atol=1e-5)
    for start, end in later:  # same positions as alone, but they attend across the row boundary
        assert not torch.allclose(out[start:end], alone(model, packed[0]["input_ids"][start:end]), atol=1e-3)


def test_packing_without_shuffle_keeps_dataset_order():
    rows = [{"input_ids": [i] * 6, "labels": [i] * 6} for i in range(1, 7)]
    packed = pack_rows(rows, cutoff=12, seed=0, shuffle=False)
    assert [block["input_ids"][0] for block in packed] == [1, 3, 5]


def test_lf_keys_map_to_packing_modes():
    neat = load(None, ["neat_packing=true"])
    assert neat.data.neat_packing and packing_enabled(neat.data, "sft")
    plain = load(None, ["packing=true"])
    assert not plain.data.neat_packing and packing_enabled(plain.data, "sft")
    assert not packing_enabled(load(None, []).data, "sft") and packing_enabled(load(None, []).data, "text")


@pytest.mark.parametrize("neat", [False, True])
def test_the_training_forward_keeps_each_packing_mode(model, neat):
    """Through the training path's own forward (stages.base.decoder_hidden, which drops masks it can): a plain
    packed row still sees the rows before it, a neat-packed one only itself. (Dropping the all-ones mask of a plain
    packed block let transformers read the restarting position ids as neat packing.)"""
    from tuneforge.stages.base import decoder_hidden

    model.config._attn_implementation = "sdpa"
    packed = pack_rows(sft_rows(), cutoff=32, seed=0, neat=neat)
    with torch.no_grad():
        hidden = decoder_hidden(model, SFTStage(0).collate(packed))[0]
        (s0, e0), *later = segments(packed[0])
        for index, (start, end) in enumerate([(s0, e0), *later]):
            ids = packed[0]["input_ids"][start:end]
            own = decoder_hidden(model, {"input_ids": torch.tensor([ids])})[0]
            same = torch.allclose(hidden[start:end], own, atol=1e-5)
            assert same if (neat or index == 0) else not same, (neat, index)
