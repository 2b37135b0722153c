"""GRPO and PPO math against numbers worked by hand (in the comments) or by plain-Python loops."""

from __future__ import annotations

import math

import pytest
import torch

from tuneforge.stages import rl_math as rl


def t(*rows) -> torch.Tensor:
    return torch.tensor(rows, dtype=torch.float64)


def approx(actual: torch.Tensor | float, expected, tol: float = 1e-9):
    value = actual.tolist() if isinstance(actual, torch.Tensor) else actual
    assert flat(value) == pytest.approx(flat(expected), rel=tol, abs=tol)


def flat(x):
    return [v for item in x for v in flat(item)] if isinstance(x, (list, tuple)) else [x]


def plain_whiten(values: list[float]) -> list[float]:
    """(x - mean) / sqrt(unbiased var + 1e-8), plain Python."""
    mean = sum(values) / len(values)
    var = sum((v - mean) ** 2 for v in values) / (len(values) - 1)
    return [(v - mean) / math.sqrt(var + 1e-8) for v in values]


# ------------------------------------------------------------------------------------------ advantages
# groups of 3: [1, 3, 2] (mean 2, centred [-1, 1, 0], Bessel std sqrt(2/2) = 1)
#              [2, 0, 4] (mean 2, centred [0, -2, 2], Bessel std sqrt(8/2) = 2)
REWARDS = t(1.0, 3.0, 2.0, 2.0, 0.0, 4.0)
CENTRED = [-1.0, 1.0, 0.0, 0.0, -2.0, 2.0]


def test_group_advantages_group_scale():
    expected = [-1 / 1.0001, 1 / 1.0001, 0.0, 0.0, -2 / 2.0001, 2 / 2.0001]
    approx(rl.group_advantages(REWARDS, 3, "group"), expected)


def test_group_advantages_batch_scale():
    # all six: mean 2, squared deviations 1+1+0+0+4+4 = 10, Bessel var 10/5 = 2
    expected = [c / (math.sqrt(2) + 1e-4) for c in CENTRED]
    approx(rl.group_advantages(REWARDS, 3, "batch"), expected)


def test_group_advantages_no_scale_and_equal_rewards():
    approx(rl.group_advantages(REWARDS, 3, "none"), CENTRED)
    # a group whose rewards are all equal has zero advantage (0 / (0 + 1e-4))
    approx(rl.group_advantages(t(5.0, 5.0, 1.0, 0.0), 2, "group"), [0.0, 0.0, 0.5 / (math.sqrt(0.5) + 1e-4),
                                                                      -0.5 / (math.sqrt(0.5) + 1e-4)])


def test_group_advantages_rejects_ragged_groups():
    with pytest.raises(ValueError, match="groups of 4"):
        rl.group_advantages(REWARDS, 4, "group")


# ------------------------------------------------------------------------------------------ grpo loss
# Row 0: A = +1, ratios [1.5, 1.0, 0.5], mask [1, 1, 1]
# Row 1: A = -2, ratios [1.5, 0.7, 1.0], mask [1, 1, 0]
# eps_low 0.2, eps_high 0.28 -> clip range [0.8, 1.28]
#   r0t0: min(1.5*1, 1.28*1) = 1.28 -> -1.28   (high-clipped: rho > 1.28 and A > 0)
#   r0t1: -1.0
#   r0t2: min(0.5, 0.8) = 0.5 -> -0.5          (rho < 0.8 but A > 0: not clipped)
#   r1t0: min(-3.0, -2.56) = -3.0 -> 3.0      (rho > 1.28 but A < 0: not clipped)
#   r1t1: min(-1.4, -1.6) = -1.6 -> 1.6       (low-clipped: rho < 0.8 and A < 0)
#   r1t2: padding -> 0
RATIOS = [[1.5, 1.0, 0.5], [1.5, 0.7, 1.0]]
OLD = t([-1.0, -2.0, -0.5], [-0.3, -1.2, -2.2])
NEW = OLD + torch.log(t(*RATIOS))
ADV = t(1.0, -2.0)
MASK = t([1, 1, 1], [1, 1, 0])
PER_TOKEN = [[-1.28, -1.0, -0.5], [3.0, 1.6, 0.0]]


def grpo_per_token(**kw):
    return rl.grpo_token_loss(NEW, OLD, ADV, MASK, epsilon_low=0.2, epsilon_high=0.28, **kw)


def test_grpo_token_loss_clips_asymmetrically():
    per_token, extras = grpo_per_token()
    approx(per_token, PER_TOKEN)
    assert extras["clip_high"].tolist() == [[1, 0, 0], [0, 0, 0]]
    assert extras["clip_low"].tolist() == [[0, 0, 0], [0, 1, 0]]
    assert extras["clip_region"].tolist() == [[1, 0, 0], [0, 1, 0]]
    assert "kl" not in extras


def test_grpo_token_loss_with_rho_one_is_minus_advantage():
    per_token, extras = rl.grpo_token_loss(OLD, OLD, ADV, MASK, epsilon_low=0.2, epsilon_high=0.2)
    approx(per_token, [[-1.0, -1.0, -1.0], [2.0, 2.0, 0.0]])
    assert extras["clip_region"].sum() == 0


def test_grpo_token_loss_adds_k3_kl():
    # ref - logp = d: [0, ln 2, -ln 2] and [ln 2, 0, 0]; k3(d) = e^d - d - 1
    # k3(0) = 0, k3(ln 2) = 1 - ln 2, k3(-ln 2) = ln 2 - 1/2
    d = t([0.0, math.log(2), -math.log(2)], [math.log(2), 0.0, 0.0])
    k3 = [[0.0, 1 - math.log(2), math.log(2) - 0.5], [1 - math.log(2), 0.0, 0.0]]
    per_token, extras = grpo_per_token(beta=0.1, ref_logps=NEW + d)
    approx(extras["kl"], k3)
    expected = [[PER_TOKEN[i][j] + (0.1 * k3[i][j] if MASK[i, j] else 0.0) for j in range(3)] for i in range(2)]
    approx(per_token, expected)
    # kl metric: masked mean over the 5 real tokens
    approx(rl.masked_mean(extras["kl"], MASK), (2 * (1 - math.log(2)) + math.log(2) - 0.5) / 5)


def test_grpo_token_loss_needs_ref_for_beta():
    with pytest.raises(ValueError, match="ref_logps"):
        grpo_per_token(beta=0.1)


@pytest.mark.parametrize(
    ("loss_type", "kwargs", "loss_sum", "units"),
    [
        # grpo: per-sequence means (-1.28 - 1 - 0.5) / 3 and (3 + 1.6) / 2, summed over 2 sequences
        ("grpo", {}, -2.78 / 3 + 2.3, 2.0),
        # bnpo and dapo: all masked tokens -2.78 + 4.6 = 1.82 over 5 tokens
        ("bnpo", {}, 1.82, 5.0),
        ("dapo", {}, 1.82, 5.0),
        ("dapo", {"num_items": 10.0}, 1.82, 10.0),
        # dr_grpo: over N * max_completion_length = 2 * 4
        ("dr_grpo", {}, 1.82, 8.0),
    ],
)
def test_grpo_reduce(loss_type, kwargs, loss_sum, units):
    per_token, _ = grpo_per_token()
    total, got_units = rl.grpo_reduce(per_token, MASK, loss_type, max_completion_length=4, **kwargs)
    approx(total, loss_sum)
    assert got_units == units


def test_grpo_reduce_loss_gives_gradient_to_unclipped_tokens_only():
    logps = NEW.clone().requires_grad_(True)
    per_token, _ = rl.grpo_token_loss(logps, OLD, ADV, MASK, epsilon_low=0.2, epsilon_high=0.28)
    total, units = rl.grpo_reduce(per_token, MASK, "bnpo", max_completion_length=4)
    (total / units).backward()
    # d/dlogp of -rho A (unclipped) = -rho A; clipped tokens and padding get 0; all divided by 5 tokens
    expected = [[0.0, -1.0 / 5, -0.5 / 5], [3.0 / 5, 0.0, 0.0]]
    approx(logps.grad, expected)


# ------------------------------------------------------------------------------------------ PPO


def test_whiten_masked_unbiased():
    values = t([1.0, 2.0, 3.0], [4.0, 9.0, 9.0])
    mask = t([1, 1, 1], [1, 0, 0])
    # masked values [1, 2, 3, 4]: mean 2.5, unbiased var (2.25 + 0.25 + 0.25 + 2.25) / 3 = 5/3
    scale = 1 / math.sqrt(5 / 3 + 1e-8)
    out = rl.whiten(values, mask)
    approx(out[0], [-1.5 * scale, -0.5 * scale, 0.5 * scale])
    approx(out[1, 0], 1.5 * scale)
    approx(rl.whiten(values, mask, shift_mean=False)[0, 0], -1.5 * scale + 2.5)


def test_ppo_rewards_kl_penalty_and_score_on_last_token():
    logps = t([-1.0, -2.0, -0.5], [-0.2, -0.4, -9.0])
    ref = t([-1.5, -2.0, -0.3], [-0.1, -0.9, -1.0])
    mask = t([1, 1, 1], [1, 1, 0])
    # kl = logp - ref: [0.5, 0, -0.2] and [-0.1, 0.5, pad]; r = -0.2 kl, score on the last real token
    expected = [[-0.1, 0.0, 0.04 + 2.0], [0.02, -0.1 - 1.0, 0.0]]
    approx(rl.ppo_rewards(t(2.0, -1.0), logps, ref, mask, kl_coef=0.2), expected)


def test_gae_three_tokens_by_hand():
    # row 0 (gamma 1, lam 0.95): r = [0.1, -0.2, 1.0], V = [0.5, 0.4, 0.3]
    #   delta2 = 1.0 + 0 - 0.3 = 0.7;  delta1 = -0.2 + 0.3 - 0.4 = -0.3;  delta0 = 0.1 + 0.4 - 0.5 = 0.0
    #   A2 = 0.7;  A1 = -0.3 + 0.95 * 0.7 = 0.365;  A0 = 0.0 + 0.95 * 0.365 = 0.34675
    #   R = A + V = [0.84675, 0.765, 1.0]
    # row 1, last token padded (its 99s are masked to 0): r = [0.5, 1.0], V = [0.2, 0.1]
    #   delta1 = 1.0 + 0 - 0.1 = 0.9;  delta0 = 0.5 + 0.1 - 0.2 = 0.4
    #   A1 = 0.9;  A0 = 0.4 + 0.95 * 0.9 = 1.255;  R = [1.455, 1.0, 0]
    rewards = t([0.1, -0.2, 1.0], [0.5, 1.0, 99.0])
    values = t([0.5, 0.4, 0.3], [0.2, 0.1, 99.0])
    mask = t([1, 1, 1], [1, 1, 0])
    advantages, returns = rl.gae(rewards, values, mask, gamma=1.0, lam=0.95)
    approx(returns, [[0.84675, 0.765, 1.0], [1.455, 1.0, 0.0]])
    whitened = plain_whiten([0.34675, 0.365, 0.7, 1.255, 0.9])
    approx(advantages[0], whitened[:3])
    approx(advantages[1, :2], whitened[3:])


def test_gae_discount():
    # gamma 0.5, lam 1: A_t = r_t + 0.5 V_{t+1} - V_t + 0.5 A_{t+1}, with V = 0: A = [1 + 0.5 (2 + 0.5 * 4), 4, 4]
    _, returns = rl.gae(t([1.0, 2.0, 4.0]), t([0.0, 0.0, 0.0]), t([1, 1, 1]), gamma=0.5, lam=1.0)
    approx(returns, [[3.0, 4.0, 4.0]])


def test_ppo_losses_clipped_policy_and_value():
    # policy, cliprange 0.2:
    #   t0: rho 1.5, A 1:  max(-1.5, -1.2) = -1.2  (clipped)
    #   t1: rho 0.5, A -1: max(0.5, 0.8) = 0.8     (clipped)
    #   t2: rho 1.1, A 2:  max(-2.2, -2.2) = -2.2  (not clipped)
    #   pg = (-1.2 + 0.8 - 2.2) / 3, clipfrac 2/3
    # value, cliprange_value 0.2 around old V:
    #   t0: V 1.0, old 0.5, R 0.6: clipped V 0.7; max(0.16, 0.01) = 0.16
    #   t1: V 0.35, old 0.1, R 0.4: clipped V 0.3; max(0.0025, 0.01) = 0.01 (clipped term larger)
    #   t2: V 0.5, old 0.45, R 0.5: 0
    #   vf = 0.5 * 0.17 / 3, vf_clipfrac 1/3;  loss = pg + 0.1 vf
    old = t([-1.0, -1.0, -1.0])
    log_ratio = [math.log(1.5), math.log(0.5), math.log(1.1)]
    new = old + t(log_ratio)
    loss, m = rl.ppo_losses(
        new, old, t([1.0, 0.35, 0.5]), t([0.5, 0.1, 0.45]), t([1.0, -1.0, 2.0]), t([0.6, 0.4, 0.5]), t([1, 1, 1])
    )
    pg, vf = -2.6 / 3, 0.5 * 0.17 / 3
    approx(m["policy_loss"], pg)
    approx(m["value_loss"], vf)
    approx(loss, pg + 0.1 * vf)
    approx(m["clipfrac"], 2 / 3)
    approx(m["vf_clipfrac"], 1 / 3)
    approx(m["approx_kl"], 0.5 * sum(x * x for x in log_ratio) / 3)
    approx(m["ratio"], (1.5 + 0.5 + 1.1) / 3)


def test_ppo_losses_skip_batch_over_ratio_threshold():
    old = t([-1.0, -1.0])
    new = old + math.log(20.0)
    loss, _ = rl.ppo_losses(new, old, t([0.0, 0.0]), t([0.0, 0.0]), t([1.0, 1.0]), t([1.0, 1.0]), t([1, 1]))
    assert loss.item() == 0.0


def test_adaptive_kl_controller():
    ctl = rl.AdaptiveKLController(init_kl_coef=0.2, target=6.0, horizon=10000)
    # KL 9: error 9/6 - 1 = 0.5 -> clipped 0.2; x (1 + 0.2 * 256 / 10000) = 1.00512
    approx(ctl.update(9.0, 256), 0.2 * 1.00512)
    # KL 3: error -0.5 -> -0.2; x (1 - 0.2 * 100 / 10000) = 0.998
    approx(ctl.update(3.0, 100), 0.2 * 1.00512 * 0.998)
    # KL 6.6: error 0.1 (inside the clip); x (1 + 0.1 * 1000 / 10000) = 1.01
    approx(ctl.update(6.6, 1000), 0.2 * 1.00512 * 0.998 * 1.01)
    restored = rl.AdaptiveKLController(init_kl_coef=1.0, target=1.0, horizon=1)
    restored.load_state_dict(ctl.state_dict())
    assert (restored.value, restored.target, restored.horizon) == (ctl.value, 6.0, 10000)


def test_running_moments():
    moments = rl.RunningMoments()
    # [1, 2, 3]: mean 2, unbiased std 1 (the initial count is 1e-24, so the prior vanishes)
    batch_mean, batch_std = moments.update(t(1.0, 2.0, 3.0))
    approx([batch_mean, batch_std, moments.mean, moments.std], [2.0, 1.0, 2.0, 1.0])
    # then [4, 5]: batch mean 4.5, std sqrt(0.5); all of 1..5: mean 3, unbiased var 10/4
    batch_mean, batch_std = moments.update(t(4.0, 5.0))
    approx([batch_mean, batch_std, moments.mean, moments.std], [4.5, math.sqrt(0.5), 3.0, math.sqrt(2.5)])
    approx(moments.var, 2.0)  # population variance of 1..5
    eps = torch.finfo(torch.float64).eps
    approx(moments.normalize(t(3.0, 6.0)), [0.0, 3 / (math.sqrt(2.5) + eps)])
    copy = rl.RunningMoments()
    copy.load_state_dict(moments.state_dict())
    assert copy.state_dict() == moments.state_dict()
