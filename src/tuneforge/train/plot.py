"""plots/loss.png: training loss (raw and smoothed) and eval loss against steps; for preference stages a second
panel with reward accuracy (or the reward model's accuracy) and reward margins."""

from __future__ import annotations

from pathlib import Path
from typing import Any

PREFERENCE_CURVES = ("rewards/accuracies", "accuracy", "rewards/margins")


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


def series(records: list[dict[str, Any]], key: str) -> list[tuple[int, float]]:
    """(step, value) of every record that has `key`."""
    return [(r["step"], r[key]) for r in records if key in r]


def plot_loss(records: list[dict[str, Any]], path: Path) -> Path | None:
    """Draw the curves; returns the file written, or None when there is nothing to draw."""
    train, evals = series(records, "loss"), series(records, "eval_loss")
    if not train and not evals:
        return None
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    extra = [k for k in PREFERENCE_CURVES if series(records, k) or series(records, f"eval_{k}")]
    fig, axes = plt.subplots(1, 2 if extra else 1, figsize=(12 if extra else 7, 4.2), dpi=110, squeeze=False)
    ax = axes[0][0]
    if train:
        steps, losses = zip(*train)
        ax.plot(steps, losses, color="#9ecae1", alpha=0.6, label="train loss")
        ax.plot(steps, smooth(list(losses)), color="#1f77b4", label="train loss (smoothed)")
    if evals:
        steps, losses = zip(*evals)
        ax.plot(steps, losses, "o-", color="#d62728", label="eval loss")
    _finish(ax, "loss")
    if extra:
        _preference_panel(axes[0][1], records, extra)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".tmp.png")
    fig.tight_layout()
    fig.savefig(tmp)
    plt.close(fig)
    tmp.replace(path)
    return path


def _preference_panel(ax: Any, records: list[dict[str, Any]], keys: list[str]) -> None:
    """Accuracy (left axis, 0-1) and margins (right axis), train smoothed and eval as points."""
    margins = ax.twinx() if "rewards/margins" in keys else None
    colors = {"rewards/accuracies": "#2ca02c", "accuracy": "#2ca02c", "rewards/margins": "#9467bd"}
    for key in keys:
        target = margins if key == "rewards/margins" else ax
        points = series(records, key)
        if points:
            steps, values = zip(*points)
            target.plot(steps, smooth(list(values)), color=colors[key], label=key)
        evals = series(records, f"eval_{key}")
        if evals:
            steps, values = zip(*evals)
            target.plot(steps, values, "o--", color=colors[key], alpha=0.7, label=f"eval {key}")
    ax.set_ylim(-0.02, 1.02)
    _finish(ax, "accuracy")
    if margins is not None:
        margins.set_ylabel("reward margin")
        margins.legend(loc="lower right")


def _finish(ax: Any, ylabel: str) -> None:
    ax.set_xlabel("optimizer step")
    ax.set_ylabel(ylabel)
    ax.grid(alpha=0.3)
    ax.legend(loc="upper left")
