"""Reading a sweep folder: which runs finished, their summaries, and what is missing.

A folder written by ``tieta sweep`` has its plan (sweep.yaml), so the grid is known and missing
cells can be named. Any other folder of run folders is read by discovery: every run folder under
it (one with a summary.json or a state.json), named by its task folder, method and seed. Hidden
folders (a name starting with ".") are never searched: they hold replacements in progress.

Nothing read is trusted. Files are read only when they are regular files within a size limit (a
FIFO or a link to a device is refused, never waited on or read without end), and a summary counts
only with accuracies that are percentages. A run that cannot be used is never dropped silently:
it is listed with why, as missing (no usable result) or left out (a result that does not belong in
this comparison: a run folder reached through a symbolic link, a run trained on other data than
its task's other runs, or, in a folder of runs without a plan, one trained with another recipe).
"""

from __future__ import annotations

import json
import os
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Optional

from tieta import safe_yaml
from tieta.data.vtab import open_task
from tieta.dense.dataset import is_segmentation_task
from tieta.video.dataset import is_video_task, open_video_task
from tieta.errors import TietaError, shown
from tieta.files import is_number, read_json
from tieta.sweep.plan import PLAN_FILE, plan_from_dict
from tieta.sweep.vtab1k import VTAB_1K
from tieta.train.rundir import CONFIG, FINISHED, STATE, SUMMARY, read_state


@dataclass
class RunRecord:
    """One finished run: where it is and what its summary says."""

    task: str
    run: str
    seed: int
    folder: Path
    summary: dict[str, Any]
    config: dict[str, Any]
    label: str = ""  # how the report names it: "task · run · seed k", or its folder


@dataclass
class SweepResults:
    tasks: list[str]  # in plan order
    groups: dict[str, Optional[str]]  # task -> group (None: in no group)
    task_paths: dict[str, Path]
    runs: list[str]  # in plan order; the first is the baseline of speedups
    seeds: list[int]
    records: list[RunRecord]
    missing: list[str] = field(default_factory=list)  # "task · run · seed k: why" (no usable result)
    left_out: list[str] = field(default_factory=list)  # "task · run · seed k: why" (a result not compared)

    def record(self, task: str, run: str, seed: int) -> Optional[RunRecord]:
        return next((r for r in self.records if (r.task, r.run, r.seed) == (task, run, seed)), None)


MAX_SUMMARY_BYTES = 16 << 20  # a summary holds a few numbers and per-block lists
THROUGH_LINK = "reached through a symbolic link (not followed; give the folder itself to report it)"
# what decides how a run was trained, apart from its method: runs that differ in it are not one comparison
RECIPE_KEYS = ("model", "weights", "img_size")


def _reason(error: TietaError, path: Path) -> str:
    """A read error without the file's full path (the list names the run already)."""
    return str(error).replace(f" {path}", "")


def _as_text(value: Any) -> str:
    """A settings value as stable text (YAML may also give dates, sets, or keys of mixed types)."""
    try:
        return json.dumps(value, sort_keys=True, default=str)
    except (TypeError, ValueError):
        return repr(value)


def summary_problem(values: Any) -> Optional[str]:
    """Why a summary.json's values cannot be reported (None where they can): accuracies must be
    percentages, and the entries a report reads must be of the types tieta writes."""
    if not isinstance(values, dict):
        return "summary.json is not a mapping (not a tieta run summary)"
    if "acc" not in values:
        return "summary.json has no acc (not a tieta run summary)"
    for key in ("acc", "best_acc"):
        if key in values and not (is_number(values[key]) and 0 <= values[key] <= 100):
            return f"summary.json gives {key} {shown(values[key])}, not a percentage from 0 to 100"
    for key in ("method", "data", "data_fingerprint", "model"):
        if values.get(key) is not None and not isinstance(values[key], str):
            return f"summary.json gives {key} as {shown(values[key])}, not text"
    if values.get("img_size") is not None and type(values["img_size"]) is not int:
        return f"summary.json gives img_size as {shown(values['img_size'])}, not a whole number"
    return None


def config_problem(values: Any) -> Optional[str]:
    """Why a run's config.yaml cannot be read as tieta's settings (None where it can)."""
    if not isinstance(values, dict):
        return "config.yaml is not a mapping of settings"
    for section in ("data", "optim"):
        if values.get(section) is not None and not isinstance(values[section], dict):
            return f"config.yaml gives {section} as {shown(values[section])}, not a mapping"
    for key in ("model", "weights", "method"):
        if values.get(key) is not None and not isinstance(values[key], str):
            return f"config.yaml gives {key} as {shown(values[key])}, not text"
    if values.get("img_size") is not None and type(values["img_size"]) is not int:
        return f"config.yaml gives img_size as {shown(values['img_size'])}, not a whole number"
    if "seed" in values and type(values["seed"]) is not int:
        text = repr(values["seed"])
        return f"config.yaml gives no whole-number seed ({text if len(text) <= 40 else text[:37] + '...'})"
    split = (values.get("data") or {}).get("eval_split")
    if split is not None and not isinstance(split, str):
        return f"config.yaml gives data.eval_split as {shown(split)}, not a name"
    return None


def _read_summary(folder: Path) -> tuple[Optional[dict[str, Any]], str]:
    """(summary, "") where the run's summary.json can be reported, else (None, why not)."""
    path = folder / SUMMARY
    try:
        values = read_json(path, SUMMARY, MAX_SUMMARY_BYTES, allow_nan=True)  # an older tieta wrote NaN
    except TietaError as error:
        return None, _reason(error, path)
    problem = summary_problem(values)
    return (None, problem) if problem else (values, "")


def _read_config(folder: Path) -> tuple[dict[str, Any], str]:
    """(settings, "") of a run's config.yaml ({} where it has none), else ({}, why they are unusable)."""
    path = folder / CONFIG
    if not os.path.lexists(path):
        return {}, ""
    try:
        values = safe_yaml.read_file(path, CONFIG)
    except TietaError as error:
        return {}, _reason(error, path)
    problem = config_problem(values)
    return ({}, problem) if problem else (values, "")


def _read_run(folder: Path, label: str, name: Optional[tuple[str, str, int]] = None
              ) -> tuple[Optional[RunRecord], str]:
    """The finished run in ``folder`` as a record, or (None, why there is none to report).

    Args:
        name: (task, run, seed) from a sweep's plan; without it, they come from the run's files.
    """
    if not os.path.lexists(folder / SUMMARY):
        state = read_state(folder)
        if state.state == "empty":
            return None, "not run"
        if state.state == FINISHED:
            return None, "finished, but its summary.json is missing"
        return None, state.describe()
    summary, why = _read_summary(folder)
    if summary is None:
        return None, why
    config, why = _read_config(folder)
    if why:
        return None, why
    if name is None:
        seed = config.get("seed", 0)
        data = summary.get("data")
        name = (Path(data).name if data else folder.name, summary.get("method") or "?", seed)
    return RunRecord(*name, folder, summary, config, label), ""


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
        unused = results.missing + results.left_out
        raise TietaError(f"{folder} holds no finished run that can be reported" +
                         (f" ({len(unused)} left out or missing, first {unused[0]})" if unused else
                          " (no summary.json)"))
    return results


def _through_link(root: Path, relative: Path) -> bool:
    """Whether some folder on the way from ``root`` down ``relative`` is a symbolic link."""
    here = root
    for part in relative.parts:
        here = here / part
        if os.path.islink(here):
            return True
    return False


def _collect_planned(folder: Path) -> SweepResults:
    plan = plan_from_dict(safe_yaml.read_file(folder / PLAN_FILE, "the sweep's plan"), str(folder / PLAN_FILE))
    records, missing, left_out = [], [], []
    for cell in plan.cells():
        if _through_link(folder, cell.folder):
            left_out.append(f"{cell.label}: {THROUGH_LINK}")
            continue
        record, why = _read_run(folder / cell.folder, cell.label, (cell.task.name, cell.run.name, cell.seed))
        if record is not None:
            records.append(record)
        else:
            missing.append(f"{cell.label}: {why}")
    records = _one_data_per_task(records, left_out)
    return SweepResults([t.name for t in plan.tasks], {t.name: t.group for t in plan.tasks},
                        {t.name: t.path for t in plan.tasks}, [r.name for r in plan.runs], list(plan.seeds),
                        records, missing, left_out)


def run_folders(root: Path) -> tuple[list[Path], list[Path]]:
    """(the run folders under ``root``, the folders under it reached through a symbolic link that
    hold a run), each sorted. A run folder holds a summary.json or a state.json; hidden folders
    are not searched, and links are not followed."""
    found, linked = [], []
    for here, folders, files in os.walk(root, followlinks=False):
        folders[:] = sorted(name for name in folders if not name.startswith("."))
        here = Path(here)
        for name in folders:
            if os.path.islink(here / name) and any(os.path.lexists(here / name / f) for f in (SUMMARY, STATE)):
                linked.append(here / name)
        if SUMMARY in files or STATE in files:
            found.append(here)
    return sorted(found), sorted(linked)


def _collect_discovered(folder: Path) -> SweepResults:
    records, missing, left_out = [], [], []
    found, linked = run_folders(folder)
    left_out += [f"{path}: {THROUGH_LINK}" for path in linked]
    for run_folder in found:
        record, why = _read_run(run_folder, str(run_folder))
        if record is not None:
            records.append(record)
        else:
            missing.append(f"{run_folder}: {why}")
    records = _one_recipe(_one_data_per_task(records, left_out), left_out)
    tasks = list(dict.fromkeys(r.task for r in records))
    paths = {}
    for name in tasks:
        data = next((r.summary.get("data") for r in records if r.task == name and r.summary.get("data")), None)
        if data:
            paths[name] = Path(data)
    return SweepResults(tasks, {name: VTAB_1K.get(name, (None,))[0] for name in tasks}, paths,
                        list(dict.fromkeys(r.run for r in records)), sorted({r.seed for r in records}), records,
                        missing, left_out)


def _written(record: RunRecord) -> int:
    try:
        return os.stat(record.folder / SUMMARY).st_mtime_ns
    except OSError:
        return 0


def _prevailing(records: list[RunRecord], key) -> Any:
    """The value of ``key`` that most records share (ties: the one of the latest run)."""
    values = [key(r) for r in records]
    counts, latest = Counter(values), {}
    for value, record in zip(values, records):
        latest[value] = max(latest.get(value, 0), _written(record))
    return max(counts, key=lambda value: (counts[value], latest[value]))


def _one_data_per_task(records: list[RunRecord], left_out: list[str]) -> list[RunRecord]:
    """The records without those trained on other data than most runs of their task (their
    summaries' data fingerprints differ), which are listed in ``left_out``; a run of an older tieta
    without a fingerprint is kept."""
    def fingerprint(record: RunRecord) -> Optional[str]:
        return record.summary.get("data_fingerprint")

    kept = []
    for task in dict.fromkeys(r.task for r in records):
        mine = [r for r in records if r.task == task]
        printed = [r for r in mine if fingerprint(r)]
        chosen = _prevailing(printed, fingerprint) if printed else None
        for record in mine:
            if fingerprint(record) and fingerprint(record) != chosen:
                share = sum(fingerprint(r) == chosen for r in printed)
                left_out.append(f"{record.label}: trained on other data ({fingerprint(record)}) than {share} other "
                                f"run{'s' if share != 1 else ''} of {task} ({chosen})")
            else:
                kept.append(record)
    return kept


def recipe(record: RunRecord) -> dict[str, str]:
    """What decides how a run was trained apart from its method and seed: the model, its weights,
    the input size and every optimisation setting (values as JSON text)."""
    config = record.config
    values = {key: config.get(key) for key in RECIPE_KEYS}
    if record.summary.get("img_size") is not None:  # the size it ran at, where the config left the model's
        values["img_size"] = record.summary["img_size"]
    optim = sorted((config.get("optim") or {}).items(), key=lambda item: str(item[0]))
    values.update({f"optim.{key}": value for key, value in optim})
    return {key: _as_text(value) for key, value in values.items()}


def _one_recipe(records: list[RunRecord], left_out: list[str]) -> list[RunRecord]:
    """The records trained with the recipe most runs share; the others are listed in ``left_out``
    with their first difference (a folder of runs without a plan may mix experiments)."""
    if not records:
        return records
    chosen = _prevailing(records, lambda r: tuple(sorted(recipe(r).items())))
    chosen_recipe = dict(chosen)
    share = sum(tuple(sorted(recipe(r).items())) == chosen for r in records)
    kept = []
    for record in records:
        mine = recipe(record)
        differing = [key for key in sorted(set(mine) | set(chosen_recipe)) if mine.get(key) != chosen_recipe.get(key)]
        if differing:
            key = differing[0]
            left_out.append(f"{record.label}: trained with another recipe ({key} {mine.get(key, 'unset')} where "
                            f"{share} other run{'s' if share != 1 else ''} used {chosen_recipe.get(key, 'unset')})")
        else:
            kept.append(record)
    return kept


def majority_share(task_path: Optional[Path], split: str) -> Optional[float]:
    """Top-1 (%) of always answering the split's most frequent class; None where the data is gone
    (or was never recorded; and for a segmentation task, whose pixels have no such score)."""
    if task_path is None or is_segmentation_task(task_path):
        return None
    try:
        opened = open_video_task(task_path) if is_video_task(task_path) else open_task(task_path)
        labels = [label for _, label in opened.split(split)]
    except TietaError:
        return None
    if not labels:
        return None
    return 100.0 * Counter(labels).most_common(1)[0][1] / len(labels)
