"""GGUF export for Llama-family models (Llama, Qwen2, Mistral, SmolLM) with BPE tokenizers, via the gguf package."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np
import torch

from tuneforge.errors import ModelError

SUPPORTED = ("llama", "mistral", "qwen2")
KINDS = ("f16", "bf16", "q8_0")


def permute_qk(weight: np.ndarray, heads: int) -> np.ndarray:
    """llama.cpp's rotary layout for q/k projections (transformers' GGUF loader undoes exactly this)."""
    return weight.reshape(heads, 2, weight.shape[0] // heads // 2, *weight.shape[1:]).swapaxes(1, 2).reshape(
        weight.shape)


def tensor_name(hf_name: str) -> str | None:
    """GGUF tensor name for a transformers Llama parameter name."""
    table = {"model.embed_tokens.weight": "token_embd.weight", "model.norm.weight": "output_norm.weight",
             "lm_head.weight": "output.weight"}
    if hf_name in table:
        return table[hf_name]
    parts = hf_name.split(".")
    if parts[:2] != ["model", "layers"]:
        return None
    block, rest = parts[2], ".".join(parts[3:])
    inner = {"input_layernorm.weight": "attn_norm.weight", "post_attention_layernorm.weight": "ffn_norm.weight",
             "self_attn.q_proj.weight": "attn_q.weight", "self_attn.k_proj.weight": "attn_k.weight",
             "self_attn.v_proj.weight": "attn_v.weight", "self_attn.o_proj.weight": "attn_output.weight",
             "self_attn.q_proj.bias": "attn_q.bias", "self_attn.k_proj.bias": "attn_k.bias",
             "self_attn.v_proj.bias": "attn_v.bias",
             "mlp.gate_proj.weight": "ffn_gate.weight", "mlp.up_proj.weight": "ffn_up.weight",
             "mlp.down_proj.weight": "ffn_down.weight"}.get(rest)
    return f"blk.{block}.{inner}" if inner else None


def write_gguf(model: Any, tokenizer: Any, path: Path, kind: str, chat_template: str | None) -> Path:
    """Write `model` (merged, any float dtype) as one GGUF file of type f16, bf16 or q8_0."""
    import gguf

    config = model.config
    arch = config.model_type
    if arch not in SUPPORTED:
        raise ModelError(f"GGUF export supports {', '.join(SUPPORTED)} models; this one is '{arch}'")
    if kind not in KINDS:
        raise ModelError(f"GGUF type '{kind}' is not one of {', '.join(KINDS)}")
    gguf_arch = "qwen2" if arch == "qwen2" else "llama"
    writer = gguf.GGUFWriter(str(path), gguf_arch)
    _write_hparams(writer, config, kind)
    _write_tokenizer(writer, tokenizer, chat_template)
    heads, kv_heads = config.num_attention_heads, config.num_key_value_heads
    tied = bool(getattr(config, "tie_word_embeddings", False))
    for name, tensor in model.state_dict().items():
        target = tensor_name(name)
        if target is None or (tied and target == "output.weight"):
            continue
        data = tensor.detach().to(torch.float32).cpu().numpy()
        if gguf_arch == "llama" and target.endswith("attn_q.weight"):
            data = permute_qk(data, heads)
        elif gguf_arch == "llama" and target.endswith("attn_k.weight"):
            data = permute_qk(data, kv_heads)
        _add_tensor(writer, gguf, target, data, kind)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return path


def _add_tensor(writer: Any, gguf: Any, name: str, data: np.ndarray, kind: str) -> None:
    if data.ndim == 1:  # norms and biases stay f32, as llama.cpp keeps them
        writer.add_tensor(name, data.astype(np.float32))
    elif kind == "f16":
        writer.add_tensor(name, data.astype(np.float16))
    elif kind == "bf16":
        quant = gguf.GGMLQuantizationType.BF16
        writer.add_tensor(name, gguf.quants.quantize(data, quant), raw_dtype=quant)
    else:
        quant = gguf.GGMLQuantizationType.Q8_0
        writer.add_tensor(name, gguf.quants.quantize(data, quant), raw_dtype=quant)


def _write_hparams(writer: Any, config: Any, kind: str) -> None:
    import gguf

    head_dim = getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads
    writer.add_name(str(getattr(config, "name_or_path", "") or "tuneforge export"))
    writer.add_context_length(config.max_position_embeddings)
    writer.add_embedding_length(config.hidden_size)
    writer.add_block_count(config.num_hidden_layers)
    writer.add_feed_forward_length(config.intermediate_size)
    writer.add_head_count(config.num_attention_heads)
    writer.add_head_count_kv(config.num_key_value_heads)
    writer.add_layer_norm_rms_eps(config.rms_norm_eps)
    writer.add_rope_dimension_count(head_dim)
    writer.add_vocab_size(config.vocab_size)
    rope = getattr(config, "rope_parameters", None) or {}
    theta = rope.get("rope_theta") if isinstance(rope, dict) else None
    writer.add_rope_freq_base(float(theta or getattr(config, "rope_theta", 10000.0)))
    writer.add_file_type({"f16": gguf.LlamaFileType.MOSTLY_F16, "bf16": gguf.LlamaFileType.MOSTLY_BF16,
                          "q8_0": gguf.LlamaFileType.MOSTLY_Q8_0}[kind])


def _write_tokenizer(writer: Any, tokenizer: Any, chat_template: str | None) -> None:
    """BPE (GPT-2 style) vocabulary, merges and special tokens from the fast tokenizer's JSON."""
    spec = json.loads(tokenizer.backend_tokenizer.to_str())
    model = spec["model"]
    if model.get("type") != "BPE" or not model.get("merges"):
        raise ModelError("GGUF export supports BPE tokenizers (Llama 3, Qwen, SmolLM, ...) for now; this tokenizer "
                         f"is {model.get('type')}")
    vocab = dict(model["vocab"])
    for added in spec.get("added_tokens", []):
        vocab[added["content"]] = added["id"]
    size = max(vocab.values()) + 1
    tokens = [f"[PAD{i}]" for i in range(size)]
    for token, index in vocab.items():
        tokens[index] = token
    special = {a["id"] for a in spec.get("added_tokens", []) if a.get("special")}
    types = [3 if i in special else 1 for i in range(size)]  # 3 = control, 1 = normal
    merges = [m if isinstance(m, str) else " ".join(m) for m in model["merges"]]
    writer.add_tokenizer_model("gpt2")
    writer.add_tokenizer_pre("default")
    writer.add_token_list(tokens)
    writer.add_token_types(types)
    writer.add_token_merges(merges)
    for setter, value in ((writer.add_bos_token_id, tokenizer.bos_token_id),
                          (writer.add_eos_token_id, tokenizer.eos_token_id),
                          (writer.add_pad_token_id, tokenizer.pad_token_id),
                          (writer.add_unk_token_id, tokenizer.unk_token_id)):
        if value is not None:
            setter(int(value))
    if chat_template:
        writer.add_chat_template(chat_template)
