"""From finished runs to the papers' numbers: per-task accuracy over seeds, the group means, the
mean of the group means (the papers' headline) and the mean over tasks, with their seed spread.
"""

from __future__ import annotations

import statistics
from dataclasses import dataclass, field
from typing import Any, Optional

from tieta.files import is_number
from tieta.report.collect import SweepResults
from tieta.sweep.vtab1k import GROUPS


@dataclass
class Spread:
    """A mean over seeds, with the sample standard deviation (0 for one seed) and the count."""

    mean: float
    std: float
    n: int

    @classmethod
    def of(cls, values: list[float]) -> Optional["Spread"]:
        if not values:
            return None
        return cls(statistics.fmean(values), statistics.stdev(values) if len(values) > 1 else 0.0, len(values))

    def text(self, digits: int = 2) -> str:
        return f"{self.mean:.{digits}f} ± {self.std:.{digits}f}" if self.n > 1 else f"{self.mean:.{digits}f}"


@dataclass
class RunRow:
    """One row of the comparison: a run name over every task and seed."""

    run: str
    method: str
    final: dict[str, Spread] = field(default_factory=dict)  # task -> final top-1 over seeds
    best: dict[str, Spread] = field(default_factory=dict)  # task -> best top-1 over seeds
    groups: dict[str, Spread] = field(default_factory=dict)  # group -> mean of its tasks, over seeds
    headline: Optional[Spread] = None  # mean of group means (or of tasks where no task has a group)
    task_mean: Optional[Spread] = None  # mean over tasks
    complete: bool = True  # every task has every seed
    facts: dict[str, Any] = field(default_factory=dict)  # trainable_percent, gmacs, pyra_gflops (means)
    # top5, balanced_acc (mAcc, aAcc of segmentation runs): final, mean over every task and seed; None
    # (n/a) where a run lacks one (a task of fewer than 5 classes has no top-5); absent where no run
    # recorded them (an older tieta)
    extra_accuracies: dict[str, Optional[float]] = field(default_factory=dict)


# the accuracies beside the headline score that a run's summary records: a classifier's top-5 and
# balanced accuracy, a segmentation run's mean class accuracy and pixel accuracy
EXTRA_ACCURACIES = ("top5", "balanced_acc", "mAcc", "aAcc")


def present_groups(results: SweepResults) -> list[str]:
    """The groups some task belongs to: the three VTAB groups in their order, then any other."""
    named = [g for g in results.groups.values() if g]
    return [g for g in GROUPS if g in named] + sorted(set(named) - set(GROUPS))


def score_name(results: SweepResults) -> str:
    """What each run's score is: "mIoU" where every run is a segmentation run (its summary's
    ``metric``), else "top-1"."""
    segmentation = results.records and all(record.summary.get("metric") == "mIoU" for record in results.records)
    return "mIoU" if segmentation else "top-1"


def input_unit(results: SweepResults) -> str:
    """What one input of the runs is: "clip" where every run is a video run (its config's
    ``data.kind``), else "image"; throughput and GMACs are per that unit."""
    video = results.records and all(isinstance(record.config.get("data"), dict)
                                    and record.config["data"].get("kind") == "video" for record in results.records)
    return "clip" if video else "image"


def headline_name(results: SweepResults) -> str:
    """What the headline number is: "accuracy" (one task; "mIoU" for segmentation runs), "mean of
    group means" (tasks of several groups, or of one group and none: the papers' headline), else
    "mean over tasks"."""
    if len(results.tasks) == 1:
        return "mIoU" if score_name(results) == "mIoU" else "accuracy"
    groups = present_groups(results)
    if len(groups) > 1 or (groups and any(not results.groups.get(task) for task in results.tasks)):
        return "mean of group means"
    return "mean over tasks"


def run_label(row: RunRow) -> str:
    """A run as the reading and the plots name it: the sweep's run name, with its method beside it
    where the two differ ("pyra-lora (pyra+lora)"), so that it reads the same as the table's run
    and method columns."""
    return row.run if row.method in (row.run, "-", "?", "") else f"{row.run} ({row.method})"


def tradeoff_points(rows: list[RunRow], x_values: dict[str, float]) -> dict[str, tuple[float, float]]:
    """run -> (x, headline mean) for the rows that have both: the points of an accuracy plot, and
    what its Pareto front (:func:`pareto_front`) and the reading's are computed on."""
    return {row.run: (float(x_values[row.run]), row.headline.mean) for row in rows
            if row.headline is not None and row.run in x_values}


def _means_of_seed(results: SweepResults, run: str, seed: int, key: str) -> Optional[dict[str, float]]:
    """Group means, their mean and the task mean for one seed; None unless every task has that run."""
    accs = {}
    for task in results.tasks:
        record = results.record(task, run, seed)
        if record is None:
            return None
        accs[task] = float(record.summary[key])
    return means_of(results, accs)


def means_of(results: SweepResults, accs: dict[str, float]) -> dict[str, float]:
    """Each group's mean, "task_mean" and "headline" (mean of group means, or the task mean where
    no task has a group) of one accuracy per task."""
    means: dict[str, float] = {}
    groups = present_groups(results)
    for group in groups:
        means[group] = statistics.fmean(acc for task, acc in accs.items() if results.groups[task] == group)
    means["task_mean"] = statistics.fmean(accs.values())
    means["headline"] = statistics.fmean(means[g] for g in groups) if groups else means["task_mean"]
    return means


def run_rows(results: SweepResults, key: str = "acc") -> list[RunRow]:
    """One row per run name, in plan order (runs without any finished cell are left out).

    Args:
        key: the summary's accuracy to aggregate for group means: "acc" (final) or "best_acc".
    """
    rows = []
    for run in results.runs:
        records = [r for r in results.records if r.run == run]
        if not records:
            continue
        row = RunRow(run, str(records[0].summary.get("method", "?")))
        for task in results.tasks:
            mine = [r for r in records if r.task == task]
            if mine:
                row.final[task] = Spread.of([float(r.summary["acc"]) for r in mine])
                row.best[task] = Spread.of([float(r.summary.get("best_acc", r.summary["acc"])) for r in mine])
        row.complete = len(records) == len(results.tasks) * len(results.seeds)
        per_seed = [m for m in (_means_of_seed(results, run, seed, key) for seed in results.seeds) if m is not None]
        if per_seed:
            row.headline = Spread.of([m["headline"] for m in per_seed])
            row.task_mean = Spread.of([m["task_mean"] for m in per_seed])
            row.groups = {g: Spread.of([m[g] for m in per_seed]) for g in present_groups(results)}
        for fact in ("trainable_percent", "gmacs", "pyra_gflops"):
            values = [float(r.summary[fact]) for r in records if is_number(r.summary.get(fact))]
            if values:
                row.facts[fact] = statistics.fmean(values)
        for extra in EXTRA_ACCURACIES:
            if any(extra in r.summary for r in records):
                values = [float(r.summary[extra]) for r in records if is_number(r.summary.get(extra))]
                row.extra_accuracies[extra] = statistics.fmean(values) if len(values) == len(records) else None
        rows.append(row)
    return rows


def pareto_front(points: dict[str, tuple[float, float]], higher_x_better: bool = True) -> list[str]:
    """The names no other point beats on both axes (y is accuracy: higher is better), by x.

    Args:
        points: name -> (x, y); x is throughput (higher better) or FLOPs (lower better).
    """
    def beats(a: tuple[float, float], b: tuple[float, float]) -> bool:
        better_x = a[0] >= b[0] if higher_x_better else a[0] <= b[0]
        strictly = (a[0] != b[0]) or (a[1] != b[1])
        return better_x and a[1] >= b[1] and strictly

    front = [name for name, point in points.items()
             if not any(beats(other, point) for o, other in points.items() if o != name)]
    return sorted(front, key=lambda name: points[name][0])
