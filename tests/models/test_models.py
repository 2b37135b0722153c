"""Model resolution: embedded alias offline, local folders, hub ids, ModelScope hint; tokenizer pad handling."""

from __future__ import annotations

import importlib.util
import subprocess
import sys

import pytest
import torch

from tuneforge.config.schema import ModelConfig
from tuneforge.errors import MissingDependencyError, ModelError
from tuneforge.models.hub import resolve_model_dir, use_modelscope
from tuneforge.models.load import ensure_pad_token, load_model, load_tokenizer, resolve_dtype


def test_embedded_alias_resolves_offline():
    code = ("from tuneforge.models.hub import resolve_model_dir; from tuneforge.config.schema import ModelConfig;"
            "p = resolve_model_dir(ModelConfig()); print(p)")
    env = {"HF_HUB_OFFLINE": "1", "PATH": "", "HOME": str(__import__("pathlib").Path.home())}
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, check=True)
    folder = done.stdout.strip().splitlines()[-1]
    assert folder.endswith("smollm2-135m-instruct")
    assert (__import__("pathlib").Path(folder) / "model.safetensors").is_file()


def test_embedded_tokenizer_has_chat_template_and_pad(tokenizer):
    assert tokenizer.chat_template and "<|im_start|>" in tokenizer.chat_template
    assert tokenizer.pad_token is not None and tokenizer.padding_side == "right"


def test_local_folder_loads_tiny_model_in_requested_dtype(tiny_model_dir):
    model = load_model(ModelConfig(path=str(tiny_model_dir), dtype="bf16"))
    assert next(model.parameters()).dtype == torch.bfloat16
    assert resolve_dtype("auto", "cpu") == torch.float32


def test_missing_local_path_is_a_clear_error(tmp_path):
    with pytest.raises(ModelError, match="is not a folder"):
        resolve_model_dir(ModelConfig(path=str(tmp_path / "nope")))


def test_hub_id_offline_gives_actionable_message(monkeypatch, tmp_path):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(ModelError, match="If you are offline"):
        resolve_model_dir(ModelConfig(path="someone/not-cached-model", cache_dir=str(tmp_path)))


def test_modelscope_choice_and_install_hint(monkeypatch):
    monkeypatch.setenv("USE_MODELSCOPE_HUB", "1")
    assert use_modelscope(ModelConfig(path="a/b"))
    assert not use_modelscope(ModelConfig(path="a/b", hub="huggingface"))
    if importlib.util.find_spec("modelscope") is None:
        with pytest.raises(MissingDependencyError, match="pip install 'tuneforge\\[modelscope\\]'"):
            resolve_model_dir(ModelConfig(path="qwen/Qwen2.5-0.5B-Instruct"))


def test_pad_token_falls_back_to_eos(tokenizer):
    clone = tokenizer.__class__.from_pretrained(tokenizer.name_or_path)
    clone.pad_token = None
    ensure_pad_token(clone)
    assert clone.pad_token == clone.eos_token


def test_trust_remote_code_is_off_by_default(tiny_model_dir):
    assert ModelConfig().trust_remote_code is False
    assert load_tokenizer(ModelConfig(path=str(tiny_model_dir))) is not None


@pytest.mark.parametrize("trust", [False, True])
def test_trust_remote_code_reaches_every_loader(trust, tiny_model_dir, tiny_run, tmp_path, monkeypatch):
    """Every config, tokenizer and model load (base, a run's saved tokenizer, the export's verification) passes
    the setting through: off unless the user sets it."""
    import transformers

    from tuneforge.chat.engine import load_engine
    from tuneforge.config import load
    from tuneforge.export.merge import export

    seen: list[tuple[str, object]] = []
    for cls in (transformers.AutoTokenizer, transformers.AutoModelForCausalLM, transformers.AutoConfig):
        original = cls.from_pretrained

        def record(*args, _original=original, _name=cls.__name__, **kwargs):
            seen.append((_name, kwargs.get("trust_remote_code")))
            return _original(*args, **kwargs)

        monkeypatch.setattr(cls, "from_pretrained", record)
    load_engine(ModelConfig(path=str(tiny_model_dir), adapter_path=[str(tiny_run)], trust_remote_code=trust))
    export(load(None, [f"model.path={tiny_model_dir}", f"model.adapter_path=[{tiny_run}]",
                       f"model.trust_remote_code={str(trust).lower()}", f"export.dir={tmp_path / 'out'}",
                       "export.modelfile=false"]))
    names = {name for name, _ in seen}
    assert {"AutoTokenizer", "AutoModelForCausalLM"} <= names and len(seen) >= 6
    assert all(value is trust for _, value in seen), seen
