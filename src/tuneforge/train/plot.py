"""plots/loss.png: training loss (raw and smoothed) and eval loss against steps."""

from __future__ import annotations

from pathlib import Path
from typing import Any


def smooth(values: list[float], weight: float | None = None) -> list[float]:
    """Exponential moving average, debiased; the weight grows with the number of points (as LF's plot does)."""
    if not values:
        return []
    if weight is None:
        weight = 1.8 * (1 / (1 + 2.718 ** (-0.05 * len(values))) - 0.5)
    out, last = [], values[0]
    for v in values:
        last = last * weight + (1 - weight) * v
        out.append(last)
    return out


def plot_loss(records: list[dict[str, Any]], path: Path) -> Path | None:
    """Draw the loss curves; returns the file written, or None when there is nothing to draw."""
    train = [(r["step"], r["loss"]) for r in records if "loss" in r]
    evals = [(r["step"], r["eval_loss"]) for r in records if "eval_loss" in r]
    if not train and not evals:
        return None
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4.2), dpi=110)
    if train:
        steps, losses = zip(*train)
        ax.plot(steps, losses, color="#9ecae1", alpha=0.6, label="train loss")
        ax.plot(steps, smooth(list(losses)), color="#1f77b4", label="train loss (smoothed)")
    if evals:
        steps, losses = zip(*evals)
        ax.plot(steps, losses, "o-", color="#d62728", label="eval loss")
    ax.set_xlabel("optimizer step")
    ax.set_ylabel("loss")
    ax.grid(alpha=0.3)
    ax.legend()
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".tmp.png")
    fig.tight_layout()
    fig.savefig(tmp)
    plt.close(fig)
    tmp.replace(path)
    return path
