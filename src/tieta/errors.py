"""The one exception type that carries a user-facing message, and helpers for its wording."""

import json
from typing import Any


class TietaError(Exception):
    """Bad input or an unusable resource, explained in one sentence.

    The command line prints the message and exits with status 2 instead of showing a traceback, so
    the message must name what is wrong and, where it helps, what to do instead.
    """

    def __str__(self) -> str:
        text = super().__str__()
        # raised in a DataLoader worker, it comes back re-made with the worker's traceback as its
        # message; the sentence is the traceback's last line
        marker = "TietaError: "
        if text.startswith("Caught TietaError") and marker in text:
            return text.rsplit(marker, 1)[1].strip()
        return text


def listing(names: list[str], limit: int = 3) -> str:
    """The first few of ``names`` for a one-sentence message: 'a, b, c and 4 more'."""
    shown = ", ".join(names[:limit])
    return shown + (f" and {len(names) - limit} more" if len(names) > limit else "")


def shown(value: Any, limit: int = 40) -> str:
    """A value read from a file, as a one-line message shows it: a mapping or a list by its kind,
    anything else as JSON (one line, whatever it holds), cut to ``limit`` characters."""
    if isinstance(value, (dict, list)):
        return "a mapping" if isinstance(value, dict) else "a list"
    try:
        text = json.dumps(value, sort_keys=True, default=str)
    except (TypeError, ValueError):
        text = repr(value)
    return text if len(text) <= limit else text[:limit - 3] + "..."
