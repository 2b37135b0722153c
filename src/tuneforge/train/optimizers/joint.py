"""Several optimizers over disjoint parameters, driven by the loop as one."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch


class JointOptimizer(torch.optim.Optimizer):
    """Steps, zeroes, schedules and checkpoints its parts together (Muon + AdamW; per-parameter optimizers).

    param_groups are the parts' own group dicts, so a scheduler on this object sets every part's learning rate.
    With stepped_in_hooks the parts step from gradient hooks (layerwise GaLore/APOLLO) and step() does nothing.
    """

    def __init__(self, parts: dict[str, torch.optim.Optimizer], stepped_in_hooks: bool = False) -> None:
        self.parts = parts
        self.stepped_in_hooks = stepped_in_hooks
        super().__init__(self._groups(), {})

    def _groups(self) -> list[dict[str, Any]]:
        return [group for part in self.parts.values() for group in part.param_groups]

    @torch.no_grad()
    def step(self, closure: Callable[[], float] | None = None) -> float | None:
        """Step every part (nothing when the parts already stepped in gradient hooks)."""
        loss = closure() if closure is not None else None
        if not self.stepped_in_hooks:
            for part in self.parts.values():
                part.step()
        return loss

    def zero_grad(self, set_to_none: bool = True) -> None:
        """Zero every part's gradients."""
        for part in self.parts.values():
            part.zero_grad(set_to_none=set_to_none)

    def state_dict(self) -> dict[str, Any]:
        """Each part's state under its name."""
        return {"parts": {name: part.state_dict() for name, part in self.parts.items()}}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        """Restore each part; loading replaces a part's group dicts, so the joint groups are linked again."""
        saved = state_dict["parts"]
        if set(saved) != set(self.parts):
            raise ValueError(f"optimizer state has parts {sorted(saved)}, this optimizer {sorted(self.parts)}")
        for name, part in self.parts.items():
            part.load_state_dict(saved[name])
        self.param_groups = self._groups()
