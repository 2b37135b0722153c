"""Where tuneforge keeps its own files (converted models, dataset cache)."""

from __future__ import annotations

import os
from pathlib import Path

RUN_INFO = "tuneforge_run.json"  # beside saved weights: base model, template, system prompt, stop words


def tuneforge_home() -> Path:
    """TUNEFORGE_HOME, or ~/.cache/tuneforge."""
    return Path(os.environ.get("TUNEFORGE_HOME") or Path.home() / ".cache" / "tuneforge").expanduser()
