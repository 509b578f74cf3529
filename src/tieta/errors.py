"""The one exception type that carries a user-facing message."""


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
