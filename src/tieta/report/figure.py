"""matplotlib, imported only when a figure is drawn (an optional dependency: tieta[plots])."""

from __future__ import annotations

import io
import textwrap
from pathlib import Path

from tieta.errors import TietaError
from tieta.files import write_file, write_owned


def pyplot():
    """matplotlib.pyplot on the file-only backend, or one sentence on how to get it."""
    try:
        import matplotlib
    except ImportError as error:
        raise TietaError("drawing needs matplotlib: pip install 'tieta[plots]'") from error
    matplotlib.use("Agg")  # files only, no display needed
    import matplotlib.pyplot as plt

    return plt


def render(figure, caption: str = "", dpi: int = 120) -> bytes:
    """``figure`` as PNG bytes with ``caption`` wrapped above it; the figure is closed."""
    if caption:
        figure.suptitle(textwrap.fill(caption, 80), fontsize=8)
    figure.tight_layout()
    buffer = io.BytesIO()
    try:
        figure.savefig(buffer, dpi=dpi, format="png")
    finally:
        pyplot().close(figure)
    return buffer.getvalue()


def save(figure, path: Path, caption: str = "", dpi: int = 120, owned: bool = False, adopt: bool = False) -> None:
    """Write ``figure`` to ``path`` (PNG) with ``caption`` wrapped above it, and close it.

    Rendered in memory first, then written whole (:func:`tieta.files.write_file`).

    Args:
        owned: ``path`` is a name tieta chose in a folder of the user's (a report's figures):
            only a file tieta wrote there is replaced (:func:`tieta.files.write_owned`).
        adopt: with ``owned``, the file in the way is known to be tieta's by other means.
    """
    data = render(figure, caption, dpi)
    path.parent.mkdir(parents=True, exist_ok=True)
    if owned:
        write_owned(path, data, adopt=adopt)
    else:
        write_file(path, data)
