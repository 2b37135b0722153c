"""A minimal transformers inference engine: base model plus adapters, prompts built by the training template."""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from tuneforge.config.schema import ModelConfig
from tuneforge.data.types import Message
from tuneforge.errors import ModelError
from tuneforge.models.load import load_model, load_tokenizer
from tuneforge.templates import get_template
from tuneforge.templates.base import Template

RUN_INFO = "tuneforge_run.json"


@dataclass
class Loaded:
    """A model ready to answer: weights, tokenizer and the template it was trained with."""

    model: Any
    tokenizer: Any
    template: Template
    default_system: str | None


def adapter_folder(path: str | Path) -> Path:
    """An adapter path may be a run folder (its final adapter), a checkpoint folder, or an adapter folder."""
    path = Path(path)
    for candidate in (path, path / "adapter"):
        if (candidate / "adapter_config.json").is_file():
            return candidate
    raise ModelError(f"{path} holds no LoRA adapter (adapter_config.json); give a run folder, one of its "
                     "checkpoints, or an adapter folder")


def load_for_chat(base: str | None, adapters: list[str], template: str | None = None) -> Loaded:
    """Base model (from the adapter's run info when not given) with adapters applied, and its template."""
    from peft import PeftModel

    folders = [adapter_folder(a) for a in adapters]
    info = json.loads((folders[-1] / RUN_INFO).read_text(encoding="utf-8")) if folders and \
        (folders[-1] / RUN_INFO).is_file() else {}
    base = base or info.get("base_model")
    if not base:
        raise ModelError("no base model: give one, or an adapter trained by tuneforge (it records its base)")
    cfg = ModelConfig(path=base, dtype="fp32")
    tokenizer = load_tokenizer(cfg, padding_side="left")
    model = load_model(cfg)
    for folder in folders:
        model = PeftModel.from_pretrained(model, str(folder))
    model.eval()
    default_system = info.get("default_system")
    chosen = get_template(template or info.get("template", "auto"), tokenizer, default_system,
                          info.get("enable_thinking", True))
    return Loaded(model, tokenizer, chosen, default_system)


def generate(loaded: Loaded, messages: list[Message], system: str | None = None, max_new_tokens: int = 128,
             temperature: float = 0.0, top_p: float = 1.0, seed: int | None = None) -> str:
    """One answer; greedy when temperature is 0; stops at the template's stop words."""
    tokenizer, template = loaded.tokenizer, loaded.template
    ids = template.encode_prompt(messages, system, None)
    stop_ids = [i for word in template.stop_words for i in [tokenizer.convert_tokens_to_ids(word)]
                if isinstance(i, int) and i != tokenizer.unk_token_id]
    if seed is not None:
        torch.manual_seed(seed)
    with torch.no_grad():
        out = loaded.model.generate(
            input_ids=torch.tensor([ids]), attention_mask=torch.ones(1, len(ids), dtype=torch.long),
            max_new_tokens=max_new_tokens, do_sample=temperature > 0, temperature=temperature or None,
            top_p=top_p if temperature > 0 else None, eos_token_id=stop_ids or tokenizer.eos_token_id,
            pad_token_id=tokenizer.pad_token_id,
        )
    text = tokenizer.decode(out[0, len(ids):], skip_special_tokens=False)
    for word in template.stop_words:
        text = text.split(word)[0]
    return text.strip()
