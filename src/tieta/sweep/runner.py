"""Running a sweep: every cell an ordinary run folder, finished ones skipped, failures isolated.

Every cell's settings are checked before the first run starts, so a typo fails at once, not hours
in. A cell whose folder holds a finished run with the same settings is skipped; one with other
settings stops the sweep before it starts (results are never mixed or replaced); an unfinished one
of the same settings is resumed from its last epoch, any other is trained again. A
failed run is reported and the sweep goes on; the summary at the end says what ran, what failed and
why. With one device the runs train in this process; with several, one subprocess per device at a
time (``tieta train``), each writing its log next to the run folders.
"""

from __future__ import annotations

import queue
import subprocess
import sys
import time
import traceback
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Optional

import yaml

from tieta import safe_yaml
from tieta.data.vtab import open_task
from tieta.errors import TietaError
from tieta.sweep.plan import PLAN_FILE, Cell, SweepPlan, plan_from_dict
from tieta.train.config import RunConfig, comparable, first_difference, load_config
from tieta.train.fit import fit, resolve_device, resume_run
from tieta.train.rundir import CONFIG, FINISHED, PROGRESS, read_state

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


def check_plan(plan: SweepPlan, output: Path) -> tuple[list[Cell], list[Outcome]]:
    """Check every cell before anything runs.

    Returns:
        (cells to run, outcomes of the cells that will not run: finished before, or no data).
    Raises:
        TietaError: a setting is refused, or a finished run in ``output`` has other settings.
    """
    task_problems: dict[str, str] = {}
    for task in plan.tasks:
        try:
            found = open_task(task.path)
        except TietaError as error:
            task_problems[task.name] = str(error)
            continue
        if task.classes is not None and found.num_classes != task.classes:
            task_problems[task.name] = (f"its data has {found.num_classes} classes, the sweep says {task.classes}")
    to_run, skipped = [], []
    for cell in plan.cells():
        config = cell_config(plan, cell)
        if cell.task.name in task_problems:
            skipped.append(Outcome(cell, NO_DATA, task_problems[cell.task.name]))
            continue
        folder = output / cell.folder
        if is_finished(folder):
            old = _run_settings(folder)
            difference = first_difference(comparable(old), comparable(config.to_dict())) if isinstance(old, dict) \
                else "its config.yaml is unreadable"
            if difference:
                raise TietaError(f"{folder} holds a finished run with other settings ({difference}); "
                                 "pick another --output, or remove that run folder to train it again")
            skipped.append(Outcome(cell, FINISHED_BEFORE))
        else:
            to_run.append(cell)
    return to_run, skipped


def write_plan(plan: SweepPlan, output: Path) -> None:
    """Record the plan in ``output``, joined with the plan already there: a sweep folder grows
    when later sweeps add tasks, runs or seeds to it (and its report covers them all)."""
    output.mkdir(parents=True, exist_ok=True)
    path = output / PLAN_FILE
    if path.is_file():
        try:
            plan = joined(plan_from_dict(safe_yaml.read_file(path, "the sweep's plan"), str(path)), plan)
        except TietaError:
            pass  # an unreadable old plan is replaced by the current one
    path.write_text(yaml.safe_dump(plan.to_dict(), sort_keys=False))


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
    config_file.write_text(yaml.safe_dump(cell_config(plan, cell, device).to_dict(), sort_keys=False))
    log_file = logs / f"{stem}.log"
    folder = output / cell.folder
    command = [sys.executable, "-m", "tieta", "train", "--config", str(config_file), "--output", str(folder),
               "--overwrite"]
    if resumable(folder, cell_config(plan, cell, device)):
        command = [sys.executable, "-m", "tieta", "train", "--resume", str(folder), "--device", device]
    with open(log_file, "a") as log:
        finished = subprocess.run(command, stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL)
    if finished.returncode != 0:
        lines = [line for line in log_file.read_text(errors="replace").splitlines() if line.strip()]
        last = lines[-1] if lines else f"exit status {finished.returncode}"
        raise TietaError(f"{last.removeprefix('tieta: error: ')} (log: {log_file})")


def run_sweep(plan: SweepPlan, output: str | Path, devices: Optional[list[str]] = None,
              log: Callable[[str], None] = print) -> list[Outcome]:
    """Train every unfinished cell of ``plan`` into ``output``; returns every cell's outcome.

    Args:
        devices: where runs train, one run per device at a time (default: ["auto"], in this process).
    Raises:
        TietaError: before anything runs, when a setting is refused or finished runs disagree.
        KeyboardInterrupt: after the outcomes so far have been logged.
    """
    output = Path(output)
    devices = devices or ["auto"]
    for device in devices:
        resolve_device(device)  # a device this machine lacks is refused before anything runs
    to_run, outcomes = check_plan(plan, output)
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
            with open(output / FAILURES_LOG, "a") as failures:
                failures.write(f"== {cell.label}\n{traceback.format_exc()}\n")
            return Outcome(cell, FAILED, f"{type(error).__name__}: {error} (traceback in {output / FAILURES_LOG})",
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
