"""The STAGES registry (kept apart so stage modules can register without import cycles)."""

from __future__ import annotations

from tuneforge.errors import ConfigError
from tuneforge.registry import Registry

STAGES: Registry[type] = Registry("stage", ConfigError)
