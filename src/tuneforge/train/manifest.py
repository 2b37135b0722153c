"""manifest.json: what produced a run (versions, git sha, data and template hashes, seed, hardware)."""

from __future__ import annotations

import importlib.metadata
import json
import os
import platform
import subprocess
from pathlib import Path
from typing import Any

import torch

from tuneforge import __version__
from tuneforge.io import write_text_atomic

PACKAGES = ("torch", "transformers", "peft", "accelerate", "datasets", "safetensors", "tokenizers", "bitsandbytes")


def git_sha(folder: Path) -> str | None:
    """Commit of the git checkout the run was started from, if any."""
    try:
        done = subprocess.run(["git", "rev-parse", "HEAD"], cwd=folder, capture_output=True, text=True, timeout=5)
    except (OSError, subprocess.SubprocessError):
        return None
    return done.stdout.strip() or None if done.returncode == 0 else None


def versions() -> dict[str, str | None]:
    """Installed versions of the packages that decide a run's numbers."""
    out: dict[str, str | None] = {"tuneforge": __version__, "python": platform.python_version()}
    for name in PACKAGES:
        try:
            out[name] = importlib.metadata.version(name)
        except importlib.metadata.PackageNotFoundError:
            out[name] = None
    return out


def hardware(world_size: int) -> dict[str, Any]:
    """Devices, threads and process count."""
    info: dict[str, Any] = {"platform": platform.platform(), "cpu_count": os.cpu_count(),
                            "torch_threads": torch.get_num_threads(), "world_size": world_size}
    if torch.cuda.is_available():
        info["cuda"] = [torch.cuda.get_device_name(i) for i in range(torch.cuda.device_count())]
    return info


def write_manifest(path: Path, config: dict[str, Any], data: dict[str, Any], template: dict[str, Any],
                   seed: int, world_size: int) -> None:
    """Write the manifest atomically."""
    manifest = {"config": config, "versions": versions(), "git_sha": git_sha(Path.cwd()), "data": data,
                "template": template, "seed": seed, "hardware": hardware(world_size)}
    write_text_atomic(path, json.dumps(manifest, indent=2, ensure_ascii=False, default=str) + "\n")


def update_manifest(path: Path, fields: dict[str, Any]) -> None:
    """Add what is known only after training (how it ended, the best step) to an existing manifest."""
    manifest = json.loads(path.read_text(encoding="utf-8")) if path.is_file() else {}
    manifest.update(fields)
    write_text_atomic(path, json.dumps(manifest, indent=2, ensure_ascii=False, default=str) + "\n")
