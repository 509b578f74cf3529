"""Where a run's epochs are logged besides metrics.jsonl: ``summary.csv``, TensorBoard, W&B.

``log: [csv, tensorboard, wandb]`` (``--log``, repeatable) picks them; each gets every epoch's
record after its checkpoint is on disk (so a replacement run has moved into its folder).

- csv: ``summary.csv`` in the run folder, timm's columns (epoch, train_loss, eval_loss, eval_top1,
  eval_top5, lr), rewritten whole from the checkpointed records by :func:`tieta.files.write_file`;
  a resumed run rewrites it from its checkpoint, so it never holds an epoch twice.
- tensorboard: event files in ``tensorboard/``; a resumed run purges the events past its checkpoint.
- wandb: one W&B run per run folder (its id kept in ``wandb.json``, so a resume continues it), in
  ``wandb/`` of the run folder unless ``WANDB_DIR`` says otherwise; ``WANDB_MODE=offline`` writes
  nothing to the network.

No logger draws from a random generator the run uses: every call keeps torch's, numpy's and
Python's states as they were, so logging never changes what a run (or its resume) computes.
"""

from __future__ import annotations

import contextlib
import csv
import io
import json
import os
import random
import secrets
from pathlib import Path
from typing import Any, Iterator, Optional

import numpy as np
import torch

from tieta.errors import TietaError
from tieta.files import read_json, write_file

SUMMARY_CSV = "summary.csv"
TENSORBOARD = "tensorboard"
WANDB = "wandb"
WANDB_ID = "wandb.json"
# timm's summary.csv columns -> the key of tieta's epoch record
CSV_COLUMNS = {"epoch": "epoch", "train_loss": "loss", "eval_loss": "eval_loss", "eval_top1": "acc",
               "eval_top5": "top5", "lr": "lr"}
# what TensorBoard and W&B get of each record: its numbers but the epoch (their step)
_SKIPPED = ("epoch",)


def check_available(loggers: list[str]) -> None:
    """Refuse loggers whose package is not installed, before the run starts (one sentence each)."""
    for logger in loggers:
        if logger == "tensorboard":
            _import_tensorboard()
        elif logger == "wandb":
            _import_wandb()


def _import_tensorboard():
    try:
        from torch.utils.tensorboard import SummaryWriter
    except ImportError:
        raise TietaError("--log tensorboard needs the tensorboard package: pip install 'tieta[tensorboard]'") from None
    return SummaryWriter


def _import_wandb():
    try:
        import wandb
    except ImportError:
        raise TietaError("--log wandb needs the wandb package: pip install 'tieta[wandb]'") from None
    return wandb


@contextlib.contextmanager
def random_states_kept() -> Iterator[None]:
    """Within the block, torch's (CPU), numpy's and Python's random states cannot change."""
    python, numpy, torch_state = random.getstate(), np.random.get_state(), torch.get_rng_state()
    try:
        yield
    finally:
        random.setstate(python)
        np.random.set_state(numpy)
        torch.set_rng_state(torch_state)


def csv_text(records: list[dict[str, Any]]) -> str:
    """``summary.csv`` of ``records`` (one row per epoch; an epoch without an evaluation, or a
    top-5 of fewer than 5 classes, leaves its cell empty)."""
    out = io.StringIO()
    writer = csv.writer(out, lineterminator="\n")
    writer.writerow(CSV_COLUMNS)
    for record in records:
        writer.writerow(["" if record.get(key) is None else record[key] for key in CSV_COLUMNS.values()])
    return out.getvalue()


def _numbers(record: dict[str, Any]) -> dict[str, float]:
    return {key: float(value) for key, value in record.items()
            if key not in _SKIPPED and isinstance(value, (int, float)) and not isinstance(value, bool)}


class EpochLoggers:
    """The loggers a run asked for, opened on the first epoch they log.

    Args:
        folder: the run folder.
        loggers: names from ``log`` (csv, tensorboard, wandb).
        first_epoch: epochs already checkpointed (a resume): TensorBoard drops later events.
        settings: the resolved config, W&B's run config.
    """

    def __init__(self, folder: Path, loggers: list[str], first_epoch: int, settings: dict[str, Any]) -> None:
        self.folder, self.loggers, self.first_epoch, self.settings = Path(folder), list(loggers), first_epoch, settings
        self._tensorboard = None
        self._wandb = None

    def log(self, records: list[dict[str, Any]]) -> None:
        """Log the last of ``records`` (every checkpointed epoch's, in order: csv rewrites them all)."""
        if not self.loggers or not records:
            return
        record = records[-1]
        with random_states_kept():
            if "csv" in self.loggers:
                write_file(self.folder / SUMMARY_CSV, csv_text(records))
            if "tensorboard" in self.loggers:
                self._log_tensorboard(record)
            if "wandb" in self.loggers:
                self._log_wandb(record)

    def _log_tensorboard(self, record: dict[str, Any]) -> None:
        if self._tensorboard is None:
            writer = _import_tensorboard()
            # a resumed run's events past its checkpoint were never checkpointed: drop them
            purge = self.first_epoch + 1 if self.first_epoch else None
            self._tensorboard = writer(log_dir=str(self.folder / TENSORBOARD), purge_step=purge)
        for key, value in _numbers(record).items():
            self._tensorboard.add_scalar(key, value, record["epoch"])
        self._tensorboard.flush()

    def _wandb_id(self) -> str:
        path = self.folder / WANDB_ID
        if path.is_file():
            kept = read_json(path, "W&B run id", limit=1 << 16)
            if isinstance(kept, dict) and isinstance(kept.get("id"), str) and kept["id"].isalnum():
                return kept["id"]
        run_id = secrets.token_hex(8)
        write_file(path, json.dumps({"id": run_id}) + "\n")
        return run_id

    def _log_wandb(self, record: dict[str, Any]) -> None:
        if self._wandb is None:
            wandb = _import_wandb()
            where = {} if os.environ.get("WANDB_DIR") else {"dir": str(self.folder)}
            self._wandb = wandb.init(id=self._wandb_id(), resume="allow", name=self.folder.name,
                                     config=self.settings, **where)
        self._wandb.log(_numbers(record), step=record["epoch"])

    def close(self) -> None:
        with random_states_kept():
            if self._tensorboard is not None:
                self._tensorboard.close()
            if self._wandb is not None:
                self._wandb.finish()
        self._tensorboard = self._wandb = None


def open_loggers(folder: Optional[Path], loggers: list[str], first_epoch: int,
                 settings: dict[str, Any]) -> Optional[EpochLoggers]:
    """The run's loggers (None in a process that does not write the run folder)."""
    return EpochLoggers(folder, loggers, first_epoch, settings) if folder is not None else None
