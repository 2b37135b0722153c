"""Load tokenizers and models from a resolved folder, with dtype and pad-token handling."""

from __future__ import annotations

import logging
import math
from dataclasses import replace
from pathlib import Path
from typing import Any

import torch

from tuneforge.config.schema import FinetuneConfig, ModelConfig
from tuneforge.errors import ModelError
from tuneforge.models.hub import resolve_model_dir

log = logging.getLogger(__name__)
DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}
VOCAB_MULTIPLE = 64  # grown embeddings are padded to a multiple of 64 rows, as LLaMA-Factory does


def load_tokenizer(cfg: ModelConfig, padding_side: str = "right") -> Any:
    """The model's tokenizer, with a pad token (eos when the model has none) and the configured new tokens."""
    from transformers import AutoTokenizer

    folder = resolve_model_dir(cfg)
    try:
        tokenizer = AutoTokenizer.from_pretrained(folder, trust_remote_code=cfg.trust_remote_code,
                                                  split_special_tokens=cfg.split_special_tokens)
    except (OSError, ValueError) as err:
        raise ModelError(f"cannot load a tokenizer from {folder}: {err}") from None
    ensure_pad_token(tokenizer)
    if cfg.add_tokens:
        tokenizer.add_tokens(cfg.add_tokens, special_tokens=False)
    if cfg.add_special_tokens:
        tokenizer.add_tokens(cfg.add_special_tokens, special_tokens=True)
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


def load_model(cfg: ModelConfig, device: str = "cpu", dtype: torch.dtype | None = None,
               max_length: int | None = None) -> Any:
    """The causal LM in the configured dtype, attention implementation and RoPE scaling (for training, pass
    max_length = data.cutoff_len; adapters come later, in finetune)."""
    from transformers import AutoModelForCausalLM

    folder = resolve_model_dir(cfg)
    dtype = dtype or resolve_dtype(cfg.dtype, device)
    kwargs: dict[str, Any] = {"dtype": dtype, "trust_remote_code": cfg.trust_remote_code}
    if cfg.rope_scaling:
        kwargs["config"] = scaled_rope_config(cfg, folder, max_length)
    if cfg.attn_implementation != "auto":
        kwargs["attn_implementation"] = cfg.attn_implementation
    if cfg.quantization_bit:
        kwargs["quantization_config"] = quantization_config(cfg, dtype)
    try:
        model = AutoModelForCausalLM.from_pretrained(folder, **kwargs)
    except (OSError, ValueError) as err:
        raise ModelError(f"cannot load a model from {folder}: {err}") from None
    return contiguous_head_input(model)


def _contiguous(module: torch.nn.Module, args: tuple[Any, ...]) -> tuple[Any, ...] | None:
    hidden = args[0] if args else None
    if isinstance(hidden, torch.Tensor) and hidden.dim() >= 3 and not hidden.is_contiguous():
        return (hidden.contiguous(), *args[1:])
    return None


def contiguous_head_input(model: Any) -> Any:
    """Give the output head contiguous hidden states. Generation's prefill passes the strided last position
    (`hidden[:, -1:, :]`), and for a 3-D strided input whose weight needs no gradient (a frozen head: LoRA, chat,
    serving) torch's matmul does not fold the batch: it copies the [vocab, hidden] weight once per sequence
    (batch x vocab x hidden elements: ~0.9 GB and >1 s for 16 sequences of a 49k vocabulary). Copying the
    [batch, 1, hidden] input instead costs nothing. Idempotent; call again when the head is replaced."""
    head = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
    if isinstance(head, torch.nn.Module) and not getattr(head, "_tuneforge_contiguous", False):
        head.register_forward_pre_hook(_contiguous)
        head._tuneforge_contiguous = True
    return model


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


def scaled_rope_config(cfg: ModelConfig, folder: Path, max_length: int | None) -> Any:
    """The model config with RoPE stretched by LLaMA-Factory's rule: factor ceil(max_length / trained context)
    when training longer than the model was trained for (no scaling otherwise), factor 2 at inference."""
    from transformers import AutoConfig

    config = AutoConfig.from_pretrained(folder, trust_remote_code=cfg.trust_remote_code)
    params = getattr(config, "rope_parameters", None)
    if not isinstance(params, dict) or "rope_theta" not in params:
        raise ModelError(f"model.rope_scaling: {folder} has no single RoPE setting to scale (model type "
                         f"{config.model_type}); remove rope_scaling")
    old = params.get("original_max_position_embeddings") or config.max_position_embeddings
    if max_length is not None and max_length <= old:
        log.warning("model.rope_scaling: cutoff_len %d fits the model's %d positions; RoPE is not scaled",
                    max_length, old)
        return config
    factor = float(math.ceil(max_length / old)) if max_length is not None else 2.0
    scaled = {"rope_type": cfg.rope_scaling, "factor": factor, "rope_theta": params["rope_theta"]}
    if "partial_rotary_factor" in params:
        scaled["partial_rotary_factor"] = params["partial_rotary_factor"]
    if cfg.rope_scaling in ("dynamic", "yarn", "llama3"):
        scaled["original_max_position_embeddings"] = old
    if cfg.rope_scaling == "llama3":
        scaled.update(low_freq_factor=1.0, high_freq_factor=4.0)
    if cfg.rope_scaling == "dynamic":
        log.warning("model.rope_scaling=dynamic: dynamic NTK scaling may not work well with fine-tuning")
    config.rope_parameters = scaled
    config.max_position_embeddings = int(old * factor)
    log.info("RoPE: %s scaling, factor %g (%d -> %d positions)", cfg.rope_scaling, factor, old, int(old * factor))
    return config


def fit_vocab(model: Any, tokenizer: Any, cfg: ModelConfig) -> list[str]:
    """Grow the embeddings to the tokenizer (model.resize_vocab, on when tokens were added); new rows start at
    the mean old embedding plus N(0, 1/d) noise, as in LLaMA-Factory. Returns the embedding modules' names
    (embed_tokens, lm_head) when they should train (LoRA modules_to_save), else []."""
    rows = model.get_input_embeddings().weight.shape[0]
    grows = len(tokenizer) > rows
    # Added tokens train their embeddings even when they fit in spare rows (Qwen's embeddings have ~270).
    if not (cfg.resize_vocab or cfg.add_tokens or cfg.add_special_tokens):
        return []
    if grows:
        if not isinstance(model.get_output_embeddings(), torch.nn.Linear):
            raise ModelError("model.resize_vocab: this model's output layer cannot be resized")
        model.resize_token_embeddings(len(tokenizer), pad_to_multiple_of=VOCAB_MULTIPLE)
        added = model.get_input_embeddings().weight.shape[0] - rows
        tied = model.get_output_embeddings().weight is model.get_input_embeddings().weight
        for embedding in [model.get_input_embeddings()] + ([] if tied else [model.get_output_embeddings()]):
            init_new_rows(embedding.weight.data, added)
        log.info("embeddings resized from %d to %d rows for %d tokens", rows, rows + added, len(tokenizer))
        contiguous_head_input(model)
    return embedding_module_names(model)


def train_embeddings(finetune: FinetuneConfig, names: list[str]) -> FinetuneConfig:
    """Adapter methods also train (and save) the grown embeddings, unless modules_to_save names others."""
    if not names:
        return finetune
    lora, oft = finetune.lora, finetune.oft
    log.info("the vocabulary grew: %s train in full and are saved with the adapter", ", ".join(names))
    return replace(finetune, lora=replace(lora, modules_to_save=lora.modules_to_save or names),
                   oft=replace(oft, modules_to_save=oft.modules_to_save or names))


def init_new_rows(weight: torch.Tensor, added: int) -> None:
    """The last `added` rows of [vocab, d] become the mean of the others plus Gaussian noise of std 1/sqrt(d)."""
    with torch.no_grad():
        mean = weight[:-added].float().mean(dim=0, keepdim=True)  # [1, d]
        noise = torch.randn(added, weight.shape[1], device=weight.device) / math.sqrt(weight.shape[1])
        weight[-added:] = (mean + noise).to(weight.dtype)


def embedding_module_names(model: Any) -> list[str]:
    """Short names of the input and output embedding modules (e.g. embed_tokens, lm_head)."""
    wanted = [m for m in (model.get_input_embeddings(), model.get_output_embeddings()) if m is not None]
    return sorted({name.split(".")[-1] for name, module in model.named_modules() if any(module is m for m in wanted)})


def adopt_saved_vocab(model: Any, tokenizer: Any, folders: list[Path], trust_remote_code: bool = False) -> Any:
    """For chat and export: a run folder whose saved tokenizer has more tokens than the base's (added tokens)
    brings that tokenizer, and the base's embeddings grow to the rows the run trained with (the adapter's
    saved embed_tokens / lm_head then fill them)."""
    from transformers import AutoTokenizer

    with_tokenizer = [f for f in folders if (f / "tokenizer_config.json").is_file()]
    saved = AutoTokenizer.from_pretrained(with_tokenizer[-1], trust_remote_code=trust_remote_code) \
        if with_tokenizer else tokenizer
    if len(saved) > len(tokenizer):
        ensure_pad_token(saved)
        saved.padding_side = tokenizer.padding_side
        tokenizer = saved
    if len(tokenizer) > model.get_input_embeddings().weight.shape[0]:
        model.resize_token_embeddings(len(tokenizer), pad_to_multiple_of=VOCAB_MULTIPLE)
        contiguous_head_input(model)
    return tokenizer
