"""A scalar value head on a causal LM (reward models, PPO's critic), stored in LLaMA-Factory's file format.

LLaMA-Factory (through TRL's AutoModelForCausalLMWithValueHead) keeps the head as `v_head.summary` = Linear(hidden,
1) with bias, and saves it beside the adapter or model as `value_head.safetensors` with the keys
`v_head.summary.weight` [1, hidden] and `v_head.summary.bias` [1] (metadata {"format": "pt"}); older runs wrote
`value_head.bin` (torch.save). Both are read here; only safetensors is written.
"""

from __future__ import annotations

from pathlib import Path

import torch
from torch import Tensor, nn

from tuneforge.errors import ModelError

VALUE_HEAD_FILE = "value_head.safetensors"
VALUE_HEAD_BIN = "value_head.bin"
KEYS = ("v_head.summary.weight", "v_head.summary.bias")


class ValueHead(nn.Module):
    """Dropout, then Linear(hidden, 1): one scalar per position."""

    def __init__(self, hidden: int, dropout: float = 0.1) -> None:
        super().__init__()
        self.dropout = nn.Dropout(dropout)
        self.summary = nn.Linear(hidden, 1)

    def forward(self, hidden: Tensor) -> Tensor:
        """[..., h] -> [...] in fp32."""
        return self.summary(self.dropout(hidden.to(self.summary.weight.dtype))).squeeze(-1).float()


class WithValueHead(nn.Module):
    """The language model (`pretrained_model`, adapters included) and its value head (`v_head`)."""

    def __init__(self, model: nn.Module, head: ValueHead) -> None:
        super().__init__()
        self.pretrained_model = model
        self.v_head = head

    @property
    def config(self):  # noqa: ANN201  (the LM's transformers config, for code that reads model.config)
        return self.pretrained_model.config


def hidden_size(model: nn.Module) -> int:
    """The model's hidden size from its transformers config."""
    config = model.config
    size = getattr(config, "hidden_size", None) or getattr(config.get_text_config(), "hidden_size", None)
    if not size:
        raise ModelError("cannot find the model's hidden size for a value head")
    return int(size)


def save_value_head(folder: Path, head: ValueHead) -> Path:
    """Write value_head.safetensors in LLaMA-Factory's layout."""
    from safetensors.torch import save_file

    folder.mkdir(parents=True, exist_ok=True)
    state = {KEYS[0]: head.summary.weight.detach().float().cpu().contiguous(),
             KEYS[1]: head.summary.bias.detach().float().cpu().contiguous()}
    path = folder / VALUE_HEAD_FILE
    save_file(state, str(path), metadata={"format": "pt"})
    return path


def find_value_head(folder: Path) -> Path | None:
    """value_head.safetensors (or LF's older value_head.bin) in a folder, if there is one."""
    for name in (VALUE_HEAD_FILE, VALUE_HEAD_BIN):
        if (folder / name).is_file():
            return folder / name
    return None


def load_value_head(path: Path, head: ValueHead) -> None:
    """Copy a saved head into `head`; a file without LF's keys or with another hidden size is one clear error."""
    if path.suffix == ".safetensors":
        from safetensors.torch import load_file

        state = load_file(str(path))
    else:
        state = torch.load(path, map_location="cpu", weights_only=True)
    if not all(k in state for k in KEYS):
        raise ModelError(f"{path}: not a value head (expected keys {', '.join(KEYS)}, found {', '.join(state)})")
    if tuple(state[KEYS[0]].shape) != tuple(head.summary.weight.shape):
        raise ModelError(f"{path}: value head of shape {tuple(state[KEYS[0]].shape)} does not fit this model "
                         f"(hidden size {head.summary.weight.shape[1]})")
    with torch.no_grad():
        head.summary.weight.copy_(state[KEYS[0]])
        head.summary.bias.copy_(state[KEYS[1]])
