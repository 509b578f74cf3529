"""matplotlib, imported only when a figure is drawn (an optional dependency: tieta[plots])."""

from __future__ import annotations

import textwrap
from pathlib import Path

from tieta.errors import TietaError


def pyplot():
    """matplotlib.pyplot on the file-only backend, or one sentence on how to get it."""
    try:
        import matplotlib
    except ImportError as error:
        raise TietaError("drawing needs matplotlib: pip install 'tieta[plots]'") from error
    matplotlib.use("Agg")  # files only, no display needed
    import matplotlib.pyplot as plt

    return plt


def save(figure, path: Path, caption: str = "", dpi: int = 120) -> None:
    """Write ``figure`` to ``path`` (PNG) with ``caption`` wrapped above it, and close it."""
    if caption:
        figure.suptitle(textwrap.fill(caption, 80), fontsize=8)
    figure.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    figure.savefig(path, dpi=dpi)
    pyplot().close(figure)
