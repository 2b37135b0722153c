"""dataset_dir set to LLaMA-Factory 0.9.5's own data/ folder (tests/fixtures/llamafactory/data: its registry
unchanged, its text files cut to 12 rows; see scripts/vendor_lf_examples.py) serves every text dataset in it."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from tuneforge.config import load
from tuneforge.data.build import build_datasets
from tuneforge.errors import DataError
from tuneforge.stages import data_kind
from tuneforge.templates import get_template

LF_DATA = Path(__file__).parents[1] / "fixtures" / "llamafactory" / "data"
INFO = json.loads((LF_DATA / "dataset_info.json").read_text(encoding="utf-8"))
MULTIMODAL = sorted(n for n, e in INFO.items() if e.get("columns", {}).keys() & {"images", "videos", "audios"})
LOCAL_TEXT = sorted(n for n, e in INFO.items() if "file_name" in e and n not in MULTIMODAL)


def stage_for(entry: dict) -> str:
    """The stage a LLaMA-Factory user trains this set with, read from its registry entry."""
    columns = entry.get("columns", {})
    if entry.get("ranking"):
        return "dpo"
    if "kto_tag" in columns:
        return "kto"
    if columns.get("prompt") == "text":
        return "pt"
    return "sft"


def test_the_registry_is_lfs_own_with_text_and_multimodal_sets():
    assert {"identity", "alpaca_en_demo", "glaive_toolcall_en_demo", "dpo_en_demo", "kto_en_demo", "c4_demo",
            "wiki_demo"} <= set(LOCAL_TEXT)
    assert {"mllm_demo", "mllm_audio_demo", "mllm_video_demo"} <= set(MULTIMODAL)


@pytest.mark.parametrize("name", LOCAL_TEXT)
def test_every_local_text_dataset_encodes(name, tokenizer, tmp_path):
    stage = stage_for(INFO[name])
    cfg = load(None, [f"data.cache_dir={tmp_path}"], {"dataset_dir": str(LF_DATA), "dataset": name,
                                                      "stage": stage, "template": "chatml", "cutoff_len": 256})
    template = get_template(cfg.data.template, tokenizer)
    encoded = build_datasets(cfg.data, data_kind(cfg.stage), template, cfg.train.seed)
    expected_rows = {"pt": None, "kto": 12}.get(stage, 12)  # pt packs text into blocks
    if expected_rows is None:
        assert len(encoded.train) >= 1
    else:
        assert len(encoded.train) == expected_rows
    column = {"dpo": "chosen_labels", "kto": "labels"}.get(stage, "labels")
    assert all(any(t != -100 for t in row[column]) for row in encoded.train)


@pytest.mark.parametrize("name", ["mllm_demo", "mllm_video_demo"])
def test_multimodal_sets_are_refused_only_when_selected(name, tokenizer, tmp_path):
    cfg = load(None, [f"data.cache_dir={tmp_path}"], {"dataset_dir": str(LF_DATA), "dataset": name,
                                                      "template": "chatml"})
    with pytest.raises(DataError, match=name):
        build_datasets(cfg.data, "sft", get_template("chatml", tokenizer), 42)
