"""Preference-loss math over per-pair log-prob tensors of shape [b]; no models, no batches.

Notation (../shared/STAGES.md §3.2): pi_c, pi_r policy log-probs of chosen/rejected, rho_c, rho_r the reference's,
d_c = pi_c - rho_c, d_r = pi_r - rho_r, z = d_c - d_r. Every function returns per-pair losses [b] (kto_pair: the
two halves averaged per pair), so the loop can sum them and divide by the pairs of the whole window.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor


@dataclass
class PairLogps:
    """Log-probs of the chosen and rejected answers, each [b]."""

    chosen: Tensor
    rejected: Tensor


def sigmoid_loss(policy: PairLogps, ref: PairLogps, beta: float, smoothing: float = 0.0) -> Tensor:
    """DPO (cDPO with label smoothing eps): -(1-eps) logsig(beta z) - eps logsig(-beta z)."""
    z = (policy.chosen - ref.chosen) - (policy.rejected - ref.rejected)  # [b]
    return -(1 - smoothing) * F.logsigmoid(beta * z) - smoothing * F.logsigmoid(-beta * z)


def hinge_loss(policy: PairLogps, ref: PairLogps, beta: float) -> Tensor:
    """SLiC-style hinge: relu(1 - beta z)."""
    z = (policy.chosen - ref.chosen) - (policy.rejected - ref.rejected)
    return torch.relu(1 - beta * z)


def ipo_loss(policy: PairLogps, ref: PairLogps, beta: float) -> Tensor:
    """IPO: (z - 1 / (2 beta))^2, on per-token mean log-probs."""
    z = (policy.chosen - ref.chosen) - (policy.rejected - ref.rejected)
    return (z - 1 / (2 * beta)) ** 2


def kto_pair_loss(policy: PairLogps, ref: PairLogps, beta: float) -> Tensor:
    """Paired KTO: KL_c = clamp(mean d_c, 0), KL_r = clamp(mean d_r, 0) over the batch (detached, as KTO's
    reference point); per pair the mean of 1 - sig(beta (d_c - KL_r)) and 1 - sig(beta (KL_c - d_r))."""
    d_c, d_r = policy.chosen - ref.chosen, policy.rejected - ref.rejected
    kl_c, kl_r = d_c.mean().clamp(min=0).detach(), d_r.mean().clamp(min=0).detach()
    return ((1 - torch.sigmoid(beta * (d_c - kl_r))) + (1 - torch.sigmoid(beta * (kl_c - d_r)))) / 2


def orpo_parts(policy: PairLogps) -> tuple[Tensor, Tensor]:
    """ORPO on mean log-probs: (sft part -pi_c, odds-ratio part -logsig(log odds(c) - log odds(r)))."""
    log_odds = (policy.chosen - policy.rejected) - (
        torch.log1p(-torch.exp(policy.chosen)) - torch.log1p(-torch.exp(policy.rejected)))
    return -policy.chosen, -F.logsigmoid(log_odds)


def simpo_loss(policy: PairLogps, beta: float, gamma: float) -> Tensor:
    """SimPO on mean log-probs: -logsig(beta (pi_c - pi_r) - gamma)."""
    return -F.logsigmoid(beta * (policy.chosen - policy.rejected) - gamma)


def bco_loss(policy: PairLogps, ref: PairLogps, beta: float, delta: Tensor | float) -> Tensor:
    """BCO with reward shift delta: -logsig(beta d_c - delta) - logsig(-(beta d_r - delta))."""
    r_c, r_r = beta * (policy.chosen - ref.chosen), beta * (policy.rejected - ref.rejected)
    return -F.logsigmoid(r_c - delta) - F.logsigmoid(-(r_r - delta))


def kto_loss(d: Tensor, desirable: Tensor, kl: Tensor | float, beta: float, w_desirable: float,
             w_undesirable: float) -> Tensor:
    """KTO per row [b]: desirable w_D (1 - sig(beta (d - KL))), undesirable w_U (1 - sig(beta (KL - d)))."""
    good = w_desirable * (1 - torch.sigmoid(beta * (d - kl)))
    bad = w_undesirable * (1 - torch.sigmoid(beta * (kl - d)))
    return torch.where(desirable, good, bad)


def ld_weights(rows: Tensor, counts: Tensor, pair_of: Tensor, alpha: float) -> Tensor:
    """LD-DPO token weights: 1 for an answer's first min(len_c, len_r) tokens, alpha past them.

    rows [n]: the row of each trained token (tokens of a row are consecutive); counts [2b]: trained tokens per
    row; pair_of [2b]: the pair index of each row (chosen rows first, then rejected).
    """
    starts = torch.cumsum(counts, 0) - counts  # [2b] index of each row's first token
    position = torch.arange(rows.shape[0], device=rows.device) - starts[rows].long()  # [n] index within its answer
    half = counts.shape[0] // 2
    shared = torch.minimum(counts[:half], counts[half:])  # [b]
    limit = shared[pair_of][rows]  # [n]
    return torch.where(position < limit, torch.ones_like(limit, dtype=torch.float32),
                       torch.full_like(limit, alpha, dtype=torch.float32))
