"""Top-5 and balanced accuracy beside top-1 in report.md and report.csv, where the runs record them."""

from __future__ import annotations

import csv
import json
from pathlib import Path

import yaml

from tieta.report.sweep_report import write_report
from tieta.sweep.plan import plan_from_dict
from tieta.sweep.runner import write_plan


def _sweep(folder: Path, classes: dict[str, int]) -> Path:
    """A sweep of two runs over tasks of ``classes`` classes each, with hand-written summaries as a
    tieta that records top-5 and balanced accuracy leaves them (top-5 null under 5 classes; the
    second run 1 point lower)."""
    plan = plan_from_dict({"tasks": [{"name": t, "path": str(folder / "data" / t)} for t in classes],
                           "runs": {"lora": {"method": "lora"}, "other": {"method": "lora"}}, "seeds": [0]}, "test")
    write_plan(plan, folder)
    for lower, run in enumerate(("lora", "other")):
        for index, (task, count) in enumerate(classes.items()):
            cell = folder / task / run / "seed0"
            cell.mkdir(parents=True)
            (cell / "config.yaml").write_text(yaml.safe_dump({"seed": 0, "method": "lora"}))
            (cell / "summary.json").write_text(json.dumps(
                {"acc": 50.0, "best_acc": 51.0, "top5": 80.0 + 10 * index - lower if count >= 5 else None,
                 "balanced_acc": 40.0 + 10 * index - lower, "method": "lora", "gmacs": 1.0, "pyra_gflops": 0.93,
                 "trainable_percent": 0.3}))
    return folder


def _csv(folder: Path) -> dict[str, str]:
    """report.csv's first row (the run "lora")."""
    with open(folder / "report.csv", newline="") as handle:
        return next(csv.DictReader(handle))


def test_top5_and_balanced_accuracy_are_reported_as_means_over_tasks(tmp_path):
    folder = _sweep(tmp_path / "sweep", {"a": 10, "b": 7})
    write_report(folder, bench=False, log=lambda line: None)
    text = (folder / "report.md").read_text()
    assert "| top-5 % (final) | balanced % (final) |" in text
    assert "| 85.00 | 45.00 |" in text and "| 84.00 | 44.00 |" in text
    assert "balanced accuracy (the mean over classes" in text
    row = _csv(folder)
    assert float(row["top5_final_mean"]) == 85.0 and float(row["balanced_acc_final_mean"]) == 45.0


def test_top5_of_a_task_under_5_classes_is_na(tmp_path):
    folder = _sweep(tmp_path / "sweep", {"a": 10, "b": 3})
    write_report(folder, bench=False, log=lambda line: None)
    assert "| n/a | 45.00 |" in (folder / "report.md").read_text()
    assert _csv(folder)["top5_final_mean"] == "n/a"
