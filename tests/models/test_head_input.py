"""The output head gets contiguous input: generation's prefill hands it `hidden[:, -1:, :]`, a strided view, and
for a frozen head torch's matmul then copies the [vocab, hidden] weight once per sequence (found profiling grpo)."""

from __future__ import annotations

import torch

from tuneforge.config.schema import ModelConfig
from tuneforge.models.load import load_model


def weight_copies(head: torch.nn.Module, hidden: torch.Tensor) -> list[list[int]]:
    """Input shapes of the batched matmuls the head runs on this input (the per-sequence weight copy's trace)."""
    with torch.no_grad(), torch.profiler.profile(record_shapes=True) as prof:
        out = head(hidden)
    assert out.shape[:2] == hidden.shape[:2]
    return [e.input_shapes for e in prof.key_averages(group_by_input_shape=True) if e.key == "aten::bmm"]


def test_a_frozen_head_is_not_copied_per_sequence(tiny_model_dir):
    model = load_model(ModelConfig(path=str(tiny_model_dir)), dtype=torch.float32)
    head = model.get_output_embeddings()
    head.weight.requires_grad_(False)
    strided = torch.randn(8, 5, head.in_features)[:, -1:, :]  # what generate's prefill passes
    # the trap, on a plain frozen linear layer of the same shape: one [8, hidden, vocab] batched matmul
    plain = torch.nn.Linear(head.in_features, head.out_features, bias=False).requires_grad_(False)
    assert weight_copies(plain, strided) != []
    # the loaded model's head: a plain matrix product, the same values
    assert weight_copies(head, strided) == []
    torch.testing.assert_close(head(strided), strided.contiguous() @ head.weight.T)
