"""Reward functions for online RL (grpo): loading from config entries, built-ins, weighted scoring, metrics."""

from tuneforge.rewards.builtins import BUILTINS, answers_match, extract_answer
from tuneforge.rewards.loading import RewardEntry, RewardFunction, load_reward_function
from tuneforge.rewards.reward_set import RewardSet, reward_metrics

__all__ = [
    "BUILTINS",
    "RewardEntry",
    "RewardFunction",
    "RewardSet",
    "answers_match",
    "extract_answer",
    "load_reward_function",
    "reward_metrics",
]
