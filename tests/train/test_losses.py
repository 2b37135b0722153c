"""The fused log-prob primitive against plain autograd over full logits."""

from __future__ import annotations

import pytest
import torch

from tuneforge.train import losses
from tuneforge.train.losses import TokenLogps, linear_cross_entropy, token_logps


def reference(hidden, weight, targets):
    return torch.log_softmax(hidden @ weight.T, -1).gather(1, targets[:, None]).squeeze(1)


@pytest.mark.parametrize("uniform", [True, False])
@pytest.mark.parametrize("upstream", ["uniform", "per_token"])
def test_values_and_gradients_match_autograd(uniform, upstream):
    torch.manual_seed(0)
    hidden = torch.randn(37, 16, dtype=torch.float64, requires_grad=True)
    weight = torch.randn(50, 16, dtype=torch.float64, requires_grad=True)  # a head that trains (full tuning)
    targets = torch.randint(0, 50, (37,))
    g = torch.full((37,), -0.25, dtype=torch.float64) if upstream == "uniform" else torch.randn(37, dtype=torch.float64)
    ours, _ = token_logps(hidden, weight, targets, uniform_grad=uniform, chunk=8)  # several chunks
    (ours * g).sum().backward()
    ours_grads = hidden.grad.clone(), weight.grad.clone()
    hidden.grad, weight.grad = None, None
    expected = reference(hidden, weight, targets)
    (expected * g).sum().backward()
    assert torch.allclose(ours.double(), expected, atol=1e-5)
    assert torch.allclose(ours_grads[0], hidden.grad, atol=1e-5)
    assert torch.allclose(ours_grads[1], weight.grad, atol=1e-5)


@pytest.mark.parametrize("n, sizes", [
    (1000, [512, 256, 128, 64, 64]),  # 1000 = 512 + 256 + 128 + 64 + 40 (padded to 64)
    (1024, [1024]), (2050, [1024, 1024, 64]), (64, [64]), (1, [64]), (130, [128, 64])])
def test_head_chunks_come_in_a_few_fixed_sizes(n, sizes):
    spans = losses.chunk_spans(n, 1024)
    assert [end - start for start, end in spans] == sizes
    assert spans[0][0] == 0 and all(a[1] == b[0] for a, b in zip(spans, spans[1:]))
    assert n <= spans[-1][1] < n + losses.SMALLEST_CHUNK


@pytest.mark.parametrize("uniform", [True, False])
def test_a_padded_last_chunk_changes_no_value_or_gradient(uniform):
    """300 rows in chunks of 256 and 64, the last padded with 20 zero rows (targets 0) that are dropped."""
    torch.manual_seed(2)
    hidden = torch.randn(300, 16, dtype=torch.float64, requires_grad=True)
    weight = torch.randn(50, 16, dtype=torch.float64, requires_grad=True)
    targets = torch.randint(1, 50, (300,))
    g = torch.randn(300, dtype=torch.float64)
    ours, _ = token_logps(hidden, weight, targets, uniform_grad=uniform, chunk=256)
    (ours * g).sum().backward()
    ours_grads = hidden.grad.clone(), weight.grad.clone()
    hidden.grad, weight.grad = None, None
    expected = reference(hidden, weight, targets)
    (expected * g).sum().backward()
    assert ours.shape == (300,)
    assert torch.allclose(ours.double(), expected, atol=1e-5)
    assert torch.allclose(ours_grads[0], hidden.grad, atol=1e-5)
    assert torch.allclose(ours_grads[1], weight.grad, atol=1e-5)
    with torch.no_grad():
        values, hits = token_logps(hidden, weight, targets, chunk=256)
    assert values.shape == hits.shape == (300,)
    assert torch.allclose(values.double(), expected.detach(), atol=1e-5)


def test_cross_entropy_is_the_negated_sum():
    torch.manual_seed(1)
    hidden, weight = torch.randn(9, 8), torch.randn(20, 8)
    targets = torch.randint(0, 20, (9,))
    expected = torch.nn.functional.cross_entropy(hidden @ weight.T, targets, reduction="sum")
    assert torch.allclose(linear_cross_entropy(hidden, weight, targets), expected, atol=1e-4)


def test_evaluation_computes_no_gradient_of_any_kind(monkeypatch):
    def refuse(*args):
        raise AssertionError("the autograd function (which computes gradients in forward) ran under no_grad")

    monkeypatch.setattr(losses._LinearTokenLogps, "apply", refuse)
    hidden = torch.randn(5, 8, requires_grad=True)
    weight = torch.randn(12, 8, requires_grad=True)
    targets = torch.randint(0, 12, (5,))
    with torch.no_grad():
        values, hits = token_logps(hidden, weight, targets)
    assert torch.allclose(values, reference(hidden, weight, targets).detach(), atol=1e-5)
    assert hits.tolist() == ((hidden @ weight.T).argmax(-1) == targets).tolist()


def test_per_row_sums_counts_and_means():
    logps = TokenLogps(torch.tensor([-1.0, -2.0, -3.0, -4.0, -6.0]), torch.tensor([0, 0, 0, 2, 2]), 3)
    assert logps.sum().tolist() == [-6.0, 0.0, -10.0]
    assert logps.count().tolist() == [3.0, 0.0, 2.0]
    assert logps.mean().tolist() == [-2.0, 0.0, -5.0]
    assert logps.sum(torch.tensor([1.0, 0.5, 0.5, 1.0, 0.0])).tolist() == [-3.5, 0.0, -4.0]
