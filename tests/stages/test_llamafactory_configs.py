"""LLaMA-Factory's own dpo / kto / reward example configs (tests/fixtures/llamafactory, verbatim) run here."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import yaml

from tuneforge.cli.main import main
from tuneforge.config import load
from tuneforge.config.llamafactory import MAPPING

FIXTURES = Path(__file__).parents[1] / "fixtures" / "llamafactory"
STAGE_KEYS = {"pref_beta", "pref_loss", "pref_ftx", "dpo_label_smoothing", "simpo_gamma", "ld_alpha",
              "pref_bco_weight", "kto_chosen_weight", "kto_rejected_weight", "ref_model", "ref_model_adapters",
              "ref_model_quantization_bit"}


def test_every_preference_key_of_llamafactory_is_mapped():
    assert STAGE_KEYS <= set(MAPPING)
    cfg = load(None, [], {"stage": "dpo", "pref_beta": "0.2", "pref_loss": "ipo", "pref_ftx": "0.5",
                          "simpo_gamma": "0.7", "ld_alpha": "0.4", "pref_bco_weight": "0.1",
                          "ref_model": "some/model", "ref_model_quantization_bit": "4"})
    assert (cfg.dpo.beta, cfg.dpo.loss, cfg.dpo.ftx, cfg.dpo.simpo_gamma, cfg.dpo.ld_alpha, cfg.dpo.bco_weight) == \
        (0.2, "ipo", 0.5, 0.7, 0.4, 0.1)
    assert (cfg.reference.model, cfg.reference.quantization_bit) == ("some/model", 4)
    kto = load(None, [], {"stage": "kto", "pref_beta": "0.3", "kto_chosen_weight": "1.5", "kto_rejected_weight": "0.5"})
    assert (kto.kto.beta, kto.kto.chosen_weight, kto.kto.rejected_weight) == (0.3, 1.5, 0.5)


@pytest.mark.parametrize("name", ["qwen3_lora_dpo", "qwen3_lora_kto", "qwen3_lora_reward"])
def test_llamafactory_example_runs_with_model_path_and_sizes_changed(name, tmp_path, tiny_model_dir):
    raw = yaml.safe_load((FIXTURES / f"{name}.yaml").read_text())
    stage_keys = {k: v for k, v in raw.items() if k in STAGE_KEYS}
    assert stage_keys or raw["stage"] == "rm"
    out = tmp_path / "run"
    # model path and sizes; qwen3_nothink is a template of issue [2/6]: the tiny model's tokenizer speaks chatml
    overrides = [f"model_name_or_path={tiny_model_dir}", "max_samples=8", "cutoff_len=128", "max_steps=2",
                 "preprocessing_num_workers=1", "bf16=false", f"output_dir={out}", "template=chatml",
                 f"data.cache_dir={tmp_path / 'cache'}"]
    assert main(["train", str(FIXTURES / f"{name}.yaml"), *overrides]) == 0
    records = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert records[-1]["step"] == 2
    expected = {"qwen3_lora_dpo": "rewards/accuracies", "qwen3_lora_kto": "kl", "qwen3_lora_reward": "accuracy"}
    assert expected[name] in records[0]
    assert (out / "adapter" / "adapter_model.safetensors").is_file()
