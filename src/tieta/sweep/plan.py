"""A sweep's plan: tasks x runs (a method and its settings) x seeds, each cell one run folder.

A sweep file (YAML)::

    root: vtab-1k                  # task folders are <root>/<name> unless a task gives its path
    tasks:
      - {name: cifar, group: natural, classes: 100}
      - {name: elpv, group: specialized, path: data/elpv}
    seeds: [0]
    base:                          # settings of every run: the keys of a run's config.yaml
      model: vit_base_patch16_224
      optim: {epochs: 100, lr: 1e-3}
    runs:                          # one row of the comparison each: its method and own settings
      lora: {method: lora}
      pyra-lora-low: {method: pyra+lora, merge.schedule: low}

Settings are nested or dotted (``optim.epochs``); a run's own settings apply over ``base``. The
seed and the task folder (``seed``, ``data.path``) are each cell's own, so they are not settings.
Cell ``(task, run, seed)`` trains into ``<output>/<task>/<run>/seed<seed>``. The file is read within
``tieta.safe_yaml``'s limits (at most 1 MiB, no repeated keys, aliases that share but do not multiply),
each key checked for its type; a setting given twice in two spellings (``optim.lr`` and ``optim: {lr}``)
is refused, as is a grid of more than ``MAX_CELLS`` cells. Where the runs train is the sweep's: the
``device`` of ``base`` (or ``--devices``), never a run's own setting.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Optional

from tieta import safe_yaml
from tieta.errors import TietaError
from tieta.sweep.vtab1k import VTAB_1K

PLAN_FILE = "sweep.yaml"
# the most cells (tasks x runs x seeds) a sweep may have: all 19 VTAB-1k tasks x 50 runs x 100 seeds
# fit, while a plan that would take the checks (a folder and a config per cell) minutes, or a report
# hours, is refused at once, before any task folder is opened
MAX_CELLS = 100_000
# settings that each cell sets for itself (its seed, its task folder)
CELL_KEYS = {"seed": "the sweep's seeds (seeds: in the file, or --seeds)",
             "data.path": "the sweep's tasks (tasks: and root: in the file, or --data)"}
# settings that are the whole sweep's, not one run's (the runner passes the device to every run)
SWEEP_KEYS = {"device": "the sweep's (device: in base, --device or --devices)"}
_SAFE_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._+-]*$")


@dataclass(frozen=True)
class TaskSpec:
    name: str
    path: Path
    group: Optional[str] = None  # natural, specialized, structured; None: in no group
    classes: Optional[int] = None  # what the data must have, where the sweep file says


@dataclass(frozen=True)
class RunSpec:
    """One row of the comparison: a name, and settings (dotted keys) over the sweep's base."""

    name: str
    settings: dict[str, Any]

    @property
    def method(self) -> str:
        return str(self.settings.get("method", "lora"))


@dataclass(frozen=True)
class Cell:
    task: TaskSpec
    run: RunSpec
    seed: int

    @property
    def folder(self) -> Path:
        return Path(self.task.name) / self.run.name / f"seed{self.seed}"

    @property
    def label(self) -> str:
        return f"{self.task.name} · {self.run.name} · seed {self.seed}"


@dataclass
class SweepPlan:
    tasks: list[TaskSpec]
    runs: list[RunSpec]
    seeds: list[int] = field(default_factory=lambda: [0])
    base: dict[str, Any] = field(default_factory=dict)  # dotted keys

    def cells(self) -> list[Cell]:
        """Every cell, seed by seed: a sweep stopped early has covered the whole grid once."""
        return [Cell(task, run, seed) for seed in self.seeds for task in self.tasks for run in self.runs]

    def overrides(self, cell: Cell) -> dict[str, Any]:
        """The dotted settings of one cell's run: base, the run's own, its task and seed."""
        return {**self.base, **cell.run.settings, "data.path": str(cell.task.path), "seed": cell.seed}

    def to_dict(self) -> dict[str, Any]:
        return {
            "tasks": [{"name": t.name, "path": str(t.path), "group": t.group, "classes": t.classes} for t in self.tasks],
            "seeds": list(self.seeds),
            "base": dict(self.base),
            "runs": {run.name: dict(run.settings) for run in self.runs},
        }


def flatten(settings: dict[str, Any], prefix: str = "", where: str = "settings") -> dict[str, Any]:
    """{"optim": {"lr": 1e-3}} -> {"optim.lr": 1e-3}; mappings that are values (lr_groups) stay
    nested below their key, which load_config handles the same way.

    Raises:
        TietaError: a setting name is not text, or one setting is given twice in two spellings
            (``optim.lr`` and ``optim: {lr: ...}``; or ``optim.lr_groups`` whole and one of its keys),
            where which one wins would depend on the order of the keys.
    """
    flat: dict[str, Any] = {}
    for key, value in settings.items():
        if not isinstance(key, str):
            raise TietaError(f"{where}: setting names are text, got {key!r}")
        dotted = prefix + key
        nested = isinstance(value, dict) and not dotted.endswith("lr_groups")
        found = flatten(value, dotted + ".", where) if nested else {dotted: value}
        for name in found:
            if name in flat:
                raise TietaError(f"{where}: the setting {name} is given twice (dotted and nested); give it once")
        flat.update(found)
    if not prefix:
        _refuse_nested_twice(flat, where)
    return flat


def _refuse_nested_twice(flat: dict[str, Any], where: str) -> None:
    """Refuse a setting given whole and also one key inside it (``optim.lr_groups`` and
    ``optim.lr_groups.head``): the sorted names put each such pair side by side."""
    names = sorted(flat)
    for outer, inner in zip(names, names[1:]):
        if inner.startswith(outer + "."):
            raise TietaError(f"{where}: the setting {inner} is given twice (inside {outer}, and on its own); "
                             "give it once")


def check_settings(settings: dict[str, Any], where: str) -> dict[str, Any]:
    """Dotted settings for every cell, refused where a cell would replace them (seed, data.path)."""
    for key, source in CELL_KEYS.items():
        if key in settings:
            raise TietaError(f"{where}: {key} is set per run by {source}, not as a setting")
    return settings


def check_size(tasks: int, runs: int, seeds: int, where: str) -> None:
    """Refuse a grid of more than MAX_CELLS cells, from its counts alone (before any cell exists)."""
    cells = tasks * runs * seeds
    if cells > MAX_CELLS:
        counts = " x ".join(f"{n:,} {word}{'' if n == 1 else 's'}" for n, word in
                            ((tasks, "task"), (runs, "run"), (seeds, "seed")))
        raise TietaError(f"{where}: {counts} make {cells:,} runs, more than the {MAX_CELLS:,} a sweep may have; "
                         "split it into several sweeps")


def _first_unknown(keys: Any, known: tuple[str, ...]) -> Optional[str]:
    """The first key (as text, whatever its type) of ``keys`` that is not in ``known``."""
    unknown = sorted(repr(key) for key in keys if key not in known)
    return unknown[0] if unknown else None


def _checked_name(name: Any, what: str) -> str:
    if not isinstance(name, str) or not _SAFE_NAME.match(name) or name in (".", ".."):
        raise TietaError(f"{what} name {name!r} cannot name a folder: use letters, digits and . _ + -")
    return name


def task_spec(name: str, path: Path, group: Optional[str] = None, classes: Optional[int] = None) -> TaskSpec:
    """A task; a VTAB-1k folder name brings its group and class count where none is given."""
    known = VTAB_1K.get(name)
    if known is not None:
        group = group or known[0]
        classes = classes or known[1]
    return TaskSpec(_checked_name(name, "task"), path, group, classes)


def _read_task(entry: Any, root: Path, where: str) -> TaskSpec:
    if isinstance(entry, str):
        return task_spec(entry, root / entry)
    if not isinstance(entry, dict) or "name" not in entry:
        raise TietaError(f"{where}: each task is a folder name or a mapping with a name, got {entry!r}")
    unknown = _first_unknown(entry, ("name", "path", "group", "classes"))
    if unknown:
        raise TietaError(f"{where}: unknown task key {unknown}; known: name, path, group, classes")
    path = entry.get("path")
    if path is not None and not isinstance(path, str):
        raise TietaError(f"{where}: path of task {entry['name']!r} should be a folder path (text), got {path!r}")
    classes = entry.get("classes")
    if classes is not None and (type(classes) is not int or classes < 1):
        raise TietaError(f"{where}: classes of task {entry['name']} should be a positive integer, got {classes!r}")
    group = entry.get("group")
    if group is not None and not isinstance(group, str):
        raise TietaError(f"{where}: group of task {entry['name']} should be a name, got {group!r}")
    name = _checked_name(entry["name"], "task")
    return task_spec(name, Path(path) if path else root / name, group, classes)


def _read_root(root: Any, where: str) -> Path:
    """The folder of the task folders (none: the current folder)."""
    if root is not None and not isinstance(root, str):
        raise TietaError(f"{where}: root should be the folder holding the task folders (text), got {root!r}")
    return Path(root or ".")


def _read_runs(runs: dict[Any, Any], where: str) -> list[RunSpec]:
    """Each run's settings, flattened; a seed, a task folder or a device of its own is refused."""
    specs = []
    for name, settings in runs.items():
        if not isinstance(settings, dict):
            raise TietaError(f"{where}: the settings of run {name!r} should be a mapping, got {settings!r}")
        label = f"{where}: run {_checked_name(name, 'run')}"
        flat = check_settings(flatten(settings, where=label), label)
        for key, source in SWEEP_KEYS.items():
            if key in flat:
                raise TietaError(f"{label}: {key} is {source}, not one run's setting")
        specs.append(RunSpec(name, flat))
    return specs


def _read_seeds(seeds: Any, where: str) -> list[int]:
    if not isinstance(seeds, list) or not seeds or any(type(s) is not int or s < 0 for s in seeds):
        raise TietaError(f"{where}: seeds should be a list of non-negative integers, got {seeds!r}")
    if len(set(seeds)) != len(seeds):
        raise TietaError(f"{where}: seeds {seeds} repeat a seed")
    return list(seeds)


def read_plan(path: str | Path, root: Optional[str | Path] = None,
              tasks: Optional[list[TaskSpec]] = None) -> SweepPlan:
    """Read a sweep file; ``root`` (if given) replaces the file's task root, ``tasks`` (if given) its
    tasks (the file may then have none, as ``tieta plan`` writes it)."""
    path = Path(path)
    return plan_from_dict(safe_yaml.read_file(path, "sweep file"), str(path), root, tasks)


def task_folders(data: list[str]) -> list[TaskSpec]:
    """Tasks from folders (``--data``), each named by its folder; two of one name are refused."""
    tasks = [task_spec(Path(path).name, Path(path)) for path in data]
    if len({task.name for task in tasks}) != len(tasks):
        raise TietaError("two task folders have the same name; a sweep names its runs by task folder")
    return tasks


def plan_from_dict(values: Any, where: str, root: Optional[str | Path] = None,
                   given_tasks: Optional[list[TaskSpec]] = None) -> SweepPlan:
    """A plan from a sweep file's values, every key checked for its type (one sentence naming the
    key), and its size checked from the counts before any task is read. ``given_tasks`` replace the
    file's tasks (which may then be absent)."""
    if not isinstance(values, dict):
        raise TietaError(f"{where} should hold a mapping with tasks and runs")
    unknown = _first_unknown(values, ("root", "tasks", "seeds", "base", "runs"))
    if unknown:
        raise TietaError(f"{where}: unknown key {unknown}; known: root, tasks, seeds, base, runs")
    task_root = _read_root(values.get("root"), where) if root is None else Path(root)
    tasks = values.get("tasks") if given_tasks is None else given_tasks
    if given_tasks is None and (not isinstance(tasks, list) or not tasks):
        raise TietaError(f"{where}: tasks should be a non-empty list (or give the task folders with --data)")
    runs = values.get("runs")
    if not isinstance(runs, dict) or not runs:
        raise TietaError(f"{where}: runs should be a mapping of run names to their settings")
    seeds = _read_seeds(values.get("seeds", [0]), where)
    check_size(len(tasks), len(runs), len(seeds), where)
    base = values.get("base")
    if base is None:
        base = {}
    if not isinstance(base, dict):
        raise TietaError(f"{where}: base should be a mapping of settings, got {base!r}")
    run_specs = _read_runs(runs, where)
    task_specs = [_read_task(entry, task_root, where) for entry in tasks] if given_tasks is None else given_tasks
    names = [task.name for task in task_specs]
    if len(set(names)) != len(names):
        raise TietaError(f"{where}: a task name appears twice")
    return SweepPlan(task_specs, run_specs, seeds, check_settings(flatten(base, where=f"{where}: base"),
                                                                  f"{where}: base"))


def plan_from_flags(data: list[str], methods: list[str], seeds: list[int], base: dict[str, Any]) -> SweepPlan:
    """A grid from the command line: each task folder x each method (named by itself) x seeds."""
    tasks = task_folders(data)
    if "method" in base:
        raise TietaError("--set method: a sweep's methods are given with --method, not as a setting")
    runs = [RunSpec(_checked_name(method, "method"), {"method": method}) for method in dict.fromkeys(methods)]
    check_size(len(tasks), len(runs), len(seeds), "the sweep")
    return SweepPlan(tasks, runs, _read_seeds(seeds, "--seeds"), check_settings(dict(base), "--set"))


def select(plan: SweepPlan, tasks: Optional[list[str]], runs: Optional[list[str]]) -> SweepPlan:
    """The plan restricted to the named tasks and runs (all where None)."""
    def chosen(items: list, wanted: Optional[list[str]], what: str) -> list:
        if not wanted:
            return items
        known = {item.name for item in items}
        missing = [name for name in wanted if name not in known]
        if missing:
            raise TietaError(f"no {what} named {missing[0]!r} in the sweep; it has: {', '.join(sorted(known))}")
        return [item for item in items if item.name in wanted]

    return SweepPlan(chosen(plan.tasks, tasks, "task"), chosen(plan.runs, runs, "run"), plan.seeds, plan.base)
