"""A web UI workspace with the tiny model in models/ and a dataset_info.json that names a missing file; the board
built over it, and form values for a tiny run."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest

from tests.conftest import write_json


@pytest.fixture
def workspace(tmp_path, tiny_model_dir):
    """Workspace rooted in tmp_path: models/tiny, data/dataset_info.json (with 'broken' and 'mini')."""
    from tuneforge.webui.workspace import Workspace

    ws = Workspace.at(tmp_path / "board")
    shutil.copytree(tiny_model_dir, ws.models_dir / "tiny")
    rows = [{"instruction": f"Say {w}", "input": "", "output": f"{w} {w}"} for w in ("red", "green", "blue")]
    write_json(ws.data_dir / "mini.json", rows)
    write_json(ws.data_dir / "dataset_info.json", {"mini": {"file_name": "mini.json"},
                                                   "broken": {"file_name": "missing.json"}})
    return ws


def tiny_values(ws, **changes) -> dict:
    """Form values for a 3-step LoRA run of the tiny model on the identity set."""
    values = {"model": "models/tiny", "hub": "auto", "method": "lora", "adapters": [], "template": "chatml",
              "stage": "sft", "dataset_dir": "data", "dataset": ["identity"], "identity_name": "Orbweaver",
              "identity_author": "Kestrel Labs", "learning_rate": 5e-2, "epochs": 1.0, "max_steps": 3,
              "cutoff_len": 64, "max_samples": 8, "batch_size": 1, "grad_accum": 2, "scheduler": "cosine",
              "warmup_ratio": 0.0, "precision": "fp32", "max_grad_norm": 1.0, "val_size": 0.0, "packing": "auto",
              "logging_steps": 1, "save_steps": 100, "seed": 42, "ds_stage": "none", "ds_offload": False, "lora_rank": 4, "lora_alpha": 0,
              "lora_dropout": 0.0, "lora_targets": "all", "rslora": False, "dora": False, "pissa": False,
              "freeze_layers": 2, "freeze_modules": "all", "quant_type": "nf4", "double_quant": True,
              "pref_beta": None, "pref_loss": "sigmoid", "pref_ftx": 0.0, "label_smoothing": 0.0,
              "simpo_gamma": None, "ref_model": "", "precompute_ref": False, "kto_chosen_weight": 1.0,
              "kto_rejected_weight": 1.0, "num_generations": 8, "grpo_loss": "dapo", "grpo_beta": 0.0,
              "grpo_epsilon": 0.2, "grpo_epsilon_high": None, "scale_rewards": "group", "num_iterations": 1,
              "max_completion_length": 256, "mask_truncated": False, "reward_funcs": "", "reward_weights": "",
              "reward_model": "", "reward_model_type": "lora", "ppo_buffer_size": 1, "ppo_epochs": 4,
              "ppo_target": 6.0, "ppo_score_norm": False, "ppo_whiten_rewards": False, "report_to": [], "output_dir": "runs/tiny", "overwrite": False, "resume": False,
              "extra_args": ""}
    values.update(changes)
    return values


@pytest.fixture
def root(workspace) -> Path:
    return workspace.root


@pytest.fixture
def board(workspace):
    """The board over the workspace; a training child it started is stopped afterwards."""
    from tuneforge.webui.app import create_app

    demo, board = create_app(workspace)
    yield board
    if board.job is not None:  # never leave a training child behind a failed test
        board.job.abort()


def train_handlers(board):
    """The Train tab's handlers with the form's keys in the order the page passes them."""
    from tuneforge.webui.tabs_train import TRAIN_KEYS, TrainHandlers

    return TrainHandlers(board, ["model", "hub", "method", "adapters", "template", *TRAIN_KEYS])
