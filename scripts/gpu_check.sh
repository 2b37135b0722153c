#!/usr/bin/env bash
# GPU check (a few minutes on a machine with NVIDIA GPUs): the quickstart on one GPU, then LLaMA-Factory's
# qwen3_lora_sft_ds3.yaml (DeepSpeed ZeRO-3, its JSON unpatched) on every visible GPU through tuneforge's own
# torchrun re-launch, then LLaMA-Factory's qwen3_lora_sft.yaml under `accelerate launch` with its fsdp2_config.yaml
# (unpatched but for the process count), each printing tokens/s and peak GPU memory. Run from the repository root
# after `bash scripts/setup.sh` (with a CUDA torch installed first).
set -euo pipefail
cd "$(dirname "$0")/.."
nvidia-smi --query-gpu=name,memory.total --format=csv,noheader
out=$(mktemp -d)
lf=tests/fixtures/llamafactory
gpus=$(python -c "import torch; print(torch.cuda.device_count())")

report() {  # run folder -> tokens/s of the last logged step, and the peak GPU memory the manifest recorded
  python - "$1" <<'EOF'
import json, sys
from pathlib import Path
run = Path(sys.argv[1])
last = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines() if '"tokens_per_s"' in line][-1]
manifest = json.loads((run / "manifest.json").read_text())
peak = manifest.get("training", {}).get("peak_gpu_memory_gb")
print(f"{run.name}: step {last['step']}, {last['tokens_per_s']:.0f} tokens/s, loss {last['loss']:.4f}, "
      f"peak GPU memory {peak if peak is not None else 'n/a'} GB")
EOF
}

echo "== quickstart (1 GPU)"
CUDA_VISIBLE_DEVICES=0 /usr/bin/time -f "%e s wall" tuneforge train examples/quickstart.yaml \
  output.dir="$out/quickstart" 2>&1 | tail -n 3
report "$out/quickstart"

echo "== LLaMA-Factory qwen3_lora_sft_ds3.yaml, ZeRO-3 on $gpus GPU(s)"
(cd "$lf" && FORCE_TORCHRUN=1 /usr/bin/time -f "%e s wall" tuneforge train examples/train_lora/qwen3_lora_sft_ds3.yaml \
  model_name_or_path=smollm2-135m-instruct template=chatml output_dir="$out/ds3" max_samples=256 \
  num_train_epochs=1 logging_steps=1 save_steps=0 2>&1 | tail -n 3)
report "$out/ds3"

echo "== LLaMA-Factory qwen3_lora_sft.yaml, FSDP2 (accelerate launch with fsdp2_config.yaml) on $gpus GPU(s)"
(cd "$lf" && /usr/bin/time -f "%e s wall" accelerate launch --config_file examples/accelerate/fsdp2_config.yaml \
  --num_processes "$gpus" -m tuneforge train examples/train_lora/qwen3_lora_sft.yaml \
  model_name_or_path=smollm2-135m-instruct template=chatml output_dir="$out/fsdp2" max_samples=256 \
  num_train_epochs=1 logging_steps=1 save_steps=0 2>&1 | tail -n 3)
report "$out/fsdp2"
