"""Tiny rm and dpo LoRA runs, and reference computations that use only transformers, peft and safetensors."""

from __future__ import annotations

from pathlib import Path

import torch

from ..conftest import train_tiny_run

RM = ["stage=rm", "data.dataset=dpo_en_demo", "train.batch_size=2", "train.max_steps=4"]
DPO = ["stage=dpo", "data.dataset=dpo_en_demo", "train.batch_size=2", "train.max_steps=6", "train.learning_rate=5e-3"]


_RUNS: dict[tuple[str, str], Path] = {}  # trained once per session, whichever test folder asks first


def shared_run(kind: str, tmp_path_factory, tiny_model_dir: Path) -> Path:
    """A tiny LoRA run of stage `kind` (rm: adapter/ with value_head.safetensors, tuneforge_run.json saying rm)."""
    key = (kind, str(tiny_model_dir))
    if key not in _RUNS:
        out = tmp_path_factory.mktemp("runs") / f"{kind}_run"
        _RUNS[key] = train_tiny_run(out, tiny_model_dir, *{"rm": RM, "dpo": DPO}[kind])
    return _RUNS[key]


def peft_model(tiny_model_dir: Path, adapter: Path):
    """Base + adapter loaded with transformers and peft directly, in eval mode."""
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    base = AutoModelForCausalLM.from_pretrained(tiny_model_dir, dtype=torch.float32)
    return PeftModel.from_pretrained(base, str(adapter)).eval()


def saved_head(adapter: Path) -> tuple[torch.Tensor, torch.Tensor]:
    """(weight [1, h], bias [1]) read from value_head.safetensors with safetensors itself."""
    from safetensors import safe_open

    with safe_open(str(adapter / "value_head.safetensors"), framework="pt") as f:
        return f.get_tensor("v_head.summary.weight"), f.get_tensor("v_head.summary.bias")


def reference_score(model, head: tuple[torch.Tensor, torch.Tensor], ids: list[int]) -> float:
    """Value of the last token: final hidden state (output_hidden_states) times the head weight, plus the bias."""
    with torch.no_grad():
        hidden = model(input_ids=torch.tensor([ids]), output_hidden_states=True).hidden_states[-1][0, -1]
    return float(hidden.float() @ head[0][0] + head[1][0])


def reference_logp(model, ids: list[int], labels: list[int]) -> float:
    """Summed log-prob of the trained tokens (labels != -100) from the model's full logits."""
    with torch.no_grad():
        logits = model(input_ids=torch.tensor([ids])).logits[0, :-1].float()
    targets = torch.tensor(labels[1:])
    keep = targets != -100
    return float(torch.log_softmax(logits, -1)[keep].gather(1, targets[keep][:, None]).sum())
