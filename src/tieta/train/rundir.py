"""A run folder, written so that nothing in it is ever lost or half-written.

    config.yaml              the resolved settings, and what the run resolved of its inputs
                             (``resolved``: the normalisation's numbers, the backbone's identity;
                             tieta.train.record)
    metrics.jsonl            one JSON line per epoch (strict JSON: a non-finite number is null)
    progress.safetensors     the resumable checkpoint, replaced after every epoch
    checkpoint.safetensors   the trained tensors, once the run has finished
    checkpoint_best.safetensors  the trained tensors of the best evaluated epoch (by top-1)
    summary.csv, tensorboard/, wandb/, wandb.json   what the loggers asked for write (tieta.train.loggers)
    summary.json             accuracy and cost, once the run has finished
    state.json               running, finished, failed (with the reason) or interrupted

Every file is written by :func:`tieta.files.write_file` (a unique temporary file, never through a
link, renamed into place), so a reader (or a run killed at any moment) sees the old file or the new
one, never a part. A lock (``.lock``, an ``flock`` the kernel releases when the process dies, even
by SIGKILL) keeps a second process out while a run writes. A run that replaces another
(``overwrite``) writes into a folder beside it (``.NAME.tieta-incoming-*``) until its first
checkpoint exists; then the two folders are exchanged in one step (the user's own files in the old
folder are carried over first), so the name holds the old run or the new one, never a mix.
"""

from __future__ import annotations

import datetime
import fcntl
import glob
import json
import math
import os
import shutil
import socket
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Optional

import yaml

from tieta.errors import TietaError
from tieta.files import (append_line, overwrite_in_place, parse_json, read_json, read_regular, remove_folder,
                         swap_folders, write_file)

CONFIG = "config.yaml"
METRICS = "metrics.jsonl"
SUMMARY = "summary.json"
CHECKPOINT = "checkpoint.safetensors"
CHECKPOINT_BEST = "checkpoint_best.safetensors"
PROGRESS = "progress.safetensors"
STATE = "state.json"
LOCK = ".lock"
INCOMING = ".incoming"  # where an older tieta staged a replacement inside the run folder
STAGING = ".tieta-incoming-"  # a replacement's folder beside the run: .NAME.tieta-incoming-XXXX
# written by tieta but not results: a folder holding only these holds no run
HOUSEKEEPING = (LOCK, INCOMING)
# the files of a run (what a replacement does not carry over from the run it replaces)
RUN_FILES = (CONFIG, METRICS, SUMMARY, CHECKPOINT, PROGRESS, STATE, "backbone.safetensors", *HOUSEKEEPING,
             CHECKPOINT_BEST, "summary.csv", "tensorboard", "wandb", "wandb.json")

RUNNING, FINISHED, FAILED, INTERRUPTED = "running", "finished", "failed", "interrupted"


@dataclass
class RunState:
    """What a run folder says about its run.

    Attributes:
        state: running, finished, failed, interrupted, or "empty" (no run in it).
        reason: why it failed or stopped.
        epoch: epochs completed and checkpointed; epochs: epochs planned.
    """

    state: str
    reason: str = ""
    epoch: int = 0
    epochs: int = 0

    def describe(self) -> str:
        where = f" after epoch {self.epoch} of {self.epochs}" if self.epochs else ""
        return f"{self.state}{where}" + (f": {self.reason}" if self.reason else "")


def strict_json(value: Any) -> Any:
    """``value`` with every non-finite float replaced by None, so that it is valid JSON."""
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if isinstance(value, dict):
        return {key: strict_json(item) for key, item in value.items()}
    if isinstance(value, (list, tuple)):
        return [strict_json(item) for item in value]
    return value


def _open_lock(path: Path):
    """The lock file, opened for writing without following a symbolic link (the pid written into it
    must never land in a file someone linked there)."""
    return os.fdopen(os.open(path, os.O_RDWR | os.O_CREAT | os.O_NOFOLLOW, 0o644), "r+")


def _lock_is_held(folder: Path) -> bool:
    """Whether a live process holds ``folder``'s lock (probing takes and drops it at once)."""
    lock = folder / LOCK
    if not lock.is_file():
        return False
    try:
        with _open_lock(lock) as handle:
            try:
                fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                return True
            fcntl.flock(handle, fcntl.LOCK_UN)
    except OSError:
        return False
    return False


def read_state(folder: str | Path) -> RunState:
    """The state of the run in ``folder``: a "running" run whose lock is free was killed
    (interrupted); a folder from before state files counts as finished if it has its summary."""
    folder = Path(folder)
    if not os.path.lexists(folder / STATE):
        if (folder / SUMMARY).is_file():
            return RunState(FINISHED)
        return RunState("empty" if not (folder / CONFIG).is_file() else INTERRUPTED)
    try:
        values = read_json(folder / STATE, "run state", limit=1 << 20)
        state = RunState(values["state"], values.get("reason", ""), values.get("epoch", 0), values.get("epochs", 0))
    except (TietaError, KeyError, TypeError, AttributeError):
        return RunState(FAILED, f"{STATE} is unreadable")
    counts = (state.epoch, state.epochs)
    if (state.state not in (RUNNING, FINISHED, FAILED, INTERRUPTED) or not isinstance(state.reason, str)
            or not all(type(n) is int and 0 <= n < 10**9 for n in counts)):
        return RunState(FAILED, f"{STATE} is not what tieta writes")
    if state.state == RUNNING and not _lock_is_held(folder):
        state.state, state.reason = INTERRUPTED, "its process ended without a word (killed?)"
    return state


def _write_owner(handle) -> None:
    handle.seek(0)
    handle.truncate()
    handle.write(f"pid {os.getpid()} on {socket.gethostname()}\n")
    handle.flush()


def _carry_user_files(old: Path, new: Path) -> None:
    """Give the replacement the files in the old run folder that are not the run's (the user's own),
    as hard links where the file system allows (nothing is copied or lost if killed meanwhile)."""
    for entry in old.iterdir():
        if entry.name in RUN_FILES or os.path.lexists(new / entry.name):
            continue
        if entry.is_dir() and not entry.is_symlink():
            shutil.copytree(entry, new / entry.name, symlinks=True, copy_function=_link_or_copy)
        else:
            _link_or_copy(entry, new / entry.name)


def _link_or_copy(source: str | Path, target: str | Path) -> None:
    try:
        os.link(source, target, follow_symlinks=False)
    except OSError:
        shutil.copy2(source, target, follow_symlinks=False)


def holds_run(folder: Path) -> bool:
    """Whether ``folder`` holds anything but tieta's housekeeping."""
    return folder.is_dir() and any(entry.name not in HOUSEKEEPING for entry in folder.iterdir())


class RunDir:
    """Where one run writes.

    Args:
        path: the run folder.
        overwrite: replace the run already in ``path`` (only once the new run has checkpointed).
        resume: continue the run in ``path``.

    Creating a RunDir only checks; ``open`` takes the folder (lock, state "running").
    """

    def __init__(self, path: str | Path, overwrite: bool = False, resume: bool = False) -> None:
        self.path = Path(path)
        self.resume = resume
        if self.path.exists() and not self.path.is_dir():
            raise TietaError(f"output {self.path} exists and is not a folder")
        if self.path.is_dir() and _lock_is_held(self.path):
            raise TietaError(f"run folder {self.path} is in use by another tieta process "
                             f"({(self.path / LOCK).read_text().strip() or 'unknown'})")
        self.overwrite = overwrite
        self.epoch, self.epochs = 0, 0
        self._lock = None
        self._staging_lock = None
        self._decide()

    def _decide(self) -> None:
        """Whether the folder may be used, and whether its run is replaced (checked again under the
        lock: another process may have written into it since)."""
        occupied = holds_run(self.path)
        if self.resume and not (self.path / CONFIG).is_file():
            raise TietaError(f"{self.path} holds no run to resume (no {CONFIG})")
        if occupied and not (self.overwrite or self.resume):
            raise TietaError(f"output folder {self.path} already exists and is not empty; pick another, pass "
                             "--overwrite to replace it, or --resume to continue it")
        self.replacing = occupied and self.overwrite and not self.resume
        self.writes_to = self.path

    def check_writable(self, needed_bytes: int = 0) -> None:
        """Refuse a folder that cannot be written or a disk without room for ``needed_bytes``."""
        existing = self.path
        while not existing.exists():
            existing = existing.parent
        if not existing.is_dir():
            raise TietaError(f"cannot create {self.path}: {existing} is a file, not a folder")
        if not os.access(existing, os.W_OK | os.X_OK):
            raise TietaError(f"cannot write to {existing}: permission denied (read-only?)")
        free = shutil.disk_usage(existing).free
        if free < needed_bytes:
            raise TietaError(f"{existing} has {free / 2**20:.1f} MiB free, and this run needs about "
                             f"{needed_bytes / 2**20:.1f} MiB for its checkpoints")

    def open(self) -> None:
        """Create the folder and take its lock (before this, nothing has been written)."""
        try:
            self.path.mkdir(parents=True, exist_ok=True)
            handle = _open_lock(self.path / LOCK)
        except OSError as error:
            raise TietaError(f"cannot create the run folder {self.path}: {error.strerror}") from None
        try:
            fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            handle.close()
            raise TietaError(f"run folder {self.path} is in use by another tieta process") from None
        try:
            self._decide()
        except TietaError:
            handle.close()
            raise
        _write_owner(handle)
        self._lock = handle
        if self.replacing:
            self._stage()

    def _stage(self) -> None:
        """Make the folder beside the run that the replacement writes into (and take its lock)."""
        prefix = f".{self.path.name}{STAGING}"
        for leftover in self.path.parent.glob(glob.escape(prefix) + "*"):  # from replacements that were killed
            if leftover.is_dir() and not leftover.is_symlink() and not _lock_is_held(leftover):
                remove_folder(leftover)
        try:
            staging = Path(tempfile.mkdtemp(prefix=prefix, dir=self.path.parent))
            handle = _open_lock(staging / LOCK)
        except OSError as error:
            raise TietaError(f"cannot write beside {self.path}: {error.strerror}") from None
        fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
        _write_owner(handle)
        self.writes_to, self._staging_lock = staging, handle

    def close(self) -> None:
        """Release the lock (and drop an unfinished replacement)."""
        if self.replacing:
            remove_folder(self.writes_to)
            self.replacing, self.writes_to = False, self.path
        for handle in (self._staging_lock, self._lock):
            if handle is not None:
                handle.close()
        self._lock = self._staging_lock = None

    def file(self, name: str) -> Path:
        """Where ``name`` is written now (inside ``.incoming/`` until a replacement moves in)."""
        return self.writes_to / name

    def start(self, config: dict[str, Any], epochs: int, epoch: int = 0) -> None:
        """Write the resolved config (a resumed run keeps its own) and the state "running" from
        ``epoch`` (the epochs already checkpointed) of ``epochs``."""
        if not self.resume:  # the folder (or .incoming/) holds no run files: nothing is replaced here
            write_file(self.file(CONFIG), yaml.safe_dump(config, sort_keys=False))
        self.epochs = epochs
        self.set_state(RUNNING, epoch=epoch)

    def set_state(self, state: str, reason: str = "", epoch: Optional[int] = None, last_resort: bool = False) -> None:
        """Record the run's state; ``last_resort``: where the disk is full, over the old state's own
        bytes (a run that failed for want of space still says so)."""
        if epoch is not None:
            self.epoch = epoch
        record = {"state": state, "reason": reason, "epoch": self.epoch, "epochs": self.epochs,
                  "updated": datetime.datetime.now().isoformat(timespec="seconds"), "pid": os.getpid()}
        text = json.dumps(record, indent=2) + "\n"
        try:
            write_file(self.file(STATE), text)
        except TietaError:
            if not last_resort or not self.file(STATE).is_file():
                raise
            overwrite_in_place(self.file(STATE), json.dumps(record) + "\n")

    def read_metrics(self, epochs: int) -> list[dict[str, Any]]:
        """The readable records of the first ``epochs`` epochs in the metrics log (for checkpoints of
        an older tieta, which did not keep their own copy)."""
        records = []
        if self.file(METRICS).is_file():
            for line in read_regular(self.file(METRICS), "metrics log", 1 << 28).decode(errors="replace").splitlines():
                try:
                    record = parse_json(line, "a metrics line")
                except TietaError:
                    continue
                if isinstance(record, dict) and type(record.get("epoch")) is int and record["epoch"] <= epochs:
                    records.append(record)
        return records

    def restore_metrics(self, records: list[dict[str, Any]]) -> None:
        """Rewrite the metrics log as the records of the checkpointed epochs (the checkpoint's own
        copy: lines in the file that cannot be read lose nothing)."""
        write_file(self.file(METRICS), "".join(json.dumps(strict_json(r)) + "\n" for r in records))

    def log(self, record: dict[str, Any]) -> None:
        append_line(self.file(METRICS), json.dumps(strict_json(record), allow_nan=False))

    def checkpointed(self, epoch: int) -> None:
        """The progress checkpoint of ``epoch`` is on disk: a replacement moves in now."""
        if self.replacing:
            staging = self.writes_to
            _carry_user_files(self.path, staging)
            swap_folders(staging, self.path)  # one step: the name holds the old run or the new one
            self._lock, self._staging_lock = self._staging_lock, self._lock
            remove_folder(staging)  # now the old run
            self._staging_lock.close()
            self._staging_lock = None
            self.replacing, self.writes_to = False, self.path
        self.set_state(RUNNING, epoch=epoch)

    def finish(self, summary: dict[str, Any]) -> None:
        write_file(self.file(SUMMARY), json.dumps(strict_json(summary), indent=2) + "\n")
        self.file(PROGRESS).unlink(missing_ok=True)  # the finished run needs no optimizer state
        self.set_state(FINISHED)

    @property
    def checkpoint(self) -> Path:
        return self.file(CHECKPOINT)

    @property
    def progress(self) -> Path:
        return self.file(PROGRESS)
