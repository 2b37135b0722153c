"""A weighted set of reward functions called with TRL's signature, and the reward metrics of a rollout.

TRL's rules (`GRPOTrainer._calculate_rewards` and `_generate_and_score_completions`):
- each function is called as `fn(prompts=..., completions=..., completion_ids=..., trainer_state=..., **columns)`,
  the columns being the dataset's extra columns as lists aligned with the completions;
- async functions run concurrently (asyncio.gather);
- a None reward becomes NaN: that function is skipped for that sample;
- the reward is the weighted nansum over functions, so a sample where every function returned None gets 0.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import inspect
import logging
import math
import numbers
from collections.abc import Awaitable, Mapping, Sequence
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from tuneforge.errors import ConfigError
from tuneforge.rewards.loading import RewardEntry, RewardFunction, load_reward_function
from tuneforge.stages.rl_math import group_std

log = logging.getLogger(__name__)

# Row keys that are not passed as columns: TRL drops these, and the others are our own arguments.
RESERVED = frozenset({"prompt", "completion", "completion_ids", "prompts", "completions", "trainer_state"})


class RewardSet:
    """Reward functions with per-function weights (default 1.0 each)."""

    def __init__(
        self,
        entries: Sequence[RewardEntry],
        weights: Sequence[float] | None = None,
        base_dir: Path | None = None,
    ) -> None:
        if not entries:
            raise ConfigError("reward_funcs is empty; list at least one reward function")
        if weights is not None and len(weights) != len(entries):
            raise ConfigError(
                f"reward_weights has {len(weights)} values but reward_funcs has {len(entries)} entries; "
                "give one weight per function"
            )
        self.functions: list[RewardFunction] = [load_reward_function(e, base_dir) for e in entries]
        self.names = unique_names([f.name for f in self.functions])
        self.weights = torch.tensor([1.0] * len(entries) if weights is None else list(weights), dtype=torch.float32)

    def __call__(
        self,
        prompts: list[Any],
        completions: list[Any],
        completion_ids: list[list[int]],
        columns: Mapping[str, Sequence[Any]] | None = None,
        trainer_state: Any = None,
    ) -> tuple[Tensor, Tensor, list[str]]:
        """Score N completions: (weighted rewards [N], per-function rewards [N, F] with NaN for None, names)."""
        n = len(completions)
        if len(prompts) != n or len(completion_ids) != n:
            raise ValueError(f"{len(prompts)} prompts, {n} completions, {len(completion_ids)} id lists differ")
        kwargs: dict[str, Any] = {"prompts": prompts, "completions": completions, "completion_ids": completion_ids}
        for key, values in (columns or {}).items():
            if key in RESERVED:
                continue
            if len(values) != n:
                raise ValueError(f"column '{key}' has {len(values)} values for {n} completions")
            kwargs[key] = list(values)
        kwargs["trainer_state"] = trainer_state
        outputs: list[Any] = []
        pending: dict[int, Awaitable[Any]] = {}
        for i, func in enumerate(self.functions):
            args = kwargs if func.accepts is None else {k: v for k, v in kwargs.items() if k in func.accepts}
            out = func.fn(**args)
            if inspect.isawaitable(out):
                pending[i] = out
            outputs.append(out)
        for i, value in zip(pending, run_awaitables(list(pending.values())), strict=True):
            outputs[i] = value
        per_function = torch.stack(
            [to_tensor(name, out, n) for name, out in zip(self.names, outputs, strict=True)], dim=1
        )  # [N, F]
        all_none = per_function.isnan().all(dim=1)
        if all_none.any():
            i = int(all_none.nonzero()[0])
            log.warning("every reward function returned None for completion %d (prompt %r); its reward is 0",
                        i, prompts[i])
        rewards = (per_function * self.weights.unsqueeze(0)).nansum(dim=1)
        return rewards, per_function, list(self.names)


def unique_names(names: list[str]) -> list[str]:
    """Metric names, with _2, _3 ... appended to repeats (two entries may load functions of the same name)."""
    seen: dict[str, int] = {}
    out = []
    for name in names:
        seen[name] = seen.get(name, 0) + 1
        out.append(name if seen[name] == 1 else f"{name}_{seen[name]}")
    return out


def to_tensor(name: str, out: Any, n: int) -> Tensor:
    """Check a function's output (N numbers or None) and make it a float32 [N] tensor with NaN for None."""
    if isinstance(out, (str, bytes)) or not isinstance(out, Sequence | Tensor):
        raise ConfigError(f"reward function '{name}' returned {type(out).__name__}; it must return a list of floats")
    values = out.tolist() if isinstance(out, Tensor) else list(out)
    if len(values) != n:
        raise ConfigError(
            f"reward function '{name}' returned {len(values)} rewards for {n} completions; "
            "it must return one float (or None) per completion"
        )
    bad = next((v for v in values if v is not None and not isinstance(v, numbers.Real)), None)
    if bad is not None:
        raise ConfigError(f"reward function '{name}' returned {bad!r}; each reward must be a number or None")
    return torch.tensor([math.nan if v is None else float(v) for v in values], dtype=torch.float32)


def run_awaitables(awaitables: list[Awaitable[Any]]) -> list[Any]:
    """Await all concurrently; from inside a running event loop, in a fresh loop on a worker thread."""
    if not awaitables:
        return []

    async def gather() -> list[Any]:
        return list(await asyncio.gather(*awaitables))

    try:
        asyncio.get_running_loop()
    except RuntimeError:
        return asyncio.run(gather())
    with concurrent.futures.ThreadPoolExecutor(max_workers=1) as pool:
        return pool.submit(asyncio.run, gather()).result()


def nanstd(x: Tensor) -> Tensor:
    """Bessel std over the non-NaN values of a 1-D tensor (NaN with fewer than two), as TRL's `nanstd`."""
    kept = x[~x.isnan()]
    return kept.std() if kept.numel() > 1 else torch.tensor(math.nan)


def reward_metrics(
    rewards: Tensor, per_function: Tensor, names: Sequence[str], group_size: int, scale: str = "group"
) -> dict[str, float]:
    """TRL's rollout metrics: rewards/<name>/mean and /std (over the samples the function scored), `reward`
    (mean reward), `reward_std` (mean group std, or the batch std when scale is "batch") and
    `frac_reward_zero_std` (share of groups whose rewards are all equal)."""
    out: dict[str, float] = {}
    for i, name in enumerate(names):
        column = per_function[:, i]
        out[f"rewards/{name}/mean"] = float(column.nanmean())
        out[f"rewards/{name}/std"] = float(nanstd(column))
    stds = group_std(rewards, group_size)
    out["reward"] = float(rewards.mean())
    out["reward_std"] = float(rewards.std() if scale == "batch" else stds.mean())
    out["frac_reward_zero_std"] = float(torch.isclose(stds, torch.zeros_like(stds)).float().mean())
    return out
