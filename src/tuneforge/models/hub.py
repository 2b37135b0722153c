"""Resolve model.path: the embedded alias, a local folder, a Hugging Face id or a ModelScope id."""

from __future__ import annotations

import os
from pathlib import Path

from tuneforge.config.schema import ModelConfig
from tuneforge.errors import MissingDependencyError, ModelError
from tuneforge.models.embedded import ALIAS, embedded_model_dir

WEIGHT_PATTERNS = ["*.json", "*.safetensors", "*.model", "*.txt", "*.jinja", "*.tiktoken"]


def resolve_model_dir(cfg: ModelConfig) -> Path:
    """A local folder holding the model's config, weights and tokenizer."""
    if cfg.path == ALIAS:
        return embedded_model_dir()
    local = Path(cfg.path).expanduser()
    if local.is_dir():
        return local
    if local.exists() or cfg.path.startswith((".", "/", "~")) or cfg.path.count("/") != 1:
        raise ModelError(f"model.path '{cfg.path}' is not a folder, and not a hub id of the form owner/name "
                         f"(or the alias '{ALIAS}')")
    return _from_modelscope(cfg) if use_modelscope(cfg) else _from_huggingface(cfg)


def use_modelscope(cfg: ModelConfig) -> bool:
    """ModelScope when asked in the config, or when USE_MODELSCOPE_HUB=1 and the config says auto."""
    if cfg.hub != "auto":
        return cfg.hub == "modelscope"
    return os.environ.get("USE_MODELSCOPE_HUB", "0").lower() in ("1", "true")


def _from_huggingface(cfg: ModelConfig) -> Path:
    """Download (or find in the cache) with huggingface_hub; HF_ENDPOINT and HF_HUB_OFFLINE apply as usual."""
    from huggingface_hub import snapshot_download

    patterns = WEIGHT_PATTERNS + (["*.py"] if cfg.trust_remote_code else [])
    try:
        return Path(snapshot_download(cfg.path, revision=cfg.revision, cache_dir=cfg.cache_dir, token=cfg.token,
                                      allow_patterns=patterns))
    except Exception as err:  # offline, gated, missing repo: all become one actionable message
        raise ModelError(
            f"cannot get '{cfg.path}' from the Hugging Face hub ({type(err).__name__}: {err}). If you are offline, "
            "download it elsewhere and set model.path to the folder; a mirror can be set with HF_ENDPOINT"
        ) from None


def _from_modelscope(cfg: ModelConfig) -> Path:
    try:
        from modelscope import snapshot_download
    except ImportError:
        raise MissingDependencyError("ModelScope downloads need the modelscope package: "
                                     "pip install 'tuneforge[modelscope]'") from None
    revision = "master" if cfg.revision == "main" else cfg.revision
    try:
        return Path(snapshot_download(cfg.path, revision=revision, cache_dir=cfg.cache_dir))
    except Exception as err:  # as above
        raise ModelError(f"cannot get '{cfg.path}' from ModelScope ({type(err).__name__}: {err})") from None
