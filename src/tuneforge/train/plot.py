"""plots/loss.png: training loss (raw and smoothed) and eval loss against steps; for preference stages a second
panel with reward accuracy (or the reward model's accuracy) and reward margins; for online RL (grpo) a panel with
the mean reward and each reward function's mean, also drawn alone as plots/reward.png."""

from __future__ import annotations

from pathlib import Path
from typing import Any

PREFERENCE_CURVES = ("rewards/accuracies", "accuracy", "rewards/margins")
REWARD_CURVE = "reward"  # grpo's mean reward per step; each reward function's mean is rewards/<name>/mean


def is_reward_curve(key: str) -> bool:
    """The mean reward, or one reward function's mean (TRL's rewards/<name>/mean; dpo's rewards/* are not)."""
    return key == REWARD_CURVE or (key.startswith("rewards/") and key.endswith("/mean") and key.count("/") >= 2)


def reward_keys(records: list[dict[str, Any]]) -> list[str]:
    """The reward curves the records have: `reward` first, then each function's mean in first-seen order."""
    keys = dict.fromkeys(k for r in records for k in r if is_reward_curve(k))
    return sorted(keys, key=lambda k: k != REWARD_CURVE)


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
    rewards = reward_keys(records)
    panels = 1 + bool(extra) + bool(rewards)
    fig, axes = plt.subplots(1, panels, figsize=(7 + 5 * (panels - 1), 4.2), dpi=110, squeeze=False)
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
    if rewards:
        _reward_panel(axes[0][panels - 1], records, rewards)
    _save(fig, path)
    if rewards:
        plot_rewards(records, path.parent / "reward.png")
    return path


def plot_rewards(records: list[dict[str, Any]], path: Path) -> Path | None:
    """plots/reward.png: the mean reward (raw and smoothed) and each reward function's mean against steps; None
    when the records have no reward."""
    keys = reward_keys(records)
    if not keys:
        return None
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4.2), dpi=110)
    _reward_panel(ax, records, keys)
    _save(fig, path)
    return path


def _save(fig: Any, path: Path) -> None:
    import matplotlib.pyplot as plt

    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".tmp.png")
    fig.tight_layout()
    fig.savefig(tmp)
    plt.close(fig)
    tmp.replace(path)


def _reward_panel(ax: Any, records: list[dict[str, Any]], keys: list[str]) -> None:
    """The mean reward raw (light) and smoothed, and each reward function's mean smoothed."""
    for i, key in enumerate(keys):
        points = [(step, value) for step, value in series(records, key) if value is not None]
        if not points:
            continue
        steps, values = zip(*points)
        if key == REWARD_CURVE:
            ax.plot(steps, values, color="#fdae6b", alpha=0.6, label="reward")
            ax.plot(steps, smooth(list(values)), color="#e6550d", label="reward (smoothed)")
        else:
            ax.plot(steps, smooth(list(values)), "--", color=f"C{i % 10}", alpha=0.8, label=key)
    _finish(ax, "reward")


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
