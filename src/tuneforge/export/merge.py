"""Merge adapters into the base, save a self-contained folder (sharded safetensors, tokenizer, chat template,
generation config, Modelfile, GGUF), then prove it: reload each artifact and compare logits with base + adapter."""

from __future__ import annotations

import json
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import torch

from tuneforge.chat.engine import load_engine
from tuneforge.config.schema import RunConfig
from tuneforge.data.types import Message
from tuneforge.errors import ConfigError, ModelError
from tuneforge.io import plain_modes, write_text_atomic
from tuneforge.models.load import DTYPES
from tuneforge.paths import RUN_INFO
from tuneforge.templates.jinja import training_chat_template

PROMPTS = ["Who are you?", "你是谁？", "What is 2 + 2?", "Write one sentence about the sea.",
           "List three colours."]
GREEDY_TOKENS = 16
# Largest allowed |logit difference| against base + adapter in fp32, by what was written. Merging in fp32 is exact
# up to rounding (~1e-5 on logits of size ~20); lower precisions round every weight, so they get room for that.
TOLERANCE = {"fp32": 1e-3, "fp16": 0.25, "bf16": 1.0, "gguf-f16": 0.25, "gguf-bf16": 1.0, "gguf-q8_0": 2.0}


@dataclass
class Check:
    """How one exported artifact compares with base + adapter."""

    artifact: str
    max_abs_diff: float
    greedy_agreement: float
    tolerance: float

    @property
    def passed(self) -> bool:
        return self.max_abs_diff <= self.tolerance


@dataclass
class ExportReport:
    """What was written and how each artifact verified."""

    folder: Path
    files: list[str] = field(default_factory=list)
    checks: list[Check] = field(default_factory=list)

    @property
    def passed(self) -> bool:
        return all(c.passed for c in self.checks)


def export(cfg: RunConfig) -> ExportReport:
    """Merge, save, write Modelfile and GGUF, and verify each artifact."""
    if cfg.model.quantization_bit:
        raise ConfigError("cannot merge adapters into a quantized base: remove model.quantization_bit and export "
                          "from the unquantized base model (the adapter trained with QLoRA merges into it)")
    folder = prepare_folder(Path(cfg.export.dir), cfg.export.overwrite)
    kept = {p.name for p in folder.iterdir()}  # the user's own files, not reported as written
    engine = load_engine(replace(cfg.model, dtype="fp32", infer_backend="huggingface"), cfg.data.template,
                         cfg.data.default_system, cfg.data.enable_thinking)
    jinja = training_chat_template(engine.template)
    if jinja is not None:  # the exported tokenizer renders as training did (turns, default system prompt)
        engine.tokenizer.chat_template = jinja
    merged = engine.model.merge_and_unload() if engine.has_adapter else engine.model
    dtype = resolve_export_dtype(cfg.export.dtype, merged)
    save_merged(merged, engine, folder, dtype, cfg)
    report = ExportReport(folder, files=sorted(p.name for p in folder.iterdir() if p.name not in kept))
    for kind in cfg.export.gguf:
        from tuneforge.export.gguf import write_gguf

        path = folder / f"model-{kind}.gguf"
        write_gguf(merged, engine.tokenizer, path, kind, engine.tokenizer.chat_template)
        report.files.append(path.name)
    if cfg.export.modelfile:
        gguf_name = f"model-{cfg.export.gguf[0]}.gguf" if cfg.export.gguf else None
        write_text_atomic(folder / "Modelfile", modelfile(engine, gguf_name))
        report.files.append("Modelfile")
    plain_modes(folder)  # shards and tokenizer files are written through temporary files (0600)
    if cfg.export.verify:
        report.checks = verify(cfg, folder, dtype, cfg.export.gguf, cfg.export.tolerance)
    return report


# Files of an earlier export that a new one may not replace (fewer shards, no GGUF, no Modelfile, a tokenizer
# without a chat template): removed on overwrite so that nothing stale stays beside the new files. Everything else
# in the folder is the user's and is kept.
STALE_FILES = ("model.safetensors", "model-*-of-*.safetensors", "model.safetensors.index.json", "model-*.gguf",
                 "Modelfile", "chat_template.jinja")


def prepare_folder(folder: Path, overwrite: bool) -> Path:
    """An empty export folder; an existing non-empty one needs export.overwrite, which removes an earlier export's
    weights, Modelfile and chat template (its other files are overwritten by name; files the export does not write
    are kept)."""
    if folder.is_dir() and any(folder.iterdir()):
        if not overwrite:
            raise ConfigError(f"export.dir {folder} is not empty; set export.overwrite=true or choose another folder")
        for pattern in STALE_FILES:
            for stale in folder.glob(pattern):
                stale.unlink()
    folder.mkdir(parents=True, exist_ok=True)
    return folder


def resolve_export_dtype(name: str, model: Any) -> str:
    """'auto' keeps the dtype the base model's config declares (fp32 when it declares none)."""
    if name != "auto":
        return name
    declared = str(getattr(model.config, "dtype", None) or getattr(model.config, "torch_dtype", "") or "float32")
    return {"torch.bfloat16": "bf16", "bfloat16": "bf16", "torch.float16": "fp16", "float16": "fp16"}.get(
        declared, "fp32")


def save_merged(model: Any, engine: Any, folder: Path, dtype: str, cfg: RunConfig) -> None:
    """Sharded safetensors in the chosen dtype, tokenizer with its chat template, generation config, run info."""
    model = model.to(DTYPES[dtype])
    model.config.use_cache = True
    stop_ids = engine.stop_ids()
    model.generation_config.eos_token_id = stop_ids if len(stop_ids) > 1 else stop_ids[0]
    model.generation_config.pad_token_id = engine.tokenizer.pad_token_id
    model.save_pretrained(folder, max_shard_size=f"{int(cfg.export.size * 1000)}MB", safe_serialization=True)
    engine.tokenizer.padding_side = "left"
    engine.tokenizer.save_pretrained(folder)
    info = {"exported_from": cfg.model.path, "adapters": cfg.model.adapter_path, "template": engine.template.name,
            "default_system": engine.default_system, "stop_words": engine.template.stop_words, "dtype": dtype}
    write_text_atomic(folder / RUN_INFO, json.dumps(info, indent=2, ensure_ascii=False) + "\n")
    model.to(torch.float32)


def modelfile(engine: Any, gguf_name: str | None) -> str:
    """An Ollama Modelfile whose TEMPLATE is derived from the training template's own rendering."""
    system, prompt, second, response = "\x00S\x00", "\x00P\x00", "\x00Q\x00", "\x00R\x00"
    turns = [Message("user", prompt), Message("assistant", response), Message("user", second),
             Message("assistant", response)]
    with_system = engine.template.render_pairs(turns, system, None)
    without = engine.template.render_pairs(turns, None, None)
    next_prompt = with_system[1][0]
    user_prefix = next_prompt[: next_prompt.find(second)]
    head_system, tail = _split_head(with_system[0][0], prompt, user_prefix)
    head_plain, _ = _split_head(without[0][0], prompt, user_prefix)
    if system not in head_system or response not in with_system[0][1]:
        raise ModelError("cannot derive an Ollama template from this chat template; set export.modelfile=false")
    template = ("{{ if .System }}" + head_system.replace(system, "{{ .System }}") + "{{ else }}" + head_plain
                + "{{ end }}" + tail.replace(prompt, "{{ .Prompt }}")
                + with_system[0][1].replace(response, "{{ .Response }}"))
    lines = [f"FROM ./{gguf_name}" if gguf_name else "FROM .", f'TEMPLATE """{template}"""']
    lines += [f'PARAMETER stop "{word}"' for word in engine.template.stop_words]
    if engine.default_system:
        lines.append(f'SYSTEM """{engine.default_system}"""')
    return "\n".join(lines) + "\n"


def _split_head(first_prompt: str, prompt: str, user_prefix: str) -> tuple[str, str]:
    """(text before the first user turn, the user turn from its prefix on) of a rendered first prompt."""
    cut = first_prompt.find(prompt)
    before = first_prompt[:cut]
    if user_prefix and before.endswith(user_prefix):
        return before[: -len(user_prefix)], first_prompt[cut - len(user_prefix):]
    return before, first_prompt[cut:]


def verify(cfg: RunConfig, folder: Path, dtype: str, gguf_kinds: list[str], tolerance: float | None) -> list[Check]:
    """Reload base + adapter (unmerged) and every artifact fresh; compare next-token logits and greedy text."""
    from transformers import AutoModelForCausalLM

    reference = load_engine(replace(cfg.model, dtype="fp32", infer_backend="huggingface"), cfg.data.template,
                            cfg.data.default_system, cfg.data.enable_thinking)
    prompts = [reference.prompt_ids([Message("user", p)], None) for p in PROMPTS]
    expected = [_logits_and_greedy(reference.model, ids, reference.stop_ids()) for ids in prompts]
    trust = cfg.model.trust_remote_code  # an exported custom architecture keeps its code (auto_map)
    artifacts = [(dtype, lambda: AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32,
                                                                      trust_remote_code=trust))]
    for kind in gguf_kinds:
        artifacts.append((f"gguf-{kind}", lambda k=kind: AutoModelForCausalLM.from_pretrained(
            folder, gguf_file=f"model-{k}.gguf", dtype=torch.float32, trust_remote_code=trust)))
    checks = []
    for name, loader in artifacts:
        model = loader().eval()
        got = [_logits_and_greedy(model, ids, reference.stop_ids()) for ids in prompts]
        diff = max(float((a[0] - b[0]).abs().max()) for a, b in zip(expected, got))
        agree = sum(a[1] == b[1] for a, b in zip(expected, got)) / len(prompts)
        checks.append(Check(name if name.startswith("gguf") else f"safetensors-{name}", diff, agree,
                            tolerance if tolerance is not None else TOLERANCE[name]))
        del model
    return checks


def _logits_and_greedy(model: Any, ids: list[int], stop_ids: list[int]) -> tuple[torch.Tensor, list[int]]:
    with torch.no_grad():
        tensor = torch.tensor([ids])
        logits = model(input_ids=tensor).logits[0, -1].float()
        out = model.generate(input_ids=tensor, attention_mask=torch.ones_like(tensor), max_new_tokens=GREEDY_TOKENS,
                             do_sample=False, eos_token_id=stop_ids, pad_token_id=stop_ids[0])
    return logits, out[0, len(ids):].tolist()
