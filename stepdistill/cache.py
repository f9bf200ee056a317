"""stepdistill's cache directory: ``$STEPDISTILL_CACHE``, default ``~/.cache/stepdistill``."""

from __future__ import annotations

import os
from pathlib import Path


def cache_dir() -> Path:
    return Path(os.environ.get("STEPDISTILL_CACHE", Path.home() / ".cache" / "stepdistill"))
