"""The one exception type that carries a user-facing message, and a helper for its wording."""


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
