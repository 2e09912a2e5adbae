"""Where lvr keeps its caches (frame store, caption store)."""

from __future__ import annotations

import os
from pathlib import Path

CACHE_ENV = "LVR_CACHE_DIR"


def resolve_cache_dir(cache_dir: "str | os.PathLike | None" = None) -> Path:
    """--cache-dir, else $LVR_CACHE_DIR, else $XDG_CACHE_HOME/lvr, else ~/.cache/lvr."""
    if cache_dir:
        return Path(cache_dir).expanduser()
    if os.environ.get(CACHE_ENV):
        return Path(os.environ[CACHE_ENV]).expanduser()
    if os.environ.get("XDG_CACHE_HOME"):
        return Path(os.environ["XDG_CACHE_HOME"]).expanduser() / "lvr"
    return Path.home() / ".cache" / "lvr"


def frames_dir(cache_dir: Path) -> Path:
    return cache_dir / "frames"
