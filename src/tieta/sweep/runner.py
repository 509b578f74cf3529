"""Running a sweep: every cell an ordinary run folder, finished ones skipped, failures isolated.

Every cell's settings are checked before the first run starts, so a typo fails at once, not hours
in. A cell whose folder holds a finished run with the same settings, trained on the same data
(its summary's data fingerprint), is skipped; one with other settings or other data stops the sweep
before it starts (results are never mixed or replaced); an unfinished one of the same settings is
resumed from its last epoch, any other is trained again. A task folder that is missing or does not
match the sweep file is reported and skipped, unless no task has data at all. A failed run is
reported and the sweep goes on; the summary at the end says what ran, what failed and why. The runs
train on ``--devices``, else on the device the base settings name, else "auto"; with one device in
this process, with several one subprocess per device at a time (``tieta train``), each writing its
log next to the run folders. ``sweep.yaml`` replaces only a plan, never a file of the user's.
"""

from __future__ import annotations

import os
import queue
import stat
import subprocess
import sys
import time
import traceback
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Optional

import yaml

from tieta import files, safe_yaml
from tieta.backbone import RANDOM, builtin_weights, missing_weights
from tieta.data.vtab import Task, open_task
from tieta.errors import TietaError, listing
from tieta.sweep.plan import PLAN_FILE, Cell, SweepPlan, check_size, plan_from_dict
from tieta.train.config import RunConfig, comparable, first_difference, load_config
from tieta.device import resolve_device
from tieta.train.fit import fit, resume_run
from tieta.train.rundir import CONFIG, FINISHED, PROGRESS, SUMMARY, read_state
from tieta.dense.dataset import is_segmentation_task
from tieta.train.segmentation_run import open_planned_task, task_fingerprint
from tieta.video.dataset import is_video_task, open_video_task

FAILURES_LOG = "failures.log"
LOGS = "logs"

TRAINED, FINISHED_BEFORE, FAILED, NO_DATA, NOT_RUN = "trained", "finished before", "failed", "no data", "not run"


@dataclass
class Outcome:
    cell: Cell
    status: str  # one of TRAINED, FINISHED_BEFORE, FAILED, NO_DATA, NOT_RUN
    reason: str = ""
    seconds: float = 0.0


def cell_config(plan: SweepPlan, cell: Cell, device: Optional[str] = None) -> RunConfig:
    overrides = plan.overrides(cell)
    if device is not None:
        overrides["device"] = device
    try:
        return load_config(overrides=overrides)
    except TietaError as error:
        raise TietaError(f"run {cell.run.name}: {error}") from error


def _run_settings(folder: Path) -> Optional[Any]:
    """The settings in a run folder's config.yaml, or None where they cannot be read."""
    try:
        return safe_yaml.read_file(folder / CONFIG, "run config")
    except TietaError:
        return None


def is_finished(folder: Path) -> bool:
    return read_state(folder).state == FINISHED


def resumable(folder: Path, config: RunConfig) -> bool:
    """Whether ``folder`` holds an unfinished run of these settings with an epoch to go on from."""
    if not (folder / PROGRESS).is_file() or read_state(folder).state == FINISHED:
        return False
    old = _run_settings(folder)
    return isinstance(old, dict) and not first_difference(comparable(old), comparable(config.to_dict()))


def check_runs(plan: SweepPlan) -> None:
    """Refuse, before anything is opened or run, a grid past its size limit, a setting of any run
    that cannot work, and base weights that name a file that is not there.

    A cell's settings differ from its run's only in its task folder and seed, which are checked on
    their own: so each run is checked once (with the first seed) and each seed once (with the first
    run), however many tasks there are.
    """
    check_size(len(plan.tasks), len(plan.runs), len(plan.seeds), "the sweep")
    first = plan.tasks[0]
    for run in plan.runs:
        cell_config(plan, Cell(first, run, plan.seeds[0]))
    for seed in plan.seeds[1:]:
        cell_config(plan, Cell(first, plan.runs[0], seed))
    problem = _weights_problem(plan.base.get("weights"))
    if problem:
        raise TietaError(f"base: {problem}; every run would fail on it")


def _weights_problem(weights: Any) -> Optional[str]:
    """Why ``weights`` cannot be read where it names a local file (load_backbone reads any name but
    None, 'random' and a built-in asset's as a file path); None where it can, or names no file."""
    if not isinstance(weights, str) or weights == RANDOM or weights in builtin_weights():
        return None
    path = Path(weights)
    if not path.exists():
        return missing_weights(path)
    if not path.is_file():
        return f"weights file {path} is not a file"
    return None


def sweep_devices(plan: SweepPlan, devices: Optional[list[str]]) -> list[str]:
    """Where the runs train: ``devices`` (--devices), else the base settings' device, else "auto";
    each refused here if this machine lacks it (never silently replaced by another)."""
    chosen = devices or [str(plan.base.get("device", "auto"))]
    for device in chosen:
        resolve_device(device)
    return chosen


def _open_tasks(plan: SweepPlan) -> tuple[dict[str, Task], dict[str, str]]:
    """(task name -> its opened folder, task name -> why it has no data), the second for the
    folders that are missing, unreadable or have another number of classes than the sweep says."""
    found, problems = {}, {}
    for task in plan.tasks:
        try:
            if plan.base.get("data.kind") == "video" or is_video_task(task.path):  # a folder of clips
                found[task.name] = open_video_task(task.path)
            elif plan.base.get("data.kind") == "segmentation" or is_segmentation_task(task.path):  # images, masks
                found[task.name] = open_planned_task(task.path, plan.base)
            else:
                found[task.name] = open_task(task.path, plan.base.get("data.holdout"))
        except TietaError as error:
            problems[task.name] = str(error)
            continue
        if task.classes is not None and found[task.name].num_classes != task.classes:
            problems[task.name] = f"its data has {found[task.name].num_classes} classes, the sweep says {task.classes}"
    if len(problems) == len(plan.tasks):
        (name, reason), *others = problems.items()
        nor = f"; nor do {listing([other for other, _ in others])}" if others else ""
        raise TietaError(f"no task of the sweep has data (task {name}: {reason}{nor}); check the task folders "
                         "(root: in the sweep file, --root or --data)")
    return found, problems


def _data_of_run(folder: Path) -> tuple[str, Any]:
    """(what a finished run's summary records of its data: "data_fingerprint", or "num_classes" in
    a run from before fingerprints, the value); a summary that cannot be read is refused."""
    try:
        summary = files.read_json(folder / SUMMARY, "run summary", allow_nan=True)
    except TietaError as error:
        raise TietaError(f"{folder} holds a finished run whose data cannot be checked ({error}); remove that run "
                         "folder to train it again") from None
    if isinstance(summary, dict) and "data_fingerprint" in summary:
        return "data_fingerprint", summary["data_fingerprint"]
    return "num_classes", summary.get("num_classes") if isinstance(summary, dict) else None


class _DataPrints:
    """The current fingerprint of each (task, splits), computed once however many runs read it."""

    def __init__(self, tasks: dict[str, Task]) -> None:
        self.tasks, self.known = tasks, {}

    def now(self, task: str, config: RunConfig) -> str:
        splits = (config.data.train_split, config.data.eval_split)
        if (task, splits) not in self.known:
            try:
                self.known[task, splits] = task_fingerprint(self.tasks[task], splits)
            except TietaError as error:
                self.known[task, splits] = f"unreadable: {error}"
        return self.known[task, splits]


def _check_finished(cell: Cell, folder: Path, config: RunConfig, prints: _DataPrints) -> None:
    """Refuse a finished run in ``folder`` that another cell's settings or other data made: its
    result must not be skipped over as this cell's, nor averaged with the new runs'."""
    old = _run_settings(folder)
    difference = first_difference(comparable(old), comparable(config.to_dict())) if isinstance(old, dict) \
        else "its config.yaml is unreadable"
    if difference:
        raise TietaError(f"{folder} holds a finished run with other settings ({difference}); "
                         "pick another --output, or remove that run folder to train it again")
    key, there = _data_of_run(folder)
    now = prints.now(cell.task.name, config) if key == "data_fingerprint" \
        else prints.tasks[cell.task.name].num_classes
    if there != now:
        raise TietaError(f"the data of task {cell.task.name} changed since the finished run in {folder} was trained "
                         f"({key} {there!r} there, {now!r} now); remove that run folder to train it again, or give "
                         "another --output")


def check_plan(plan: SweepPlan, output: Path) -> tuple[list[Cell], list[Outcome]]:
    """Check every cell before anything runs.

    Returns:
        (cells to run, outcomes of the cells that will not run: finished before, or no data).
    Raises:
        TietaError: the grid is too large, a setting is refused, no task has data, or a finished
            run in ``output`` has other settings or was trained on other data.
    """
    check_runs(plan)
    tasks, task_problems = _open_tasks(plan)
    prints = _DataPrints(tasks)
    to_run, skipped = [], []
    for cell in plan.cells():
        if cell.task.name in task_problems:
            skipped.append(Outcome(cell, NO_DATA, task_problems[cell.task.name]))
            continue
        folder = output / cell.folder
        if is_finished(folder):
            _check_finished(cell, folder, cell_config(plan, cell), prints)
            skipped.append(Outcome(cell, FINISHED_BEFORE))
        else:
            to_run.append(cell)
    return to_run, skipped


def _plan_there(path: Path) -> Optional[SweepPlan]:
    """The plan already recorded at ``path``: None where there is none, or where tieta wrote one it
    cannot read any more (it is replaced).

    Raises:
        TietaError: a file of the user's is there that is not a sweep plan (it is never replaced).
    """
    if not os.path.lexists(path):
        return None
    try:
        return plan_from_dict(safe_yaml.read_file(path, "the sweep's plan"), str(path))
    except TietaError as error:
        if files.written_by_tieta(path):
            return None
        raise TietaError(f"{path} is not a sweep plan tieta can read ({error}), and tieta replaces only its own; "
                         "move it away or give another --output") from None


def write_plan(plan: SweepPlan, output: Path) -> None:
    """Record the plan in ``output``, joined with the plan already there: a sweep folder grows
    when later sweeps add tasks, runs or seeds to it (and its report covers them all). A file there
    that is not a plan is refused, not replaced."""
    output.mkdir(parents=True, exist_ok=True)
    path = output / PLAN_FILE
    old = _plan_there(path)
    if old is not None:
        plan = joined(old, plan)
        check_size(len(plan.tasks), len(plan.runs), len(plan.seeds), f"{path} joined with this sweep")
    files.write_owned(path, yaml.safe_dump(plan.to_dict(), sort_keys=False), adopt=old is not None)


def joined(old: SweepPlan, new: SweepPlan) -> SweepPlan:
    """Both plans' tasks, runs and seeds, the new one's definitions winning, the old order first."""
    def union(first: list, second: list) -> list:
        names = {item.name: item for item in first} | {item.name: item for item in second}
        return [names[name] for name in dict.fromkeys([i.name for i in first] + [i.name for i in second])]

    return SweepPlan(union(old.tasks, new.tasks), union(old.runs, new.runs), sorted(set(old.seeds) | set(new.seeds)),
                     new.base)


def _eta(durations: list[float], remaining: int, parallel: int) -> str:
    if not durations:
        return ""
    seconds = sum(durations) / len(durations) * remaining / parallel
    return f", about {seconds / 60:.0f} min left" if seconds >= 60 else f", about {seconds:.0f} s left"


def _train_here(plan: SweepPlan, cell: Cell, output: Path, device: str) -> None:
    config, folder = cell_config(plan, cell, device), output / cell.folder
    if resumable(folder, config):
        resume_run(folder, device, label=cell.label)
    else:
        fit(config, folder, overwrite=True, label=cell.label)


def _train_in_subprocess(plan: SweepPlan, cell: Cell, output: Path, device: str) -> None:
    """``tieta train`` in its own process on ``device``; its output goes to logs/<cell>.log."""
    logs = output / LOGS
    logs.mkdir(parents=True, exist_ok=True)
    stem = f"{cell.task.name}.{cell.run.name}.seed{cell.seed}"
    config_file = logs / f"{stem}.yaml"
    files.write_file(config_file, yaml.safe_dump(cell_config(plan, cell, device).to_dict(), sort_keys=False))
    log_file = logs / f"{stem}.log"
    folder = output / cell.folder
    command = [sys.executable, "-m", "tieta", "train", "--config", str(config_file), "--output", str(folder),
               "--overwrite"]
    if resumable(folder, cell_config(plan, cell, device)):
        command = [sys.executable, "-m", "tieta", "train", "--resume", str(folder), "--device", device]
    with _open_log(log_file) as log:
        finished = subprocess.run(command, stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL)
    if finished.returncode != 0:
        lines = [line for line in log_file.read_text(errors="replace").splitlines() if line.strip()]
        last = lines[-1] if lines else f"exit status {finished.returncode}"
        raise TietaError(f"{last.removeprefix('tieta: error: ')} (log: {log_file})")


def _open_log(path: Path):
    """A run's log, opened to append, never through a link nor into a FIFO or device."""
    try:
        handle = os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT | os.O_NOFOLLOW | os.O_NONBLOCK, 0o666)
    except OSError as error:
        raise TietaError(f"cannot write the run's log {path}: {error.strerror}") from None
    if not stat.S_ISREG(os.fstat(handle).st_mode):
        os.close(handle)
        raise TietaError(f"cannot write the run's log {path}: it is not a regular file")
    return os.fdopen(handle, "a")


def _keep_traceback(output: Path, cell: Cell) -> str:
    """Append the traceback being handled to failures.log; says where it is (or why it is not)."""
    path = output / FAILURES_LOG
    try:
        files.append_line(path, f"== {cell.label}\n{traceback.format_exc()}")
    except TietaError as error:
        return f"its traceback could not be kept: {error}"
    return f"traceback in {path}"


def run_sweep(plan: SweepPlan, output: str | Path, devices: Optional[list[str]] = None,
              log: Callable[[str], None] = print) -> list[Outcome]:
    """Train every unfinished cell of ``plan`` into ``output``; returns every cell's outcome.

    Args:
        devices: where runs train, one run per device at a time (default: the base settings' device,
            else "auto"; one device trains in this process).
    Raises:
        TietaError: before anything runs, when a setting or device is refused, no task has data, or
            finished runs disagree with the plan.
        KeyboardInterrupt: after the outcomes so far have been logged.
    """
    output = Path(output)
    to_run, outcomes = check_plan(plan, output)
    devices = sweep_devices(plan, devices)  # a device this machine lacks is refused before anything runs
    write_plan(plan, output)
    for outcome in outcomes:
        if outcome.status == NO_DATA and outcome.cell.run == plan.runs[0] and outcome.cell.seed == plan.seeds[0]:
            log(f"task {outcome.cell.task.name} skipped: {outcome.reason}")
    log(f"sweep: {len(to_run)} runs to train, {sum(o.status == FINISHED_BEFORE for o in outcomes)} finished before, "
        f"on {', '.join(devices)}; run folders in {output}")
    durations: list[float] = []
    train = _train_here if len(devices) == 1 else _train_in_subprocess

    def run_cell(index: int, cell: Cell, device: str) -> Outcome:
        log(f"[{index}/{len(to_run)}] {cell.label} on {device}"
            f"{_eta(durations, len(to_run) - index + 1, len(devices))}")
        started = time.perf_counter()
        try:
            train(plan, cell, output, device)
        except TietaError as error:
            return Outcome(cell, FAILED, str(error), time.perf_counter() - started)
        except Exception as error:  # a bug in one run must not take the others down; keep its traceback
            return Outcome(cell, FAILED, f"{type(error).__name__}: {error} ({_keep_traceback(output, cell)})",
                           time.perf_counter() - started)
        seconds = time.perf_counter() - started
        durations.append(seconds)
        return Outcome(cell, TRAINED, seconds=seconds)

    done: list[Outcome] = []
    try:
        if len(devices) == 1:
            for index, cell in enumerate(to_run, 1):
                done.append(run_cell(index, cell, devices[0]))
                if done[-1].status == FAILED:
                    log(f"failed: {cell.label}: {done[-1].reason}")
        else:
            free: queue.Queue[str] = queue.Queue()
            for device in devices:
                free.put(device)

            def on_free_device(index: int, cell: Cell) -> Outcome:
                device = free.get()
                try:
                    return run_cell(index, cell, device)
                finally:
                    free.put(device)

            with ThreadPoolExecutor(max_workers=len(devices)) as pool:
                done = list(pool.map(on_free_device, range(1, len(to_run) + 1), to_run))
    except KeyboardInterrupt:
        outcomes += done + [Outcome(cell, NOT_RUN, "interrupted") for cell in to_run[len(done):]]
        log(summary_text(outcomes))
        raise
    outcomes += done
    log(summary_text(outcomes))
    return outcomes


def summary_text(outcomes: list[Outcome]) -> str:
    """What ran, what was skipped, what failed and why: the sweep's last words."""
    counts = {status: sum(o.status == status for o in outcomes)
              for status in (TRAINED, FINISHED_BEFORE, FAILED, NO_DATA, NOT_RUN)}
    lines = ["sweep summary: " + ", ".join(f"{count} {status}" for status, count in counts.items() if count)]
    minutes = sum(o.seconds for o in outcomes) / 60
    if counts[TRAINED]:
        lines[0] += f" ({minutes:.1f} min of training)"
    for outcome in outcomes:
        if outcome.status == FAILED:
            lines.append(f"  failed: {outcome.cell.label}: {outcome.reason}")
    missing = sorted({(o.cell.task.name, o.reason) for o in outcomes if o.status == NO_DATA})
    lines += [f"  no data: task {name}: {reason}" for name, reason in missing]
    return "\n".join(lines)
