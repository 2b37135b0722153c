"""Copy LLaMA-Factory 0.9.5's text-model example configs and a trimmed copy of its data/ folder into the tests.

Source: github.com/hiyouga/LLaMA-Factory at tag v0.9.5 (commit 7af909522a951e3ad9f022ea6f88b6755257eaa5).
The example YAMLs are copied unchanged; the data files keep their first ROWS rows (text lines cut to CHARS
characters); the registry, data/dataset_info.json, is unchanged, so its multimodal and hub entries are there too.
Needs a clone or snapshot of the repository:

    python scripts/vendor_lf_examples.py /path/to/LLaMA-Factory

tests/config/test_lf_examples.py runs every example; tests/data/test_lf_data_folder.py loads every text dataset.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

TAG = "v0.9.5"
ROWS = 12
CHARS = 4000
DEST = Path(__file__).resolve().parents[1] / "tests" / "fixtures" / "llamafactory"
EXAMPLES = [
    "train_lora/qwen3_lora_sft.yaml", "train_lora/qwen3_lora_pretrain.yaml", "train_lora/qwen3_lora_dpo.yaml",
    "train_lora/qwen3_lora_kto.yaml", "train_lora/qwen3_lora_reward.yaml", "train_lora/qwen3_lora_sft_ds3.yaml",
    "train_lora/qwen3_lora_sft_ray.yaml", "train_lora/qwen3_preprocess.yaml", "train_full/qwen3_full_sft.yaml",
    "train_qlora/qwen3_lora_sft_otfq.yaml", "extras/loraplus/llama3_lora_sft.yaml",
    "extras/pissa/llama3_lora_sft.yaml", "extras/galore/llama3_full_sft.yaml", "extras/apollo/llama3_full_sft.yaml",
    "extras/badam/llama3_full_sft.yaml", "extras/adam_mini/qwen2_full_sft.yaml", "extras/muon/qwen2_full_sft.yaml",
    "extras/dft/qwen2_full_sft.yaml", "extras/asft/qwen2_full_asft.yaml", "extras/asft/llama2_full_asft.yaml",
    "extras/eaft/qwen25_05b_eaft_full.yaml", "extras/oft/llama3_oft_sft.yaml",
    "extras/llama_pro/llama3_freeze_sft.yaml", "extras/nlg_eval/llama3_lora_predict.yaml",
    "merge_lora/qwen3_lora_sft.yaml", "merge_lora/qwen3_full_sft.yaml", "inference/qwen3.yaml",
    "inference/qwen3_lora_sft.yaml", "inference/qwen3_full_sft.yaml", "deepspeed/ds_z0_config.json",
    "deepspeed/ds_z2_config.json", "deepspeed/ds_z3_config.json", "accelerate/fsdp_config.yaml",
    "accelerate/fsdp2_config.yaml",
]


def show(repo: Path, path: str) -> bytes:
    return subprocess.run(["git", "-C", str(repo), "show", f"{TAG}:{path}"], check=True, capture_output=True).stdout


def trim(name: str, text: str) -> str:
    if name.endswith(".json"):
        return json.dumps(json.loads(text)[:ROWS], ensure_ascii=False, indent=2) + "\n"
    if name.endswith(".txt"):  # one article per line: keep each line's first CHARS characters
        return "".join(line[:CHARS] + "\n" for line in text.splitlines()[:ROWS])
    return "".join(text.splitlines(keepends=True)[:ROWS])


def main(repo: Path) -> None:
    for path in EXAMPLES:
        target = DEST / "examples" / path
        target.parent.mkdir(parents=True, exist_ok=True)
        target.write_bytes(show(repo, f"examples/{path}"))
    info = show(repo, "data/dataset_info.json")
    data = DEST / "data"
    data.mkdir(parents=True, exist_ok=True)
    (data / "dataset_info.json").write_bytes(info)
    for entry in json.loads(info).values():
        name = entry.get("file_name")
        if not name or entry.get("columns", {}).keys() & {"images", "videos", "audios"}:
            continue  # hub entries have no file here; multimodal files are not copied (refused when selected)
        (data / name).write_text(trim(name, show(repo, f"data/{name}").decode("utf-8")), encoding="utf-8")


if __name__ == "__main__":
    main(Path(sys.argv[1]))
