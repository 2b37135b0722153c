"""Atomic file writes (a temporary name beside the target, then rename), with the permissions a plain `open`
would give: temporary files are created readable by their owner only (0600), which would otherwise stay on the
renamed file and keep a server or container running as another user from reading an exported model."""

from __future__ import annotations

import functools
import os
import stat
import tempfile
from pathlib import Path


@functools.cache
def file_mode() -> int:
    """0666 less the process umask: the mode `open` gives a new file."""
    mask = os.umask(0)
    os.umask(mask)
    return 0o666 & ~mask


def plain_modes(root: Path) -> None:
    """Give every file under `root` (or `root` itself) that a temporary-file writer left at 0600 the mode a plain
    `open` would have given it; files whose mode was set on purpose are left alone."""
    files = [root] if root.is_file() else [p for p in root.rglob("*") if p.is_file() and not p.is_symlink()]
    for file in files:
        mode = stat.S_IMODE(file.stat().st_mode)
        if mode == 0o600 and file_mode() != 0o600:
            file.chmod(file_mode())


def write_text_atomic(path: Path, text: str) -> None:
    """Write `text` to `path` so readers see either the old file or the whole new one."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as handle:
            handle.write(text)
        os.chmod(tmp, file_mode())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
