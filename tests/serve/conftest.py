"""Preference runs for these tests (each trained once per session, shared across test folders)."""

from __future__ import annotations

from pathlib import Path

import pytest

from ..evaluate.preference_runs import shared_run


@pytest.fixture(scope="session")
def rm_run(tmp_path_factory, tiny_model_dir) -> Path:
    """A trained tiny LoRA reward model run."""
    return shared_run("rm", tmp_path_factory, tiny_model_dir)
