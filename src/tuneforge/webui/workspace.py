"""The web UI's working folders: every path a user types is resolved here and refused outside them."""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

from tuneforge.errors import TuneforgeError
from tuneforge.paths import tuneforge_home


class PathRefused(TuneforgeError):
    """A path typed into the web UI lies outside its working folders."""


@dataclass(frozen=True)
class Workspace:
    """The folders the web UI may read and write: datasets, runs (and evaluations), configs, exports, models."""

    root: Path

    @classmethod
    def at(cls, root: str | Path) -> Workspace:
        """A workspace rooted at `root`, with its folders created."""
        ws = cls(Path(root).resolve())
        for folder in (ws.data_dir, ws.runs_dir, ws.config_dir, ws.exports_dir, ws.models_dir):
            folder.mkdir(parents=True, exist_ok=True)
        return ws

    @property
    def data_dir(self) -> Path:
        """Datasets and their dataset_info.json."""
        return self.root / "data"

    @property
    def runs_dir(self) -> Path:
        """Run folders (training, evaluation)."""
        return self.root / "runs"

    @property
    def config_dir(self) -> Path:
        """Saved args (YAML) and the configs Start runs."""
        return self.root / "configs"

    @property
    def exports_dir(self) -> Path:
        """Merged and converted models."""
        return self.root / "exports"

    @property
    def models_dir(self) -> Path:
        """Local base models (folders or symlinks to them)."""
        return self.root / "models"

    @property
    def log_file(self) -> Path:
        """The board's log: tracebacks of unexpected failures (the page shows one line)."""
        return self.root / "board.log"

    def inside(self, value: str | Path, folder: Path, what: str) -> Path:
        """`value` (relative to the root, or absolute) resolved, refused unless it lies under `folder`."""
        path = self.resolve(value)
        if not within(path, folder):
            raise PathRefused(f"{what} '{value}' is outside the web UI's working folder {folder}; the web UI only "
                              f"reads and writes there (start `tuneforge webui --root DIR` to use another folder)")
        return path

    def model_path(self, value: str) -> str:
        """A model alias or hub id passes as is; a local folder must lie in models/, runs/, exports/ or the
        tuneforge home."""
        value = value.strip()
        looks_local = value.startswith(("/", ".", "~", "models/", "runs/", "exports/")) or (self.root / value).exists() or \
            value.count("/") > 1
        if not looks_local:
            return value
        path = self.resolve(value)
        home = Path(os.path.normpath(tuneforge_home().absolute()))
        if any(within(path, folder) for folder in (self.models_dir, self.runs_dir, self.exports_dir, home)):
            return str(path)
        raise PathRefused(f"model folder '{value}' is outside the web UI's folders for models ({self.models_dir}, "
                          "and runs/ and exports/ for trained ones); put it there, or give an alias or a hub id")

    def resolve(self, value: str | Path) -> Path:
        """An absolute path with '..' removed by its text; relative ones are taken from the root. Symlinks are not
        followed: one the owner placed in a working folder (models/qwen -> /mnt/models/qwen) is a grant."""
        path = Path(value).expanduser()
        return Path(os.path.normpath(path if path.is_absolute() else self.root / path))

    def relative(self, path: Path) -> str:
        """How a path is shown in the UI: relative to the root."""
        return str(path.relative_to(self.root)) if self.root in path.parents else str(path)

    def adapters(self) -> list[str]:
        """Run folders (relative to the root) that hold a finished LoRA adapter, newest first."""
        found = [p.parent.parent for p in self.runs_dir.glob("*/adapter/adapter_config.json")]
        found.sort(key=lambda p: p.stat().st_mtime, reverse=True)
        return [self.relative(p) for p in found]

    def local_models(self) -> list[str]:
        """Model folders placed in models/ (relative to the root)."""
        return sorted(self.relative(p.parent) for p in self.models_dir.glob("*/config.json"))

    def config_files(self) -> list[str]:
        """YAML files in the config folder."""
        return sorted(p.name for p in self.config_dir.glob("*.yaml"))


def within(path: Path, folder: Path) -> bool:
    """Whether `path` is `folder` or lies below it."""
    return path == folder or folder in path.parents
