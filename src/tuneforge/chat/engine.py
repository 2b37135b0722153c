"""The inference engine (transformers backend): base model plus adapters, prompts built by the training template."""

from __future__ import annotations

import contextlib
import json
import threading
from collections.abc import Iterator
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import torch

from tuneforge.config.schema import GenerationConfig, ModelConfig
from tuneforge.data.types import Message
from tuneforge.errors import ModelError
from tuneforge.models.load import load_model, load_tokenizer
from tuneforge.templates import get_template
from tuneforge.templates.base import Template

RUN_INFO = "tuneforge_run.json"


def adapter_folder(path: str | Path) -> Path:
    """An adapter path may be a run folder (its final adapter), a checkpoint folder, or an adapter folder."""
    path = Path(path)
    for candidate in (path, path / "adapter"):
        if (candidate / "adapter_config.json").is_file():
            return candidate
    raise ModelError(f"{path} holds no LoRA adapter (adapter_config.json); give a run folder, one of its "
                     "checkpoints, or an adapter folder")


def run_info(folder: Path) -> dict[str, Any]:
    """What training recorded beside the weights (base model, template, default system), or {}."""
    path = folder / RUN_INFO
    return json.loads(path.read_text(encoding="utf-8")) if path.is_file() else {}


@dataclass
class ChatEngine:
    """A model ready to answer: weights, tokenizer, and the template it was trained with."""

    model: Any
    tokenizer: Any
    template: Template
    default_system: str | None
    has_adapter: bool

    def generate(self, messages: list[Message], gen: GenerationConfig, use_adapter: bool = True) -> str:
        """The whole answer (greedy when temperature is 0), cut at the template's stop words."""
        return "".join(self.stream(messages, gen, use_adapter))

    def stream(self, messages: list[Message], gen: GenerationConfig, use_adapter: bool = True) -> Iterator[str]:
        """Yield the answer piece by piece as it is generated."""
        from transformers import TextIteratorStreamer

        ids = self.prompt_ids(messages, gen.system)
        streamer = TextIteratorStreamer(self.tokenizer, skip_prompt=True, skip_special_tokens=False)
        kwargs = self._generate_kwargs(ids, gen)
        errors: list[BaseException] = []

        def work() -> None:
            try:
                with self._adapter(use_adapter), torch.no_grad():
                    self.model.generate(**kwargs, streamer=streamer)
            except BaseException as err:  # surfaced in the caller's thread below
                errors.append(err)
                streamer.end()

        thread = threading.Thread(target=work, daemon=True)
        thread.start()
        yield from cut_at_stop_words(streamer, self.template.stop_words)
        thread.join()
        if errors:
            raise errors[0]

    def prompt_ids(self, messages: list[Message], system: str | None) -> list[int]:
        """Token ids of the prompt, encoded exactly as training encoded prompts."""
        return self.template.encode_prompt(messages, system if system is not None else self.default_system, None)

    def _generate_kwargs(self, ids: list[int], gen: GenerationConfig) -> dict[str, Any]:
        sample = gen.do_sample if gen.do_sample is not None else gen.temperature > 0
        if gen.seed is not None:
            torch.manual_seed(gen.seed)
        kwargs: dict[str, Any] = {
            "input_ids": torch.tensor([ids]), "attention_mask": torch.ones(1, len(ids), dtype=torch.long),
            "max_new_tokens": gen.max_new_tokens, "do_sample": sample,
            "repetition_penalty": gen.repetition_penalty, "pad_token_id": self.tokenizer.pad_token_id,
            "eos_token_id": self.stop_ids() or self.tokenizer.eos_token_id,
        }
        if sample:
            kwargs.update(temperature=gen.temperature or 1.0, top_p=gen.top_p, top_k=gen.top_k or None)
        else:
            kwargs.update(temperature=None, top_p=None, top_k=None)
        return kwargs

    def stop_ids(self) -> list[int]:
        """Stop words that are single tokens; longer ones are cut from the text afterwards."""
        ids = []
        for word in self.template.stop_words:
            encoded = self.tokenizer.encode(word, add_special_tokens=False)
            if len(encoded) == 1:
                ids.append(encoded[0])
        if self.tokenizer.eos_token_id is not None and self.tokenizer.eos_token_id not in ids:
            ids.append(self.tokenizer.eos_token_id)
        return ids

    def _adapter(self, use: bool) -> Any:
        if use or not self.has_adapter:
            return contextlib.nullcontext()
        return self.model.disable_adapter()


def cut_at_stop_words(pieces: Iterator[str], stop_words: list[str]) -> Iterator[str]:
    """Pass text through until a stop word appears; hold back text that might be the start of one."""
    buffer = ""
    hold = max((len(w) for w in stop_words), default=0)
    for piece in pieces:
        buffer += piece
        hits = [buffer.index(w) for w in stop_words if w in buffer]
        if hits:
            yield buffer[: min(hits)]
            return
        if len(buffer) > hold:
            yield buffer[: len(buffer) - hold]
            buffer = buffer[len(buffer) - hold:]
    if buffer:
        yield buffer


def load_engine(model_cfg: ModelConfig, template: str = "auto", default_system: str | None = None,
                enable_thinking: bool = True) -> ChatEngine:
    """Load base + adapters; the template and system prompt recorded by training are used unless overridden."""
    from peft import PeftModel

    folders = [adapter_folder(a) for a in model_cfg.adapter_path]
    info = run_info(folders[-1]) if folders else {}
    base = model_cfg
    if folders and model_cfg.path == ModelConfig.path and info.get("base_model"):
        base = replace(model_cfg, path=info["base_model"])  # the run knows its base
    tokenizer = load_tokenizer(base, padding_side="left")
    model = load_model(base)
    for folder in folders[:-1]:  # earlier adapters are merged; the last stays separate (switchable off)
        model = PeftModel.from_pretrained(model, str(folder)).merge_and_unload()
    if folders:
        model = PeftModel.from_pretrained(model, str(folders[-1]))
    model.eval()
    name = template if template != "auto" else info.get("template", "auto")
    system = default_system if default_system is not None else info.get("default_system")
    chosen = get_template(name, tokenizer, system, info.get("enable_thinking", enable_thinking))
    return ChatEngine(model, tokenizer, chosen, system, has_adapter=bool(folders))
