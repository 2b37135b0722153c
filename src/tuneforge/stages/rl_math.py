"""Online-RL math for the ppo and grpo stages, over rollout tensors; no models, no batches.

Shapes: N completions, T completion tokens (right-padded); `mask` [N, T] is 1 on real completion tokens.
GRPO follows TRL's `GRPOTrainer` (`_generate_and_score_completions`, `_compute_loss`); PPO follows TRL 0.9.6's
`PPOTrainer` (`compute_rewards`, `compute_advantages`, `loss`) and `trl/core.py` (../shared/STAGES.md §5-§6).
"""

from __future__ import annotations

import math
from typing import Any, Literal

import torch
from torch import Tensor

ScaleRewards = Literal["group", "batch", "none"]
GrpoLossType = Literal["grpo", "bnpo", "dr_grpo", "dapo"]

STD_EPS = 1e-4  # TRL's advantage denominator: (std + 1e-4)


# ----------------------------------------------------------------------------------------------- GRPO


def group_std(rewards: Tensor, group_size: int) -> Tensor:
    """Bessel std of each contiguous group of `group_size`, repeated to [N] (NaN for a group of one)."""
    return rewards.view(-1, group_size).std(dim=1).repeat_interleave(group_size)


def group_advantages(rewards: Tensor, group_size: int, scale: ScaleRewards) -> Tensor:
    """r - mean of its group, divided by (std + 1e-4): the group's Bessel std ("group"), the std of all
    N rewards ("batch") or not at all ("none", Dr. GRPO). rewards [N], N a multiple of group_size -> [N]."""
    if rewards.numel() % group_size:
        raise ValueError(f"{rewards.numel()} rewards do not split into groups of {group_size}")
    grouped = rewards.view(-1, group_size)  # [N/G, G]
    centred = (grouped - grouped.mean(dim=1, keepdim=True)).reshape(-1)
    if scale == "group":
        return centred / (group_std(rewards, group_size) + STD_EPS)
    if scale == "batch":
        return centred / (rewards.std() + STD_EPS)
    if scale == "none":
        return centred
    raise ValueError(f"unknown scale_rewards '{scale}'; use group, batch or none")


def k3_kl(logps: Tensor, ref_logps: Tensor) -> Tensor:
    """Schulman's k3 estimator of KL(policy || ref) per token: exp(ref - logp) - (ref - logp) - 1 (>= 0)."""
    d = ref_logps - logps
    return torch.exp(d) - d - 1


def grpo_token_loss(
    logps: Tensor,
    old_logps: Tensor,
    advantages: Tensor,
    mask: Tensor,
    *,
    epsilon_low: float,
    epsilon_high: float,
    beta: float = 0.0,
    ref_logps: Tensor | None = None,
) -> tuple[Tensor, dict[str, Tensor]]:
    """Per-token clipped surrogate [N, T]: -min(rho A, clip(rho, 1-eps_low, 1+eps_high) A) + beta k3,
    rho = exp(logp - old_logp), A [N] broadcast over tokens. The dict holds per-token float indicators
    `clip_low` (rho < 1-eps_low and A < 0), `clip_high` (rho > 1+eps_high and A > 0), `clip_region` (either),
    and `kl` (k3) when ref_logps is given; reduce them with `masked_mean`. `mask` only marks padding here
    (TRL masks in the reduction), and padded positions of the result are zeroed."""
    if beta != 0.0 and ref_logps is None:
        raise ValueError("grpo_token_loss: beta != 0 needs ref_logps")
    adv = advantages.unsqueeze(1)  # [N, 1]
    ratio = torch.exp(logps - old_logps)  # [N, T]
    clipped = torch.clamp(ratio, 1 - epsilon_low, 1 + epsilon_high)
    per_token = -torch.min(ratio * adv, clipped * adv)
    extras: dict[str, Tensor] = {}
    if ref_logps is not None:
        kl = k3_kl(logps, ref_logps)
        extras["kl"] = kl.detach()
        if beta != 0.0:
            per_token = per_token + beta * kl
    low = (ratio < 1 - epsilon_low) & (adv < 0)
    high = (ratio > 1 + epsilon_high) & (adv > 0)
    extras["clip_low"] = low.to(ratio.dtype)
    extras["clip_high"] = high.to(ratio.dtype)
    extras["clip_region"] = (low | high).to(ratio.dtype)
    return per_token * mask, extras


def grpo_reduce(
    per_token: Tensor,
    mask: Tensor,
    loss_type: GrpoLossType,
    max_completion_length: int,
    num_items: float | None = None,
) -> tuple[Tensor, float]:
    """(loss_sum, units) with loss_sum / units equal to TRL's normalisation of each loss type:

    - grpo:    mean_i(sum_t per*m / sum_t m)   -> (sum_i of per-sequence means, N sequences)
    - bnpo:    sum per*m / sum m               -> (sum per*m, active tokens)
    - dr_grpo: sum per*m / (N * max_len)       -> (sum per*m, N * max_completion_length)
    - dapo:    sum per*m / active tokens       -> (sum per*m, num_items if given else active tokens)

    TRL divides bnpo's micro-batch mean by the accumulation steps, while dapo divides by the active tokens of the
    whole window (num_items_in_batch / num_processes). Our loop adds loss_sum and units over the whole accumulation
    window and all processes and divides once, so here bnpo and dapo give the same gradient (TRL's dapo), and grpo
    and dr_grpo average over every completion of the window rather than per micro-batch (equal when micro-batches
    have the same number of completions). Pass `num_items` only when the caller already knows the token count its
    units must add up to.
    """
    m = mask.to(per_token.dtype)
    masked = per_token * m  # [N, T]
    n = per_token.size(0)
    if loss_type == "grpo":
        per_seq = masked.sum(-1) / m.sum(-1).clamp(min=1.0)
        return per_seq.sum(), float(n)
    if loss_type == "bnpo":
        return masked.sum(), float(m.sum().item())
    if loss_type == "dr_grpo":
        return masked.sum(), float(n * max_completion_length)
    if loss_type == "dapo":
        return masked.sum(), float(num_items) if num_items is not None else float(m.sum().item())
    raise ValueError(f"unknown grpo loss type '{loss_type}'; use grpo, bnpo, dr_grpo or dapo")


def masked_sum_count(values: Tensor, mask: Tensor) -> tuple[Tensor, Tensor]:
    """(sum of values over the mask, mask count): a [sum, count] metric pair's two halves."""
    m = mask.to(values.dtype)
    return (values * m).sum(), m.sum()


def masked_mean(values: Tensor, mask: Tensor, dim: int | None = None) -> Tensor:
    """Mean of values where mask is 1 (over all elements, or along `dim`)."""
    m = mask.to(values.dtype)
    if dim is None:
        return (values * m).sum() / m.sum()
    return (values * m).sum(dim) / m.sum(dim)


# ----------------------------------------------------------------------------------------------- PPO


def masked_var(values: Tensor, mask: Tensor, unbiased: bool = True) -> Tensor:
    """Variance over the mask; unbiased (x n/(n-1)) as TRL's `masked_var`. Needs at least two masked values."""
    mean = masked_mean(values, mask)
    var = masked_mean((values - mean) ** 2, mask)
    if unbiased:
        count = mask.sum()
        if count < 2:
            raise ValueError("whitening needs at least two response tokens in the batch; raise the batch size")
        var = var * count / (count - 1)
    return var


def whiten(values: Tensor, mask: Tensor, shift_mean: bool = True) -> Tensor:
    """(x - mean) / sqrt(var + 1e-8) over the mask (unbiased var); with shift_mean=False the mean is added back."""
    mean, var = masked_mean(values, mask), masked_var(values, mask)
    out = (values - mean) * torch.rsqrt(var + 1e-8)
    return out if shift_mean else out + mean


def ppo_rewards(scores: Tensor, logps: Tensor, ref_logps: Tensor, mask: Tensor, kl_coef: float) -> Tensor:
    """Per-token rewards [N, T]: -kl_coef (logp - ref) on every token, plus the score [N] on each row's last
    masked token. Padded positions are zero."""
    m = mask.to(logps.dtype)
    rewards = -kl_coef * (logps - ref_logps) * m
    positions = torch.arange(mask.size(1), device=mask.device).expand_as(mask)
    last = torch.where(mask.bool(), positions, -1).max(dim=1).values  # [N] index of the last response token
    if (last < 0).any():
        raise ValueError("ppo_rewards: a response has no tokens in the mask")
    rows = torch.arange(mask.size(0), device=mask.device)
    rewards[rows, last] += scores.to(rewards.dtype)
    return rewards


def gae(
    rewards: Tensor, values: Tensor, mask: Tensor, gamma: float = 1.0, lam: float = 0.95, whiten_rewards: bool = False
) -> tuple[Tensor, Tensor]:
    """Generalised advantage estimation over [N, T]: delta_t = r_t + gamma V_{t+1} - V_t, A_t = sum_k
    (gamma lam)^k delta_{t+k}, returns R = A + V (before whitening), then A whitened over the mask.
    Values and rewards are zeroed outside the mask first (so V after the last token is 0), as in TRL 0.9.6;
    with whiten_rewards the rewards are whitened without mean shift before the recursion."""
    m = mask.to(values.dtype)
    values, rewards = values * m, rewards * m
    if whiten_rewards:
        rewards = whiten(rewards, m, shift_mean=False)
    steps = rewards.size(1)
    running = torch.zeros_like(rewards[:, 0])
    reversed_adv = []
    for t in reversed(range(steps)):
        next_value = values[:, t + 1] if t < steps - 1 else torch.zeros_like(running)
        delta = rewards[:, t] + gamma * next_value - values[:, t]
        running = delta + gamma * lam * running
        reversed_adv.append(running)
    advantages = torch.stack(reversed_adv[::-1], dim=1)
    returns = advantages + values
    return whiten(advantages, m).detach(), returns.detach()


def ppo_losses(
    logps: Tensor,
    old_logps: Tensor,
    values: Tensor,
    old_values: Tensor,
    advantages: Tensor,
    returns: Tensor,
    mask: Tensor,
    *,
    cliprange: float = 0.2,
    cliprange_value: float = 0.2,
    vf_coef: float = 0.1,
    ratio_threshold: float = 10.0,
) -> tuple[Tensor, dict[str, Tensor]]:
    """PPO loss = pg + vf_coef * vf, token means over the mask. pg = max(-A rho, -A clip(rho, 1 +- cliprange)),
    vf = 0.5 max((V - R)^2, (clip(V, V_old +- cliprange_value) - R)^2). `values` are the current value-head
    predictions, `old_values` the rollout's. When the mean ratio exceeds ratio_threshold the loss is zeroed
    (TRL skips such a batch). Metrics: policy_loss, value_loss, clipfrac, vf_clipfrac, approx_kl, policy_kl, ratio."""
    v_clipped = torch.max(torch.min(values, old_values + cliprange_value), old_values - cliprange_value)
    vf1, vf2 = (values - returns) ** 2, (v_clipped - returns) ** 2
    vf_loss = 0.5 * masked_mean(torch.max(vf1, vf2), mask)
    log_ratio = logps - old_logps
    ratio = torch.exp(log_ratio)
    pg1 = -advantages * ratio
    pg2 = -advantages * torch.clamp(ratio, 1.0 - cliprange, 1.0 + cliprange)
    pg_loss = masked_mean(torch.max(pg1, pg2), mask)
    loss = pg_loss + vf_coef * vf_loss
    mean_ratio = masked_mean(ratio, mask).detach()
    if mean_ratio > ratio_threshold:
        loss = loss * 0.0
    metrics = {
        "policy_loss": pg_loss.detach(),
        "value_loss": vf_loss.detach(),
        "clipfrac": masked_mean((pg2 > pg1).to(ratio.dtype), mask),
        "vf_clipfrac": masked_mean((vf2 > vf1).to(ratio.dtype), mask),
        "approx_kl": 0.5 * masked_mean(log_ratio.detach() ** 2, mask),
        "policy_kl": masked_mean(-log_ratio.detach(), mask),
        "ratio": mean_ratio,
    }
    return loss, metrics


class AdaptiveKLController:
    """Ziegler et al.'s adaptive KL coefficient: value *= 1 + clip(kl / target - 1, +-0.2) * n_steps / horizon."""

    def __init__(self, init_kl_coef: float = 0.2, target: float = 6.0, horizon: int = 10000) -> None:
        self.value = init_kl_coef
        self.target = target
        self.horizon = horizon

    def update(self, current_kl: float, n_steps: int) -> float:
        """Move the coefficient toward the KL target after n_steps samples; returns the new value."""
        error = min(max(float(current_kl) / self.target - 1, -0.2), 0.2)
        self.value *= 1 + error * n_steps / self.horizon
        return self.value

    def state_dict(self) -> dict[str, float]:
        """The coefficient and settings, for checkpoints."""
        return {"value": self.value, "target": self.target, "horizon": self.horizon}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Restore from `state_dict()`."""
        self.value = float(state["value"])
        self.target = float(state["target"])
        self.horizon = int(state["horizon"])


class RunningMoments:
    """Running mean and std of a stream of scores (TRL's `RunningMoments`, used by ppo_score_norm).

    Starts at mean 0, var 1 with a vanishing count (1e-24), so the first batch sets the moments; `std` is the
    unbiased std of everything seen. Pass the scores of all processes to `update` (gather first)."""

    def __init__(self) -> None:
        self.mean = 0.0
        self.var = 1.0
        self.std = 1.0
        self.count = 1e-24

    def update(self, xs: Tensor) -> tuple[float, float]:
        """Fold a batch in; returns the batch's mean and unbiased std."""
        xs = xs.detach().double().reshape(-1)
        n = xs.numel()
        batch_var, batch_mean = (float(v) for v in torch.var_mean(xs, unbiased=False))
        delta = batch_mean - self.mean
        total = self.count + n
        old_sum = self.var * self.count + delta**2 * self.count * n / total
        self.mean += delta * n / total
        self.var = (old_sum + batch_var * n) / total
        self.std = math.sqrt(self.var * total / (total - 1))
        self.count = total
        return batch_mean, math.sqrt(batch_var * n / (n - 1)) if n > 1 else 0.0

    def normalize(self, scores: Tensor) -> Tensor:
        """(score - running mean) / (running std + eps), eps the dtype's machine epsilon (TRL's score norm)."""
        eps = torch.finfo(scores.dtype).eps
        return (scores - self.mean) / (self.std + eps)

    def state_dict(self) -> dict[str, float]:
        """Moments and count, for checkpoints."""
        return {"mean": self.mean, "var": self.var, "std": self.std, "count": self.count}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Restore from `state_dict()`."""
        self.mean, self.var = float(state["mean"]), float(state["var"])
        self.std, self.count = float(state["std"]), float(state["count"])
