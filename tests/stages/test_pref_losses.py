"""Every preference loss on fixed log-probs against values computed by hand (plain math, no torch ops of ours)."""

from __future__ import annotations

import math

import pytest
import torch

from tuneforge.stages import pref_losses as pl


def t(*values: float) -> torch.Tensor:
    return torch.tensor(values, dtype=torch.float64)


def softplus(x: float) -> float:
    """-log sigmoid(-x) = log(1 + e^x)."""
    return math.log1p(math.exp(x))


def sig(x: float) -> float:
    return 1 / (1 + math.exp(-x))


# policy and reference summed log-probs of two pairs:
# d_c = pi_c - rho_c = [0.5, 0.0], d_r = pi_r - rho_r = [-0.5, 1.0], z = d_c - d_r = [1.0, -1.0]
POLICY = pl.PairLogps(t(-10.0, -12.0), t(-11.0, -9.0))
REF = pl.PairLogps(t(-10.5, -12.0), t(-10.5, -10.0))
BETA = 0.1


def close(actual: torch.Tensor, expected: list[float]) -> None:
    assert actual.tolist() == pytest.approx(expected, rel=1e-12, abs=1e-12)


def test_sigmoid():
    close(pl.sigmoid_loss(POLICY, REF, BETA), [softplus(-0.1), softplus(0.1)])


def test_sigmoid_with_label_smoothing_is_cdpo():
    eps = 0.2
    expected = [(1 - eps) * softplus(-0.1 * z) + eps * softplus(0.1 * z) for z in (1.0, -1.0)]
    close(pl.sigmoid_loss(POLICY, REF, BETA, eps), expected)


def test_hinge():
    close(pl.hinge_loss(POLICY, REF, BETA), [1 - 0.1, 1 + 0.1])


def test_ipo():
    close(pl.ipo_loss(POLICY, REF, BETA), [(1 - 5) ** 2, (-1 - 5) ** 2])


def test_kto_pair():
    kl_c = max((0.5 + 0.0) / 2, 0)  # mean d_c
    kl_r = max((-0.5 + 1.0) / 2, 0)  # mean d_r
    expected = [((1 - sig(0.1 * (dc - kl_r))) + (1 - sig(0.1 * (kl_c - dr)))) / 2
                for dc, dr in ((0.5, -0.5), (0.0, 1.0))]
    close(pl.kto_pair_loss(POLICY, REF, BETA), expected)


def test_hinge_ipo_and_kto_pair_differ_from_sigmoid_on_the_same_batch():
    sigmoid = pl.sigmoid_loss(POLICY, REF, BETA)
    for other in (pl.hinge_loss(POLICY, REF, BETA), pl.ipo_loss(POLICY, REF, BETA), pl.kto_pair_loss(POLICY, REF, BETA)):
        assert not torch.allclose(other, sigmoid)


def test_orpo_on_mean_logps():
    chosen, rejected = -0.5, -1.0  # per-token means
    log_odds = (chosen - rejected) - (math.log(1 - math.exp(chosen)) - math.log(1 - math.exp(rejected)))
    sft, odds = pl.orpo_parts(pl.PairLogps(t(chosen), t(rejected)))
    close(sft, [0.5])
    close(odds, [softplus(-log_odds)])
    assert (sft + 0.1 * odds).item() == pytest.approx(0.5 + 0.1 * softplus(-log_odds), rel=1e-12)


def test_simpo():
    # beta 2, gamma 1: 2 * (-0.5 - -1.0) - 1 = 0 -> -log sigmoid(0) = ln 2
    close(pl.simpo_loss(pl.PairLogps(t(-0.5), t(-1.0)), 2.0, 1.0), [math.log(2)])
    close(pl.simpo_loss(pl.PairLogps(t(-0.5), t(-1.0)), 2.0, 0.0), [softplus(-1.0)])


def test_bco():
    delta = 0.02
    r_c = [0.1 * 0.5, 0.1 * 0.0]
    r_r = [0.1 * -0.5, 0.1 * 1.0]
    expected = [softplus(-(c - delta)) + softplus(r - delta) for c, r in zip(r_c, r_r)]
    close(pl.bco_loss(POLICY, REF, BETA, delta), expected)


def test_kto():
    d = t(0.4, -0.2, 1.0)
    desirable = torch.tensor([True, False, False])
    kl = 0.3
    expected = [2.0 * (1 - sig(0.1 * (0.4 - kl))), 0.5 * (1 - sig(0.1 * (kl + 0.2))), 0.5 * (1 - sig(0.1 * (kl - 1.0)))]
    close(pl.kto_loss(d, desirable, kl, 0.1, 2.0, 0.5), expected)


def test_ld_weights_cut_at_the_shorter_answer():
    # pair 0: chosen 3 tokens, rejected 1 token -> chosen weights 1, a, a; rejected 1
    # pair 1: chosen 2 tokens, rejected 2 tokens -> all 1
    counts = torch.tensor([3.0, 2.0, 1.0, 2.0])  # rows: chosen0, chosen1, rejected0, rejected1
    rows = torch.tensor([0, 0, 0, 1, 1, 2, 3, 3])
    pair_of = torch.tensor([0, 1, 0, 1])
    assert pl.ld_weights(rows, counts, pair_of, 0.25).tolist() == [1, 0.25, 0.25, 1, 1, 1, 1, 1]
