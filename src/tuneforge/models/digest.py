"""Content digests of weight folders (for caches keyed by the weights they were computed with).

Hashing a multi-GB model takes seconds, so each file's digest is remembered by (path, size, mtime) in
TUNEFORGE_HOME/cache/digests.json; a changed file is hashed again.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

from tuneforge.io import write_text_atomic
from tuneforge.paths import tuneforge_home

WEIGHT_SUFFIXES = (".safetensors", ".bin", ".pt", ".gguf")


def folder_digest(folder: Path) -> str:
    """sha256 over the names and contents of a folder's weight files (adapter and model configs included)."""
    files = sorted(p for p in folder.iterdir() if p.is_file() and (p.suffix in WEIGHT_SUFFIXES or
                                                                   p.name in ("config.json", "adapter_config.json")))
    memo_path = tuneforge_home() / "cache" / "digests.json"
    try:
        memo = json.loads(memo_path.read_text(encoding="utf-8")) if memo_path.is_file() else {}
    except json.JSONDecodeError:
        memo = {}
    digest = hashlib.sha256()
    changed = False
    for file in files:
        stat = file.stat()
        key = f"{file.resolve()}|{stat.st_size}|{stat.st_mtime_ns}"
        if key not in memo:
            memo[key] = file_sha256(file)
            changed = True
        digest.update(file.name.encode() + memo[key].encode())
    if changed:
        write_text_atomic(memo_path, json.dumps(memo))
    return digest.hexdigest()[:16]


def file_sha256(path: Path) -> str:
    """Hex sha256 of a file, read in 8 MB blocks."""
    digest = hashlib.sha256()
    with path.open("rb") as handle:
        for block in iter(lambda: handle.read(8 << 20), b""):
            digest.update(block)
    return digest.hexdigest()
