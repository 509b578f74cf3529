"""A run folder: config.yaml, metrics.jsonl, summary.json and checkpoint.safetensors."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import yaml

from tieta.errors import TietaError

CONFIG = "config.yaml"
METRICS = "metrics.jsonl"
SUMMARY = "summary.json"
CHECKPOINT = "checkpoint.safetensors"
RUN_FILES = (CONFIG, METRICS, SUMMARY, CHECKPOINT)


class RunDir:
    """Where one run writes. Refuses a folder that already holds a run unless ``overwrite``."""

    def __init__(self, path: str | Path, overwrite: bool = False) -> None:
        self.path = Path(path)
        if self.path.exists() and not self.path.is_dir():
            raise TietaError(f"output {self.path} exists and is not a folder")
        if self.path.is_dir() and any(self.path.iterdir()) and not overwrite:
            raise TietaError(f"output folder {self.path} already exists and is not empty; pick another or pass --overwrite")

    def start(self, config: dict[str, Any]) -> None:
        """Create the folder, write the resolved config and start a fresh metrics log."""
        self.path.mkdir(parents=True, exist_ok=True)
        for name in RUN_FILES:  # only tieta's own files are replaced, never anything else in the folder
            (self.path / name).unlink(missing_ok=True)
        (self.path / CONFIG).write_text(yaml.safe_dump(config, sort_keys=False))

    def log(self, record: dict[str, Any]) -> None:
        with open(self.path / METRICS, "a") as handle:
            handle.write(json.dumps(record) + "\n")

    def write_summary(self, summary: dict[str, Any]) -> None:
        (self.path / SUMMARY).write_text(json.dumps(summary, indent=2) + "\n")

    @property
    def checkpoint(self) -> Path:
        return self.path / CHECKPOINT
