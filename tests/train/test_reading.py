"""The reading of train, eval and report: a run near the majority class, or whose learning rate
never reached its base value, is said in one line each."""

from __future__ import annotations

import contextlib
import io
import json
import shutil
from types import SimpleNamespace

import pytest

from conftest import write_vtab_task
from tieta.cli import main
from tieta.train.reading import (NEAR_MAJORITY_POINTS, lr_reached_base, majority_accuracy, run_notes, summary_notes,
                                 sweep_notes)

TINY = ["--model", "test_vit", "--weights", "random", "--img-size", "32", "--batch-size", "4", "--lora-rank", "2"]


def test_majority_accuracy_and_the_schedule():
    assert majority_accuracy([0, 1, 1, 2]) == 50.0 and majority_accuracy([]) is None
    assert lr_reached_base(0, 2) and lr_reached_base(2, 2) and not lr_reached_base(3, 2)
    assert lr_reached_base(None, 2)  # left to the rule


@pytest.mark.parametrize("acc,majority,says", [
    (28.1, 25.0, "note: lora is within 3.1 points of always answering the majority class (25.0%): it has barely "
                 "learned; train longer or raise the learning rate (see README: a short run that learns)"),
    (20.0, 25.0, "note: lora is 5.0 points below always answering the majority class (25.0%)"),
    (25.0 + NEAR_MAJORITY_POINTS, 25.0, None),  # 5 points above: it has learned something
    (90.0, 25.0, None),
    (100.0, 100.0, None),  # a split of one class has nothing to tell apart
    (30.0, None, None),  # the majority is unknown
])
def test_a_run_near_the_majority_class_gets_one_line(acc, majority, says):
    notes = run_notes("lora", acc, majority)
    assert (notes[0].startswith(says) if says else notes == [])
    assert all("\n" not in note for note in notes)


def test_a_learning_rate_that_never_reached_its_base_gets_one_line():
    notes = summary_notes({"method": "pyra+lora", "acc": 90.0, "majority_acc": 25.0, "lr_reached_base": False})
    assert notes == ["note: the learning rate of pyra+lora never reached its base value; give fewer warm-up epochs "
                     "(optim.warmup_epochs), or leave them out for the default, min(10, epochs // 10) "
                     "(see README: Training)"]
    assert summary_notes({"method": "lora", "acc": 90.0}) == []  # an older run's summary: nothing to say


def _record(task, run, seed, acc, majority=None, warmup=1, epochs=2, reached=None):
    summary = {"acc": acc, **({"majority_acc": majority} if majority is not None else {}),
               **({"lr_reached_base": reached} if reached is not None else {})}
    return SimpleNamespace(task=task, run=run, seed=seed, summary=summary,
                           config={"optim": {"warmup_epochs": warmup, "epochs": epochs}})


def test_a_reports_notes_take_the_mean_over_seeds_per_run_and_task():
    records = [_record("cifar", "lora", 0, 12.0, 10.0), _record("cifar", "lora", 1, 13.0, 10.0),
               _record("dtd", "lora", 0, 22.0), _record("cifar", "pyra+lora", 0, 60.0, 10.0),
               _record("dtd", "pyra+lora", 0, 11.0, warmup=10), _record("cifar", "tome+lora", 0, 30.0, 10.0,
                                                                         warmup=10, reached=True)]
    notes = sweep_notes(records, {"cifar": 10.0, "dtd": 20.0})
    assert notes == [
        "note: lora is within 5 points of always answering the majority class on 2 tasks, cifar (12.5% vs 10.0%), "
        "dtd (22.0% vs 20.0%): it has barely learned there; train longer or raise the learning rate (see README: a "
        "short run that learns)",
        "note: pyra+lora is 9.0 points below always answering the majority class (20.0%) on dtd: it has barely "
        "learned; train longer or raise the learning rate (see README: a short run that learns)",
        # an older run's summary does not say: its settings' schedule does; a summary's word wins
        "note: the learning rate of pyra+lora never reached its base value (10 warm-up epochs in a 2-epoch run); "
        "give fewer warm-up epochs (optim.warmup_epochs), or leave them out for the default, min(10, epochs // 10) "
        "(see README: Training)",
    ]
    assert sweep_notes([_record("cifar", "lora", 0, 80.0, 10.0)], {}) == []


@pytest.fixture(scope="module")
def near_chance_run(tmp_path_factory):
    """A run that cannot learn (every test image the same picture: any model answers one class, and
    the classes are balanced), with a warm-up longer than the run; with its train output."""
    root = tmp_path_factory.mktemp("near-chance")
    task = write_vtab_task(root / "task")
    pictures = sorted((task / "images" / "test").iterdir())
    for picture in pictures[1:]:
        shutil.copyfile(pictures[0], picture)
    run = root / "sweep" / "run"
    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        code = main(["train", *TINY, "--data", str(task), "--output", str(run), "--epochs", "1",
                     "--warmup-epochs", "2"])
    assert code == 0, err.getvalue()
    return run, out.getvalue(), err.getvalue()


MAJORITY_NOTE = "note: lora is within 0.0 points of always answering the majority class (33.3%): it has barely learned"
LR_NOTE = "note: the learning rate of lora never reached its base value"


def test_train_warns_of_the_warmup_and_notes_a_near_chance_run(near_chance_run):
    run, out, err = near_chance_run
    assert ("tieta: warning: optim.warmup_epochs 2 is at least the run's 1 epochs: the learning rate never reaches "
            "its base value (it ends at 50% of it)") in err
    lines = out.splitlines()
    table_end = next(i for i, line in enumerate(lines) if line.startswith("lora "))
    assert lines[table_end + 1].startswith(MAJORITY_NOTE) and lines[table_end + 2].startswith(LR_NOTE)
    assert lines[-1] == f"run folder: {run}"
    summary = json.loads((run / "summary.json").read_text())
    assert summary["majority_acc"] == pytest.approx(100 / 3) and summary["lr_reached_base"] is False
    assert summary["acc"] == pytest.approx(100 / 3)


def test_eval_notes_a_near_chance_run_in_its_table_and_its_json(near_chance_run, capsys):
    run, _, _ = near_chance_run
    assert main(["eval", str(run)]) == 0
    out = capsys.readouterr().out
    assert MAJORITY_NOTE in out and LR_NOTE in out
    assert main(["eval", str(run), "--json"]) == 0
    result = json.loads(capsys.readouterr().out)
    assert result["majority_acc"] == pytest.approx(100 / 3) and result["lr_reached_base"] is False
    assert [note[:len(MAJORITY_NOTE)] for note in result["notes"]][:1] == [MAJORITY_NOTE]
    assert result["notes"][1].startswith(LR_NOTE)


def test_report_notes_a_near_chance_run_in_its_reading(near_chance_run, tmp_path, capsys):
    run, _, _ = near_chance_run
    assert main(["report", str(run.parent), "--no-bench", "--output", str(tmp_path / "report")]) == 0
    out = capsys.readouterr().out
    assert "note: lora is within 0.0 points of always answering the majority class (33.3%) on task" in out
    assert "note: the learning rate of lora never reached its base value (2 warm-up epochs in a 1-epoch run)" in out
    assert "note: lora is within 0.0 points" in (tmp_path / "report" / "report.md").read_text()


def test_a_short_run_with_the_default_warmup_trains_at_its_learning_rate(tmp_path, capsys):
    task, run = write_vtab_task(tmp_path / "task"), tmp_path / "run"
    assert main(["train", *TINY, "--data", str(task), "--output", str(run), "--epochs", "2", "--lr", "3e-3"]) == 0
    captured = capsys.readouterr()
    assert "warning" not in captured.err and LR_NOTE not in captured.out
    assert "warmup_epochs: 0" in (run / "config.yaml").read_text()  # the rule's value, resolved
    records = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    assert records[0]["lr"] > 1e-3  # cosine from the base value at once (a 10-epoch warm-up: below 2e-4)
    assert json.loads((run / "summary.json").read_text())["lr_reached_base"] is True
