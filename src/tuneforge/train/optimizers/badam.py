"""BAdam (the badam package): block-coordinate training, one block of parameters trains at a time.

Layer mode wraps train.optimizer in badam.BlockOptimizer: it marks only the active decoder layer trainable, keeps
fp32 copies of it, and moves to the next layer every switch_interval steps. Ratio mode (BlockOptimizerRatio) runs a
sparse Adam over an update_ratio share of every weight. Both are subclassed here only so a checkpoint also holds
where the block schedule is (active block, step, masks); the update rules are the package's own.
"""

from __future__ import annotations

import contextlib
import io
import re
import sys
import warnings
from typing import Any

import torch
from badam import BlockOptimizer, BlockOptimizerRatio
from torch import nn

from tuneforge.config.schema import TrainConfig
from tuneforge.errors import ConfigError
from tuneforge.train.optim import base_rule, decay_groups


def build_badam(model: nn.Module, train: TrainConfig, world_size: int = 1) -> torch.optim.Optimizer:
    """BlockOptimizer (layer mode) or BlockOptimizerRatio (ratio mode) over the model's parameters."""
    if world_size > 1:
        raise ConfigError("train.badam does not work with several processes here (LLaMA-Factory needs DeepSpeed "
                          "ZeRO-3 for it); train on one process or remove train.badam")
    named = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
    groups = decay_groups(named, train.weight_decay)
    groups.sort(key=lambda g: g["weight_decay"] == 0.0)  # BAdam reads the decay from the first group
    b = train.badam
    # -1 means never switch (LLaMA-Factory's meaning); the package would take `step % -1 == 0` as every step.
    interval = b.switch_interval if b.switch_interval > 0 else sys.maxsize
    with _quiet(b.verbose):
        if b.mode == "ratio":
            if train.optimizer not in ("adamw", "adam"):
                raise ConfigError("train.badam.mode=ratio runs its own sparse Adam; set train.optimizer=adamw")
            return ResumableBlockOptimizerRatio(
                param_groups=groups, named_parameters_list=named, update_ratio=b.update_ratio,
                switch_every=interval, mask_mode=b.mask_mode, verbose=b.verbose, include_embedding=False,
                # The package freezes the head unless told to include it; a tied head is the embedding, which
                # is frozen already (and the package finds no lm_head parameter to freeze).
                include_lm_head=not any("lm_head" in n for n, _ in named),
                lr=train.learning_rate, betas=(train.adam_beta1, train.adam_beta2), eps=train.adam_epsilon)
        cls, kwargs = base_rule(train)
        blocks = layer_blocks([n for n, _ in named])
        if b.start_block is not None and not 0 <= b.start_block < len(blocks):
            raise ConfigError(f"train.badam.start_block {b.start_block} is not a block; the model has "
                              f"{len(blocks)} (0 to {len(blocks) - 1})")
        return ResumableBlockOptimizer(
            base_optimizer=cls(groups, **kwargs), named_parameters_list=named, block_prefix_list=blocks,
            switch_block_every=interval, start_block=b.start_block, switch_mode=b.switch_mode,
            verbose=b.verbose)


def layer_blocks(names: list[str]) -> list[list[str]]:
    """One block per decoder layer, as BAdam infers them (the prefix 'model.layers.3.'), in model order."""
    blocks: list[list[str]] = []
    for name in names:
        match = re.match(r"(.*layers\.\d+\.)", name)
        if match and [match.group(1)] not in blocks:
            blocks.append([match.group(1)])
    if not blocks:
        raise ConfigError("train.badam.mode=layer: cannot find decoder layers ('layers.N.') in this model")
    return blocks


@contextlib.contextmanager
def _quiet(verbose: int):
    """BAdam prints each switch and warns about fp32 weights; keep that for verbose >= 1."""
    if verbose >= 1:
        yield
        return
    with warnings.catch_warnings(), contextlib.redirect_stdout(io.StringIO()):
        warnings.simplefilter("ignore")
        yield


class ResumableBlockOptimizer(BlockOptimizer):
    """badam.BlockOptimizer whose state_dict also holds the block schedule, and that stays quiet at verbose 0."""

    def __init__(self, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.state_dict = self._full_state_dict  # the package binds its base optimizer's state_dict here
        self.active_block = self._active_index()

    def _active_index(self) -> int:
        prefixes = self.active_param_prefixs[:len(self.active_param_prefixs) - len(self.active_modules)]
        return self.block_prefix_list.index(prefixes)

    def switch_trainable_params(self, verbose: int | None = None) -> None:
        """The package's switch, printing only at verbose >= 1 (it prints by default)."""
        with _quiet(self.verbose):
            super().switch_trainable_params(self.verbose if verbose is None else verbose)
        self.active_block = self._active_index()

    def _full_state_dict(self) -> dict[str, Any]:
        return {"base": self.base_optimizer.state_dict(), "active_block": self.active_block,
                "next_block": self.current_block_idx, "order": list(getattr(self, "block_order", [])),
                "global_step": self.global_step, "lr": [g["lr"] for g in self.param_groups]}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        """Activate the saved block, then restore its optimizer state, position and learning rates."""
        if "base" not in state_dict:  # a plain optimizer state (not one of ours)
            self.base_optimizer.load_state_dict(state_dict)
            return
        self.current_block_idx = state_dict["active_block"]
        # the master copies are rebuilt from the model's weights, which are exact: tuneforge trains BAdam's
        # weights in fp32 (run.load_for_training upcasts trainable weights), so nothing rounded is lost
        self.switch_trainable_params()
        self.base_optimizer.load_state_dict(state_dict["base"])
        self.current_block_idx, self.global_step = state_dict["next_block"], state_dict["global_step"]
        if self.switch_mode == "random":
            self.block_order = list(state_dict["order"])
        for group, lr in zip(self.param_groups, state_dict["lr"]):
            group["lr"] = lr


class ResumableBlockOptimizerRatio(BlockOptimizerRatio):
    """badam.BlockOptimizerRatio whose state_dict also holds the step count and each weight's mask offset."""

    def state_dict(self) -> dict[str, Any]:
        """torch's state plus BAdam's position: global step, mask offsets and seeds in parameter order."""
        sparse = [self.sparse_dict[p] for _, p in self.named_parameters_list]
        return {**super().state_dict(), "badam": {"global_step": self.global_step,
                                                  "offsets": [s["offset"] for s in sparse],
                                                  "seeds": [s["seed"] for s in sparse]}}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        """Restore torch's state, then BAdam's position (masks are drawn again from the restored offsets)."""
        state_dict = dict(state_dict)
        extra = state_dict.pop("badam", None)
        super().load_state_dict(state_dict)
        if extra is None:
            return
        self.global_step = extra["global_step"]
        for (_, param), offset, seed in zip(self.named_parameters_list, extra["offsets"], extra["seeds"]):
            self.sparse_dict[param]["offset"], self.sparse_dict[param]["seed"] = offset, seed
        self.mask_dict = {}
