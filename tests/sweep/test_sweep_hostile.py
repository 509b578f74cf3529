"""tieta sweep and the plan it records, fed what a clumsy user or an attacker would give it: each bad
plan is one sentence before any work, no user file is replaced, and no finished run trained on other
data is taken for one of this sweep's."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest
import torch
import yaml

from conftest import refused, write_vtab_task
from tieta import TietaError, files
from tieta.cli import main
from tieta.data.vtab import fingerprint, open_task
from tieta.sweep import plan as plan_module, runner
from tieta.sweep.plan import MAX_CELLS, plan_from_dict, plan_from_flags
from tieta.sweep.runner import FAILED, FINISHED_BEFORE, TRAINED, cell_config, run_sweep, write_plan

TINY = {"model": "test_vit", "weights": "random", "img_size": 32, "optim.epochs": 1, "optim.warmup_epochs": 0,
        "optim.batch_size": 4, "eval_batch_size": 8, "lora.rank": 2}
TINY_FLAGS = ["--model", "test_vit", "--weights", "random", "--img-size", "32", "--epochs", "1",
              "--warmup-epochs", "0", "--batch-size", "4"]


def quiet(text: str) -> None:
    pass


# --- the plan's schema ------------------------------------------------------------------------------

@pytest.mark.parametrize("values, message", [
    ({"root": 5, "tasks": ["a"], "runs": {"lora": {}}}, "root should be the folder holding the task folders"),
    ({"root": ["a"], "tasks": ["a"], "runs": {"lora": {}}}, "root should be"),
    ({"tasks": [{"name": "a", "path": 5}], "runs": {"lora": {}}}, "path of task 'a' should be a folder path"),
    ({"tasks": [{"name": "a", "path": ["x"]}], "runs": {"lora": {}}}, "path of task 'a' should be a folder path"),
    ({"tasks": "a", "runs": {"lora": {}}}, "tasks should be a non-empty list"),
    ({"tasks": [5], "runs": {"lora": {}}}, "each task is a folder name or a mapping"),
    ({"tasks": [{"name": 5}], "runs": {"lora": {}}}, "task name 5 cannot name a folder"),
    ({"tasks": ["a"], "runs": 5}, "runs should be a mapping"),
    ({"tasks": ["a"], "runs": {"lora": 5}}, "the settings of run 'lora' should be a mapping"),
    ({"tasks": ["a"], "runs": {5: {}}}, "run name 5 cannot name a folder"),
    ({"tasks": ["a"], "runs": {"lora": {}}, "seeds": "0"}, "seeds should be a list"),
    ({"tasks": ["a"], "runs": {"lora": {}}, "seeds": [True]}, "seeds should be a list"),
    ({"tasks": ["a"], "runs": {"lora": {}}, "base": []}, "base should be a mapping of settings"),
    ({"tasks": ["a"], "runs": {"lora": {}}, "base": 5}, "base should be a mapping of settings"),
    ({"tasks": ["a"], "runs": {"lora": {}}, "base": {5: 1}}, "base: setting names are text, got 5"),
    ({"tasks": ["a"], "runs": {"lora": {}}, 5: 1, "x": 2}, "unknown key 'x'"),
    ({"tasks": [{"name": "a", 5: 1, "y": 2}], "runs": {"lora": {}}}, "unknown task key 'y'"),
])
def test_a_key_of_the_wrong_type_is_named_in_one_sentence(values, message):
    with pytest.raises(TietaError, match=message):
        plan_from_dict(values, "test")


@pytest.mark.parametrize("values, message", [
    ({"base": {"optim.lr": 1e-3, "optim": {"lr": 2e-3}}}, "base: the setting optim.lr is given twice"),
    ({"base": {"optim": {"lr": 2e-3}, "optim.lr": 1e-3}}, "base: the setting optim.lr is given twice"),
    ({"base": {"optim": {"lr_groups": {"head": 1.0}}, "optim.lr_groups.head": 2.0}},
     "the setting optim.lr_groups.head is given twice"),
    ({"runs": {"lora": {"lora.rank": 4, "lora": {"rank": 2}}}}, "run lora: the setting lora.rank is given twice"),
    ({"runs": {"lora": {"device": "cpu"}}}, "run lora: device is the sweep's"),
])
def test_a_setting_given_twice_or_in_the_wrong_place_is_refused(values, message):
    with pytest.raises(TietaError, match=message):
        plan_from_dict({"tasks": ["a"], "runs": {"lora": {}}, **values}, "test")


def test_the_report_names_a_bad_key_of_the_recorded_plan(tmp_path, capsys):
    (tmp_path / "sweep").mkdir()
    (tmp_path / "sweep" / "sweep.yaml").write_text("root: 5\ntasks: [a]\nruns: {lora: {}}\n")
    assert "root should be the folder" in refused(capsys, "report", str(tmp_path / "sweep"), "--no-bench")


def test_a_grid_past_the_limit_is_refused_at_once_before_any_folder_is_opened(tmp_path, capsys, monkeypatch):
    # "At once" is asserted by what does not happen (no cell is built, no folder opened), never by a clock.
    opened = []
    monkeypatch.setattr(runner, "open_task", lambda path: opened.append(path))
    monkeypatch.setattr(plan_module.SweepPlan, "cells", lambda self: pytest.fail("the grid was enumerated"))
    path = tmp_path / "sweep.yaml"
    path.write_text("tasks: [" + ", ".join(f"t{i}" for i in range(2000)) + "]\nruns:\n"
                    + "".join(f"  r{i}: {{}}\n" for i in range(2000)))
    message = refused(capsys, "sweep", str(path), "--output", str(tmp_path / "out"), "--root", str(tmp_path / "no"))
    assert "make 4,000,000 runs, more than the 100,000 a sweep may have" in message
    assert opened == [] and not (tmp_path / "out").exists()


def test_seeds_from_the_command_line_count_toward_the_limit(tmp_path, capsys):
    path = tmp_path / "sweep.yaml"
    path.write_text("tasks: [a, b]\nruns: {lora: {}}\n")
    seeds = [str(seed) for seed in range(MAX_CELLS // 2 + 1)]
    assert "more than the 100,000" in refused(capsys, "sweep", str(path), "--output", str(tmp_path / "out"),
                                              "--seeds", *seeds)


# --- base settings: the device, the weights, the task folders ---------------------------------------

@pytest.mark.skipif(torch.cuda.device_count() > 5, reason="this machine has a sixth CUDA device")
def test_a_base_device_this_machine_lacks_is_refused_not_replaced(tmp_path, capsys):
    task = write_vtab_task(tmp_path / "data" / "a")
    sweep = tmp_path / "sweep.yaml"
    sweep.write_text(yaml.safe_dump({"tasks": ["a"], "runs": {"lora": {}}, "base": {**TINY, "device": "cuda:5"}}))
    message = refused(capsys, "sweep", str(sweep), "--root", str(task.parent), "--output", str(tmp_path / "out"))
    assert "cuda:5" in message
    message = refused(capsys, "sweep", "--data", str(task), "--method", "lora", "--output", str(tmp_path / "out"),
                      *TINY_FLAGS, "--device", "cuda:5")
    assert "cuda:5" in message
    assert not (tmp_path / "out").exists()


def test_the_base_device_is_where_the_runs_train(tmp_path, monkeypatch):
    task = write_vtab_task(tmp_path / "data" / "a")
    trained_on = []
    monkeypatch.setattr(runner, "fit", lambda config, output, **kwargs: trained_on.append(config.device))
    run_sweep(plan_from_flags([str(task)], ["lora"], [0], {**TINY, "device": "cpu"}), tmp_path / "out", log=quiet)
    assert trained_on == ["cpu"]


def test_base_weights_that_are_not_there_are_refused_before_any_run(tmp_path, capsys):
    task = write_vtab_task(tmp_path / "data" / "a")
    missing = tmp_path / "vit.safetensors"
    message = refused(capsys, "sweep", "--data", str(task), "--method", "lora", "--output", str(tmp_path / "out"),
                      *TINY_FLAGS[:2], "--weights", str(missing))
    assert f"base: weights file {missing} does not exist" in message
    assert not (tmp_path / "out").exists()


def test_a_sweep_in_which_no_task_has_data_is_one_sentence(tmp_path, capsys):
    sweep = tmp_path / "sweep.yaml"
    sweep.write_text(yaml.safe_dump({"tasks": ["a", "b", "c"], "runs": {"lora": {}}, "base": TINY}))
    message = refused(capsys, "sweep", str(sweep), "--root", str(tmp_path / "nowhere"), "--output",
                      str(tmp_path / "out"))
    assert "no task of the sweep has data (task a: data folder" in message
    assert "; nor do b, c)" in message
    assert not (tmp_path / "out").exists()


# --- the recorded plan: only tieta's own is replaced ------------------------------------------------

def _plan(task: Path, **settings):
    return plan_from_flags([str(task)], ["lora"], [0], {**TINY, **settings})


def test_a_users_own_sweep_yaml_is_never_replaced(tmp_path, capsys):
    task = write_vtab_task(tmp_path / "data" / "a")
    out = tmp_path / "out"
    out.mkdir()
    mine = "# my notes, not a plan\nthings: [1, 2]\n"
    (out / "sweep.yaml").write_text(mine)
    with pytest.raises(TietaError, match="is not a sweep plan tieta can read .* tieta replaces only its own"):
        write_plan(_plan(task), out)
    message = refused(capsys, "sweep", "--data", str(task), "--method", "lora", "--output", str(out), *TINY_FLAGS)
    assert "sweep.yaml is not a sweep plan tieta can read" in message
    assert (out / "sweep.yaml").read_text() == mine and not (out / "a").exists()


def test_a_plan_is_joined_and_tietas_own_unreadable_plan_is_replaced(tmp_path):
    first, second = write_vtab_task(tmp_path / "data" / "a"), write_vtab_task(tmp_path / "data" / "b")
    out = tmp_path / "out"
    write_plan(_plan(first), out)
    write_plan(_plan(second), out)
    recorded = yaml.safe_load((out / "sweep.yaml").read_text())
    assert [task["name"] for task in recorded["tasks"]] == ["a", "b"]
    files.write_owned(out / "sweep.yaml", "tasks: 5\n")  # tieta's own, from a tieta that wrote another form
    write_plan(_plan(first), out)
    assert [task["name"] for task in yaml.safe_load((out / "sweep.yaml").read_text())["tasks"]] == ["a"]


def test_a_user_written_readable_plan_is_adopted(tmp_path):
    task = write_vtab_task(tmp_path / "data" / "a")
    out = tmp_path / "out"
    out.mkdir()
    (out / "sweep.yaml").write_text(yaml.safe_dump({"tasks": [{"name": "z", "path": "elsewhere"}],
                                                    "runs": {"lora": {}}}))
    write_plan(_plan(task), out)
    assert [t["name"] for t in yaml.safe_load((out / "sweep.yaml").read_text())["tasks"]] == ["z", "a"]


def test_a_linked_sweep_yaml_is_refused(tmp_path):
    task = write_vtab_task(tmp_path / "data" / "a")
    out = tmp_path / "out"
    out.mkdir()
    target = tmp_path / "elsewhere.yaml"
    write_plan(_plan(task), tmp_path / "other")
    target.write_text((tmp_path / "other" / "sweep.yaml").read_text())
    os.symlink(target, out / "sweep.yaml")
    before = target.read_text()
    with pytest.raises(TietaError, match="symbolic link"):
        write_plan(_plan(task), out)
    assert target.read_text() == before


# --- finished runs trained on other data -------------------------------------------------------------

def _finished_by_hand(out: Path, plan, summary: dict) -> Path:
    """A finished run folder of the plan's first cell as the runner would find it (no training)."""
    cell = plan.cells()[0]
    folder = out / cell.folder
    folder.mkdir(parents=True)
    (folder / "config.yaml").write_text(yaml.safe_dump(cell_config(plan, cell).to_dict()))
    (folder / "summary.json").write_text(json.dumps({"acc": 50.0, "best_acc": 50.0, **summary}))
    return folder


def _print(task: Path) -> str:
    return fingerprint(open_task(task), ("train", "test"))


def test_a_finished_run_of_the_same_data_is_skipped(tmp_path, monkeypatch):
    task = write_vtab_task(tmp_path / "data" / "a")
    monkeypatch.setattr(runner, "fit", lambda *args, **kwargs: pytest.fail("nothing should train"))
    _finished_by_hand(tmp_path / "out", _plan(task), {"data_fingerprint": _print(task), "num_classes": 3})
    assert {o.status for o in run_sweep(_plan(task), tmp_path / "out", log=quiet)} == {FINISHED_BEFORE}


@pytest.mark.parametrize("change", ["a class more", "images added to a list"])
def test_a_finished_run_of_other_data_stops_the_sweep(tmp_path, change):
    task = write_vtab_task(tmp_path / "data" / "a")
    folder = _finished_by_hand(tmp_path / "out", _plan(task), {"data_fingerprint": _print(task), "num_classes": 3})
    if change == "a class more":
        write_vtab_task(task, num_classes=4)
    else:
        write_vtab_task(task, per_class=5)  # the same 3 classes, 3 more training images
    with pytest.raises(TietaError, match=f"the data of task a changed since the finished run in {folder} was "
                                         "trained \\(data_fingerprint"):
        run_sweep(_plan(task), tmp_path / "out", log=quiet)


def test_a_run_from_before_fingerprints_is_checked_by_its_class_count(tmp_path):
    task = write_vtab_task(tmp_path / "data" / "a")
    _finished_by_hand(tmp_path / "out", _plan(task), {"num_classes": 3})
    assert {o.status for o in run_sweep(_plan(task), tmp_path / "out", log=quiet)} == {FINISHED_BEFORE}
    write_vtab_task(task, num_classes=4)
    with pytest.raises(TietaError, match="the data of task a changed .*num_classes 3 there, 4 now"):
        run_sweep(_plan(task), tmp_path / "out", log=quiet)


def test_a_finished_run_whose_summary_cannot_be_read_is_refused(tmp_path):
    task = write_vtab_task(tmp_path / "data" / "a")
    folder = _finished_by_hand(tmp_path / "out", _plan(task), {})
    (folder / "summary.json").write_text("{not json")
    with pytest.raises(TietaError, match="holds a finished run whose data cannot be checked"):
        run_sweep(_plan(task), tmp_path / "out", log=quiet)


def test_a_real_run_is_not_reused_once_its_task_folder_grew(tmp_path, capsys):
    task = write_vtab_task(tmp_path / "data" / "a")
    argv = ["sweep", "--data", str(task), "--method", "lora", "--output", str(tmp_path / "out"), *TINY_FLAGS,
            "--set", "lora.rank=2"]
    assert main(argv) == 0
    write_vtab_task(task, num_classes=4)
    message = refused(capsys, *argv)
    assert "the data of task a changed since the finished run in" in message and "3 classes" in message


# --- files the runner writes --------------------------------------------------------------------------

def test_a_run_config_file_in_logs_is_never_written_through_a_link(tmp_path):
    task = write_vtab_task(tmp_path / "data" / "a")
    plan = _plan(task)
    (tmp_path / "out" / "logs").mkdir(parents=True)
    target = tmp_path / "target.yaml"
    target.write_text("mine\n")
    os.symlink(target, tmp_path / "out" / "logs" / "a.lora.seed0.yaml")
    with pytest.raises(TietaError, match="symbolic link"):
        runner._train_in_subprocess(plan, plan.cells()[0], tmp_path / "out", "cpu")
    assert target.read_text() == "mine\n"


def test_a_linked_failures_log_is_not_followed_and_the_failure_is_still_reported(tmp_path, monkeypatch):
    task = write_vtab_task(tmp_path / "data" / "a")

    def crash(*args, **kwargs):
        raise RuntimeError("a bug")

    monkeypatch.setattr(runner, "fit", crash)
    (tmp_path / "out").mkdir()
    target = tmp_path / "target.log"
    target.write_text("mine\n")
    os.symlink(target, tmp_path / "out" / "failures.log")
    outcomes = run_sweep(_plan(task), tmp_path / "out", log=quiet)
    assert [o.status for o in outcomes] == [FAILED]
    assert "RuntimeError: a bug (its traceback could not be kept" in outcomes[0].reason
    assert target.read_text() == "mine\n"


def test_the_traceback_of_a_crashed_run_is_appended_to_failures_log(tmp_path, monkeypatch):
    task = write_vtab_task(tmp_path / "data" / "a")
    calls = []

    def crash_once(config, output, **kwargs):
        calls.append(1)
        raise RuntimeError(f"bug {len(calls)}")

    monkeypatch.setattr(runner, "fit", crash_once)
    run_sweep(_plan(task), tmp_path / "out", log=quiet)
    outcomes = run_sweep(_plan(task), tmp_path / "out", log=quiet)
    assert outcomes[0].status == FAILED and TRAINED not in {o.status for o in outcomes}
    text = (tmp_path / "out" / "failures.log").read_text()
    assert "RuntimeError: bug 1" in text and "RuntimeError: bug 2" in text
