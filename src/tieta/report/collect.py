"""Reading a sweep folder: which runs finished, their summaries, and what is missing.

A folder written by ``tieta sweep`` has its plan (sweep.yaml), so the grid is known and missing
cells can be named. Any other folder of run folders is read by discovery: every summary.json under
it, named by its task folder, method and seed.
"""

from __future__ import annotations

import json
import math
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Optional

from tieta import safe_yaml
from tieta.data.vtab import open_task
from tieta.errors import TietaError
from tieta.sweep.plan import PLAN_FILE, plan_from_dict
from tieta.sweep.vtab1k import VTAB_1K
from tieta.train.rundir import CONFIG, FINISHED, INCOMING, STATE, SUMMARY, read_state


@dataclass
class RunRecord:
    """One finished run: where it is and what its summary says."""

    task: str
    run: str
    seed: int
    folder: Path
    summary: dict[str, Any]
    config: dict[str, Any]


@dataclass
class SweepResults:
    tasks: list[str]  # in plan order
    groups: dict[str, Optional[str]]  # task -> group (None: in no group)
    task_paths: dict[str, Path]
    runs: list[str]  # in plan order; the first is the baseline of speedups
    seeds: list[int]
    records: list[RunRecord]
    missing: list[str] = field(default_factory=list)  # "task · run · seed k: why"

    def record(self, task: str, run: str, seed: int) -> Optional[RunRecord]:
        return next((r for r in self.records if (r.task, r.run, r.seed) == (task, run, seed)), None)


def _read_json(path: Path) -> Optional[dict[str, Any]]:
    try:
        values = json.loads(path.read_text())
    except (OSError, ValueError, UnicodeDecodeError):
        return None
    return values if isinstance(values, dict) else None


def _is_summary(values: Optional[dict[str, Any]]) -> bool:
    """Whether a summary.json holds the numbers a report reads (anything else is not a finished run)."""
    def number(value: Any) -> bool:  # JSON as Python writes it may hold NaN and Infinity
        return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)

    return values is not None and number(values.get("acc")) and number(values.get("best_acc", 0.0))


def _read_config(folder: Path) -> dict[str, Any]:
    try:
        values = safe_yaml.read_file(folder / CONFIG, "run config")
    except TietaError:
        return {}
    return values if isinstance(values, dict) else {}


def collect(folder: str | Path) -> SweepResults:
    """Read the finished runs under ``folder`` (a sweep folder, or any folder of run folders)."""
    folder = Path(folder)
    if not folder.is_dir():
        raise TietaError(f"{folder} is not a folder")
    if (folder / PLAN_FILE).is_file():
        results = _collect_planned(folder)
    else:
        results = _collect_discovered(folder)
    if not results.records:
        raise TietaError(f"{folder} holds no finished run (no summary.json)" +
                         (f"; missing: {results.missing[0]}" if results.missing else ""))
    return results


def _collect_planned(folder: Path) -> SweepResults:
    plan = plan_from_dict(safe_yaml.read_file(folder / PLAN_FILE, "the sweep's plan"), str(folder / PLAN_FILE))
    records, missing = [], []
    for cell in plan.cells():
        run_folder = folder / cell.folder
        summary = _read_json(run_folder / SUMMARY)
        if _is_summary(summary):
            records.append(RunRecord(cell.task.name, cell.run.name, cell.seed, run_folder, summary,
                                     _read_config(run_folder)))
        else:
            state = ("summary.json unreadable" if (run_folder / SUMMARY).exists() else
                     read_state(run_folder).describe() if (run_folder / CONFIG).is_file() else "not run")
            missing.append(f"{cell.label}: {state}")
    return SweepResults([t.name for t in plan.tasks], {t.name: t.group for t in plan.tasks},
                        {t.name: t.path for t in plan.tasks}, [r.name for r in plan.runs], list(plan.seeds),
                        records, missing)


def _collect_discovered(folder: Path) -> SweepResults:
    records, missing = [], []
    for summary_file in sorted(folder.rglob(SUMMARY)):
        summary = _read_json(summary_file)
        if not _is_summary(summary):
            continue
        config = _read_config(summary_file.parent)
        seed = config.get("seed", 0)
        if type(seed) is not int:
            missing.append(f"{summary_file.parent}: its {CONFIG} gives no whole-number seed ({seed!r})")
            continue
        data = Path(str(summary.get("data", summary_file.parent.name)))
        records.append(RunRecord(data.name, str(summary.get("method", "?")), seed, summary_file.parent, summary,
                                 config))
    for state_file in sorted(folder.rglob(STATE)):  # runs that started but did not finish
        if INCOMING in state_file.parts:  # a replacement, not yet moved in
            continue
        state = read_state(state_file.parent)
        if state.state != FINISHED:
            missing.append(f"{state_file.parent}: {state.describe()}")
    tasks = list(dict.fromkeys(r.task for r in records))
    paths = {name: Path(str(next(r.summary.get("data") for r in records if r.task == name))) for name in tasks}
    return SweepResults(tasks, {name: VTAB_1K.get(name, (None,))[0] for name in tasks}, paths,
                        list(dict.fromkeys(r.run for r in records)), sorted({r.seed for r in records}), records,
                        missing)


def majority_share(task_path: Path, split: str) -> Optional[float]:
    """Top-1 (%) of always answering the split's most frequent class; None where the data is gone."""
    try:
        labels = [label for _, label in open_task(task_path).split(split)]
    except TietaError:
        return None
    if not labels:
        return None
    return 100.0 * Counter(labels).most_common(1)[0][1] / len(labels)
