"""Writing and reading files so that nothing the user had is lost and nothing read back is trusted.

Writing. Every file tieta writes goes through :func:`write_file`: the data goes to a temporary file
created exclusively in the target's folder (a unique name, ``O_EXCL``, never through a symbolic
link), is flushed to disk, and is renamed over the target. A reader, or a process killed at any
instant, sees the old file or the new one, never a part. The target itself is refused when it is a
symbolic link or anything but a regular file. Any write error (a full disk, a read-only folder)
becomes one sentence naming the file, with the previous file intact.

Files tieta owns by name inside a folder it may not have made (a sweep's ``sweep.yaml``, a report's
``report.md`` and plots) go through :func:`write_owned`, which also refuses to replace a file that
tieta did not write: the folder's ``.tieta-written.json`` records the SHA-256 of every file tieta
wrote there, and only a file that still has that content is replaced.

Folders. :func:`swap_folders` exchanges two folders in one step (Linux ``renameat2``), so that a
replacement is whole or absent; :func:`move_folder` moves one into a name that must not exist.

Reading. :func:`read_regular` reads only regular files (never a FIFO or a device), within a size
limit; :func:`read_json` and :func:`parse_json` parse JSON within size, depth and value-count limits.
"""

from __future__ import annotations

import ctypes
import errno
import hashlib
import json
import math
import os
import shutil
import stat
import tempfile
from pathlib import Path
from typing import Any, Callable, Iterable, Optional

from tieta.errors import TietaError

MANIFEST = ".tieta-written.json"
MAX_JSON_BYTES = 16 << 20
MAX_JSON_DEPTH = 32
MAX_JSON_VALUES = 1_000_000


class WriteError(TietaError):
    """A file could not be written; the previous one, if any, is intact."""


def _refuse_special(path: Path) -> Optional[os.stat_result]:
    """The target's own status (not a link's); a link or a non-regular file is refused."""
    try:
        found = os.lstat(path)
    except FileNotFoundError:
        return None
    except OSError as error:
        raise WriteError(f"cannot write {path}: {error.strerror}") from None
    if stat.S_ISLNK(found.st_mode):
        raise WriteError(f"refusing to write {path}: it is a symbolic link (tieta never writes through one); "
                         "remove it or write elsewhere")
    if not stat.S_ISREG(found.st_mode):
        raise WriteError(f"refusing to write {path}: it exists and is not a regular file")
    return found


def _umask() -> int:
    mask = os.umask(0)  # the only way to read it is to set it
    os.umask(mask)
    return mask


def _file_mode() -> int:
    """0o666 less the umask: what ``open(path, "w")`` would have given."""
    return 0o666 & ~_umask()


def folder_mode() -> int:
    """0o777 less the umask: what ``mkdir`` would have given (``tempfile.mkdtemp`` gives 0o700)."""
    return 0o777 & ~_umask()


def write_file(path: str | Path, data: bytes | str) -> Path:
    """Write ``data`` to ``path`` whole or not at all (see the module's docstring). Returns ``path``.

    Raises:
        WriteError: the target is a link or not a regular file, or the disk said no.
    """
    path = Path(path)
    payload = data.encode("utf-8") if isinstance(data, str) else bytes(data)
    _refuse_special(path)
    temporary = None
    try:
        handle, temporary = tempfile.mkstemp(prefix=f".{path.name[:100]}.", suffix=".tieta-partial",
                                             dir=path.parent)
        with os.fdopen(handle, "wb") as stream:
            os.fchmod(stream.fileno(), _file_mode())
            stream.write(payload)
            stream.flush()
            os.fsync(stream.fileno())
        _refuse_special(path)  # checked again: something may have appeared there meanwhile
        os.replace(temporary, path)
        temporary = None
    except OSError as error:
        kept = "the previous one is intact" if path.exists() else "nothing was written"
        raise WriteError(f"could not write {path} ({error.strerror or error}); {kept}") from None
    finally:
        if temporary is not None:
            try:
                os.unlink(temporary)
            except OSError:
                pass
    return path


def overwrite_in_place(path: str | Path, data: str) -> None:
    """Write a small file over its own bytes, padded with spaces to its old length: the last resort
    on a full disk, where a new file cannot get a block but the old one has its blocks already (a run
    that failed for want of space can still say so in its ``state.json``). Not atomic: use only
    where a torn file is no worse than a stale one.
    """
    path = Path(path)
    try:
        handle = os.open(path, os.O_WRONLY | os.O_NOFOLLOW)
    except OSError as error:
        raise WriteError(f"could not write {path} ({error.strerror})") from None
    try:
        found = os.fstat(handle)
        if not stat.S_ISREG(found.st_mode):
            raise WriteError(f"refusing to write {path}: it is not a regular file")
        payload = data.encode("utf-8")
        os.write(handle, payload.ljust(found.st_size, b" "))
        os.fsync(handle)
    except OSError as error:
        raise WriteError(f"could not write {path} ({error.strerror})") from None
    finally:
        os.close(handle)


def append_line(path: str | Path, line: str) -> None:
    """Append one line to a log that tieta made (``metrics.jsonl``), never through a link."""
    path = Path(path)
    _refuse_special(path)
    try:
        handle = os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT | os.O_NOFOLLOW, _file_mode())
        with os.fdopen(handle, "a") as stream:
            stream.write(line if line.endswith("\n") else line + "\n")
            stream.flush()
            os.fsync(stream.fileno())
    except OSError as error:
        raise WriteError(f"could not write {path} ({error.strerror or error})") from None


def _digest(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def file_sha256(path: Path) -> str:
    """The SHA-256 of a file's bytes, in hex, read a MiB at a time (OSError where it cannot be read)."""
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for block in iter(lambda: handle.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def _manifest(folder: Path) -> dict[str, str]:
    try:
        values = read_json(folder / MANIFEST, "tieta's record of the files it wrote", limit=1 << 20)
    except TietaError:
        return {}
    if not isinstance(values, dict):
        return {}
    return {str(k): v for k, v in values.items() if isinstance(v, str)}


def written_by_tieta(path: Path) -> bool:
    """Whether ``path`` is a file tieta wrote there and nobody has changed since."""
    recorded = _manifest(path.parent).get(path.name)
    if recorded is None:
        return False
    try:
        return _digest(read_regular(path, "file", limit=1 << 34)) == recorded
    except TietaError:
        return False


def check_owned(path: str | Path, adopt: bool = False) -> None:
    """Refuse, as :func:`write_owned` would, a file in the way that tieta did not write: called
    before long work whose result would otherwise be refused only at the end.

    Raises:
        WriteError: a file of the user's (or a link, or not a regular file) is in the way.
    """
    path = Path(path)
    found = _refuse_special(path)
    if found is not None and not adopt and not written_by_tieta(path):
        raise WriteError(f"{path} exists and was not written by tieta (or was changed since); move it away "
                         "or write elsewhere")


def write_owned(path: str | Path, data: bytes | str, adopt: bool = False) -> Path:
    """Write a file whose name tieta chooses inside a folder the user may also use: it replaces only
    a file that tieta wrote there (and nobody changed since), and records what it wrote.

    Args:
        adopt: the existing file is known to be tieta's by its content (the caller read it as such).
    Raises:
        WriteError: a file of the user's is in the way, or the disk said no.
    """
    path = Path(path)
    payload = data.encode("utf-8") if isinstance(data, str) else bytes(data)
    check_owned(path, adopt)
    write_file(path, payload)
    record = _manifest(path.parent)
    record[path.name] = _digest(payload)
    write_file(path.parent / MANIFEST, json.dumps(record, indent=1, sort_keys=True) + "\n")
    return path


# Linux renameat2 flags
_RENAME_NOREPLACE, _RENAME_EXCHANGE = 1, 2
_AT_FDCWD = -100


def _renameat2(source: Path, target: Path, flags: int) -> bool:
    """renameat2(2); False where the system or the file system does not offer it."""
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        function = libc.renameat2
    except (OSError, AttributeError):
        return False
    function.argtypes = [ctypes.c_int, ctypes.c_char_p, ctypes.c_int, ctypes.c_char_p, ctypes.c_uint]
    if function(_AT_FDCWD, os.fsencode(source), _AT_FDCWD, os.fsencode(target), flags) == 0:
        return True
    code = ctypes.get_errno()
    if code in (errno.ENOSYS, errno.EINVAL, errno.ENOTSUP):
        return False
    raise OSError(code, os.strerror(code), str(target))


def swap_folders(first: Path, second: Path) -> None:
    """Exchange two folders in one step: at every instant each name holds one whole folder.

    Where the system cannot exchange atomically, the two renames leave, if killed between them,
    ``second`` missing and both folders beside it (nothing mixed, nothing lost).
    """
    if _renameat2(first, second, _RENAME_EXCHANGE):
        return
    parked = Path(tempfile.mkdtemp(prefix=f".{second.name}.tieta-old-", dir=second.parent))
    os.rmdir(parked)
    os.rename(second, parked)
    os.rename(first, second)
    os.rename(parked, first)


def move_folder(source: Path, target: Path) -> None:
    """Move ``source`` to ``target``, which must not exist (an empty folder there is replaced).

    Raises:
        FileExistsError: ``target`` appeared meanwhile (another process won).
    """
    try:
        os.rmdir(target)  # an empty folder the user made for it (or mkdir -p) holds nothing
    except FileNotFoundError:
        pass
    except OSError:
        raise FileExistsError(errno.EEXIST, "exists", str(target)) from None
    if _renameat2(source, target, _RENAME_NOREPLACE):
        return
    if os.path.lexists(target):
        raise FileExistsError(errno.EEXIST, "exists", str(target))
    os.rename(source, target)


def read_regular(path: str | Path, what: str, limit: int, head: bool = False) -> bytes:
    """The bytes of a regular file of at most ``limit`` bytes (a FIFO, a device or a folder is refused,
    and nothing blocks or reads without end); ``head``: its first ``limit`` bytes, however long it is.

    Raises:
        TietaError: one sentence naming ``what`` and the file.
    """
    path = Path(path)
    try:
        handle = os.open(path, os.O_RDONLY | os.O_NONBLOCK)
    except FileNotFoundError:
        raise TietaError(f"{what} {path} does not exist") from None
    except OSError as error:
        raise TietaError(f"cannot read {what} {path}: {error.strerror}") from None
    try:
        found = os.fstat(handle)
        if not stat.S_ISREG(found.st_mode):
            raise TietaError(f"{what} {path} is not a regular file")
        if found.st_size > limit and not head:
            raise TietaError(f"{what} {path} is {found.st_size:,} bytes, more than the {limit:,} tieta reads")
        os.set_blocking(handle, True)
        chunks, size = [], 0
        while size <= limit:
            chunk = os.read(handle, min(1 << 20, limit + 1 - size))
            if not chunk:
                break
            chunks.append(chunk)
            size += len(chunk)
        if size > limit and not head:
            raise TietaError(f"{what} {path} grew past the {limit:,} bytes tieta reads")
        return b"".join(chunks)[:limit]
    except OSError as error:
        raise TietaError(f"cannot read {what} {path}: {error.strerror}") from None
    finally:
        os.close(handle)


def _check_shape(value: Any, what: str) -> None:
    """Refuse JSON nested deeper than MAX_JSON_DEPTH or holding more than MAX_JSON_VALUES values."""
    stack, count = [(value, 1)], 0
    while stack:
        item, depth = stack.pop()
        count += 1
        if depth > MAX_JSON_DEPTH:
            raise TietaError(f"{what} nests more than {MAX_JSON_DEPTH} levels deep")
        if count > MAX_JSON_VALUES:
            raise TietaError(f"{what} holds more than {MAX_JSON_VALUES:,} values")
        if isinstance(item, dict):
            stack.extend((child, depth + 1) for child in item.values())
        elif isinstance(item, list):
            stack.extend((child, depth + 1) for child in item)


def _no_constant(name: str) -> Any:
    raise ValueError(f"{name} is not JSON")


def _finite(text: str) -> float:
    value = float(text)
    if value != value or value in (float("inf"), float("-inf")):
        raise ValueError(f"{text} is too large for a number")
    return value


def parse_json(text: str | bytes, what: str, allow_nan: bool = False) -> Any:
    """JSON text as a value, within the depth and value-count limits; NaN and Infinity (which strict
    JSON lacks) only with ``allow_nan``.

    Raises:
        TietaError: "{what} is not valid JSON (...)" or a limit, in one sentence.
    """
    if isinstance(text, bytes):
        try:
            text = text.decode("utf-8")
        except UnicodeDecodeError as error:
            raise TietaError(f"{what} is not UTF-8 text (byte {error.start})") from None
    if len(text) > MAX_JSON_BYTES:
        raise TietaError(f"{what} is more than {MAX_JSON_BYTES:,} characters of JSON")
    try:
        value = json.loads(text, parse_constant=None if allow_nan else _no_constant,
                           parse_float=float if allow_nan else _finite)
    except RecursionError:
        raise TietaError(f"{what} nests more than {MAX_JSON_DEPTH} levels deep") from None
    except ValueError as error:
        raise TietaError(f"{what} is not valid JSON ({str(error).splitlines()[0]})") from None
    _check_shape(value, what)
    return value


def is_number(value: Any) -> bool:
    """Whether a value read back is a finite number (JSON and YAML also give true, NaN and
    Infinity, which no count or accuracy may be; an integer past a float's range is not one either)."""
    try:
        return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)
    except OverflowError:
        return False


def read_json(path: str | Path, what: str, limit: int = MAX_JSON_BYTES, allow_nan: bool = False) -> Any:
    """The JSON value in a regular file of at most ``limit`` bytes (see :func:`parse_json`)."""
    return parse_json(read_regular(path, what, limit), f"{what} {path}", allow_nan)


def remove_folder(path: Path) -> None:
    """Remove a folder tieta made, quietly (what cannot be removed stays)."""
    shutil.rmtree(path, ignore_errors=True)


def files_named(paths: list[str | Path], skip: Callable[[Path, str], None], suffixes: Iterable[str]) -> list[Path]:
    """The files named, and those with one of ``suffixes`` inside the folders named (recursively,
    sorted); ``skip(path, reason)`` hears of a name that does not exist."""
    suffixes = set(suffixes)
    found: list[Path] = []
    for path in map(Path, paths):
        if path.is_dir():
            found += sorted(p for p in path.rglob("*") if p.is_file() and p.suffix.lower() in suffixes)
        elif path.is_file():
            found.append(path)
        else:
            skip(path, "does not exist")
    return found
