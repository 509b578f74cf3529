"""Where tieta keeps what it builds or fetches once: ``$TIETA_HOME``, default ``~/.cache/tieta``."""

from __future__ import annotations

import os
from pathlib import Path


def tieta_home() -> Path:
    """Root of tieta's cache (downloaded wheels, built assets, compiled kernels, demo runs)."""
    return Path(os.environ.get("TIETA_HOME") or Path.home() / ".cache" / "tieta").expanduser()
