"""Nothing LLaMA-Factory 0.9.5 accepts is silently ignored: every key its argument dataclasses define
(tests/fixtures/llamafactory/lf_0.9.5_keys.json, made by scripts/lf_keys.py from an installed llamafactory)
is mapped, accepted with a notice, or refused with a reason, and docs/llamafactory-keys.md lists them all."""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path

import pytest

from tuneforge.config import load
from tuneforge.config.llamafactory import fate
from tuneforge.errors import ConfigError

ROOT = Path(__file__).parents[2]
KEYS = json.loads((ROOT / "tests" / "fixtures" / "llamafactory" / "lf_0.9.5_keys.json").read_text())["keys"]


def test_the_key_list_is_llamafactory_0_9_5s():
    assert len(KEYS) == 353
    assert {"lora_rank", "pref_beta", "use_galore", "tokenized_path", "per_device_train_batch_size"} <= set(KEYS)


def test_every_llamafactory_key_has_a_fate():
    missing = []
    for key in KEYS:
        try:
            fate(key)
        except KeyError:
            missing.append(key)
    assert not missing, f"LLaMA-Factory keys with no entry in config/llamafactory.py: {missing}"


def test_the_key_page_is_current():
    spec = importlib.util.spec_from_file_location("lf_key_table", ROOT / "scripts" / "lf_key_table.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    assert (ROOT / "docs" / "llamafactory-keys.md").read_text(encoding="utf-8") == module.render(), \
        "docs/llamafactory-keys.md is stale: run python scripts/lf_key_table.py"


@pytest.mark.parametrize("key, value", [("save_only_model", False), ("export_legacy_format", False),
                                        ("use_unsloth", False), ("flash_attn", "auto"), ("pure_bf16", False),
                                        ("enable_liger_kernel", False), ("push_to_hub", False),
                                        ("logging_strategy", "steps"), ("image_max_pixels", 589824),
                                        ("deepspeed", None), ("rope_scaling", None), ("tf32", None)])
def test_do_nothing_values_are_accepted(key, value):
    assert load(None, [], {key: value}).stage == "sft"


@pytest.mark.parametrize("key, value, words", [("push_to_hub", True, "hub"), ("use_unsloth", True, "use_unsloth"),
                                               ("fp8", True, "bf16"), ("use_swanlab", True, "tensorboard"),
                                               ("num_beams", 4, "beam search")])
def test_other_values_of_refused_keys_stop_with_the_reason(key, value, words):
    with pytest.raises(ConfigError, match=words):
        load(None, [], {key: value})
