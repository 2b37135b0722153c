"""The value head's file format is LLaMA-Factory's: value_head.safetensors (or the older value_head.bin)."""

from __future__ import annotations

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import save_file

from tuneforge.errors import ModelError
from tuneforge.models.valuehead import ValueHead, find_value_head, load_value_head, save_value_head


def lf_state(hidden: int) -> dict[str, torch.Tensor]:
    torch.manual_seed(3)
    return {"v_head.summary.weight": torch.randn(1, hidden), "v_head.summary.bias": torch.randn(1)}


def test_saved_head_has_lf_keys_shapes_and_metadata(tmp_path):
    head = ValueHead(16)
    path = save_value_head(tmp_path, head)
    assert path.name == "value_head.safetensors"
    with safe_open(str(path), "pt") as f:
        assert f.metadata() == {"format": "pt"}
        assert {k: tuple(f.get_tensor(k).shape) for k in f.keys()} == \
            {"v_head.summary.weight": (1, 16), "v_head.summary.bias": (1,)}
        assert torch.equal(f.get_tensor("v_head.summary.weight"), head.summary.weight.detach())


@pytest.mark.parametrize("form", ["safetensors", "bin"])
def test_a_head_written_the_lf_way_loads_and_scores(tmp_path, form):
    state = lf_state(8)
    if form == "safetensors":  # as LF's fix_valuehead_checkpoint writes it
        save_file(state, str(tmp_path / "value_head.safetensors"), metadata={"format": "pt"})
    else:  # save_safetensors=false in LF
        torch.save(state, tmp_path / "value_head.bin")
    head = ValueHead(8, dropout=0.0)
    load_value_head(find_value_head(tmp_path), head)
    hidden = torch.randn(3, 8)
    expected = hidden @ state["v_head.summary.weight"][0] + state["v_head.summary.bias"][0]
    assert torch.allclose(head(hidden), expected, atol=1e-6)


def test_round_trip_and_wrong_files_are_one_message(tmp_path):
    head = ValueHead(8)
    save_value_head(tmp_path, head)
    other = ValueHead(8)
    load_value_head(tmp_path / "value_head.safetensors", other)
    assert torch.equal(other.summary.weight, head.summary.weight) and torch.equal(other.summary.bias, head.summary.bias)
    with pytest.raises(ModelError, match="does not fit this model"):
        load_value_head(tmp_path / "value_head.safetensors", ValueHead(4))
    save_file({"score.weight": torch.zeros(1, 8)}, str(tmp_path / "x.safetensors"))
    with pytest.raises(ModelError, match="not a value head"):
        load_value_head(tmp_path / "x.safetensors", ValueHead(8))
    assert find_value_head(tmp_path / "missing") is None
