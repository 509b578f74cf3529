"""The non-blank lines of a space-separated list file (video clip lists, segmentation pair lists),
each with where it stands, read within a size limit: the decoding rules live here once."""

from __future__ import annotations

from pathlib import Path

from tieta.data.vtab import _shown
from tieta.errors import TietaError
from tieta.files import read_regular


def list_lines(file: Path, max_bytes: int) -> list[tuple[str, str, list[str]]]:
    """(where: "file:line", the line, its whitespace-separated fields) of each non-blank line.

    Raises:
        TietaError: a file that is not a regular file, is larger than ``max_bytes`` or is not UTF-8
            text (naming the line and column).
    """
    data = read_regular(file, "list file", max_bytes)
    lines = []
    for number, raw in enumerate(data.splitlines(), start=1):
        where = f"{_shown(file)}:{number}"
        try:  # a BOM (from some Windows editors) would otherwise become part of the first path
            line = raw.decode("utf-8-sig" if number == 1 else "utf-8")
        except UnicodeDecodeError as error:
            raise TietaError(f"{where}: not UTF-8 text (byte 0x{raw[error.start]:02x} at column "
                             f"{error.start + 1})") from error
        if line.split():
            lines.append((where, line, line.split()))
    return lines


def shown_line(line: str) -> str:
    """A line as an error message quotes it: stripped, at most 80 characters."""
    line = line.strip()
    return line if len(line) <= 80 else line[:77] + "..."
