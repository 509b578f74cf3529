"""The one exception type that carries a user-facing message."""


class TietaError(Exception):
    """Bad input or an unusable resource, explained in one sentence.

    The command line prints the message and exits with status 2 instead of showing a traceback, so
    the message must name what is wrong and, where it helps, what to do instead.
    """
