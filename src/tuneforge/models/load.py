"""Load tokenizers and models from a resolved folder, with dtype and pad-token handling."""

from __future__ import annotations

from typing import Any

import torch

from tuneforge.config.schema import ModelConfig
from tuneforge.errors import ModelError
from tuneforge.models.hub import resolve_model_dir

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}


def load_tokenizer(cfg: ModelConfig, padding_side: str = "right") -> Any:
    """The model's tokenizer, with a pad token (eos when the model has none)."""
    from transformers import AutoTokenizer

    folder = resolve_model_dir(cfg)
    try:
        tokenizer = AutoTokenizer.from_pretrained(folder, trust_remote_code=cfg.trust_remote_code)
    except (OSError, ValueError) as err:
        raise ModelError(f"cannot load a tokenizer from {folder}: {err}") from None
    ensure_pad_token(tokenizer)
    tokenizer.padding_side = padding_side
    return tokenizer


def ensure_pad_token(tokenizer: Any) -> None:
    """Give the tokenizer a pad token: eos, else unk. Padding is always masked, so reusing eos is safe."""
    if tokenizer.pad_token is None:
        fallback = tokenizer.eos_token or tokenizer.unk_token
        if fallback is None:
            raise ModelError("the tokenizer has no pad, eos or unk token; add a pad token to the tokenizer")
        tokenizer.pad_token = fallback


def resolve_dtype(name: str, device: torch.device | str = "cpu") -> torch.dtype:
    """'auto' is bf16 on GPUs that support it, fp16 on older GPUs, fp32 on CPU (where weights stay fp32)."""
    if name != "auto":
        return DTYPES[name]
    if torch.device(device).type == "cuda" and torch.cuda.is_available():
        return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
    return torch.float32


def load_model(cfg: ModelConfig, device: str = "cpu", dtype: torch.dtype | None = None) -> Any:
    """The causal LM in the configured dtype and attention implementation (adapters come later, in finetune)."""
    from transformers import AutoModelForCausalLM

    folder = resolve_model_dir(cfg)
    dtype = dtype or resolve_dtype(cfg.dtype, device)
    kwargs: dict[str, Any] = {"dtype": dtype, "trust_remote_code": cfg.trust_remote_code}
    if cfg.attn_implementation != "auto":
        kwargs["attn_implementation"] = cfg.attn_implementation
    if cfg.quantization_bit:
        kwargs["quantization_config"] = quantization_config(cfg, dtype)
    try:
        return AutoModelForCausalLM.from_pretrained(folder, **kwargs)
    except (OSError, ValueError) as err:
        raise ModelError(f"cannot load a model from {folder}: {err}") from None


def quantization_config(cfg: ModelConfig, compute_dtype: torch.dtype) -> Any:
    """bitsandbytes settings for QLoRA (4-bit nf4/fp4 with optional double quantization, or 8-bit)."""
    from transformers import BitsAndBytesConfig

    from tuneforge.deps import require

    require("bitsandbytes", "qlora")
    if cfg.quantization_bit == 8:
        return BitsAndBytesConfig(load_in_8bit=True)
    return BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type=cfg.quantization_type,
                              bnb_4bit_use_double_quant=cfg.double_quantization,
                              bnb_4bit_compute_dtype=compute_dtype)
