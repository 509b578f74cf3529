"""tieta sweep: every cell a run folder, finished runs skipped, failures isolated, bad plans refused."""

import json
from pathlib import Path

import pytest
import yaml

from tests.conftest import fail_in_epoch, write_vtab_task
from tieta import TietaError
from tieta.cli import main
from tieta.sweep import runner
from tieta.sweep.plan import plan_from_dict, plan_from_flags, read_plan
from tieta.sweep.runner import FAILED, FINISHED_BEFORE, NO_DATA, TRAINED, run_sweep

TINY = {"model": "test_vit", "weights": "random", "img_size": 32, "optim.epochs": 1, "optim.warmup_epochs": 0,
        "optim.batch_size": 4, "eval_batch_size": 8, "lora.rank": 2}


@pytest.fixture
def tasks(tmp_path):
    return [write_vtab_task(tmp_path / "data" / "a"), write_vtab_task(tmp_path / "data" / "b", num_classes=2, seed=1)]


def _statuses(outcomes):
    return [(o.cell.task.name, o.cell.run.name, o.cell.seed, o.status) for o in outcomes]


def test_every_cell_trains_once_and_a_rerun_skips_finished_runs(tasks, tmp_path):
    plan = plan_from_flags([str(t) for t in tasks], ["lora", "tome+lora"], [0, 1], TINY)
    outcomes = run_sweep(plan, tmp_path / "sweep", log=lambda text: None)
    assert sorted(_statuses(outcomes)) == sorted(
        (task, run, seed, TRAINED) for task in "ab" for run in ("lora", "tome+lora") for seed in (0, 1))
    assert (tmp_path / "sweep" / "sweep.yaml").is_file()
    checkpoint = tmp_path / "sweep" / "b" / "tome+lora" / "seed1" / "checkpoint.safetensors"
    written = checkpoint.stat().st_mtime_ns
    config = yaml.safe_load((checkpoint.parent / "config.yaml").read_text())
    assert config["seed"] == 1 and config["method"] == "tome+lora"

    lines = []
    again = run_sweep(plan, tmp_path / "sweep", log=lines.append)
    assert {o.status for o in again} == {FINISHED_BEFORE}
    assert checkpoint.stat().st_mtime_ns == written
    assert "8 finished before" in lines[-1]


def test_an_unfinished_run_is_trained_again(tasks, tmp_path):
    plan = plan_from_flags([str(tasks[0])], ["lora"], [0], TINY)
    run_sweep(plan, tmp_path / "sweep", log=lambda text: None)
    for name in ("summary.json", "state.json"):  # killed before the end, by a tieta without state files
        (tmp_path / "sweep" / "a" / "lora" / "seed0" / name).unlink()
    assert {o.status for o in run_sweep(plan, tmp_path / "sweep", log=lambda text: None)} == {TRAINED}


def test_an_interrupted_run_is_resumed_from_its_last_epoch(tasks, tmp_path, monkeypatch):
    plan = plan_from_flags([str(tasks[0])], ["lora"], [0], {**TINY, "optim.epochs": 3})
    fail_in_epoch(monkeypatch, 2)
    with pytest.raises(KeyboardInterrupt):
        run_sweep(plan, tmp_path / "sweep", log=lambda text: None)
    monkeypatch.undo()
    lines = []
    assert {o.status for o in run_sweep(plan, tmp_path / "sweep", log=lines.append)} == {TRAINED}
    run_sweep(plan, tmp_path / "alone", log=lambda text: None)
    metrics = [[json.loads(line)["loss"] for line in (folder / "a" / "lora" / "seed0" / "metrics.jsonl").open()]
               for folder in (tmp_path / "sweep", tmp_path / "alone")]
    assert metrics[0] == metrics[1] and len(metrics[0]) == 3


def test_a_finished_run_with_other_settings_stops_the_sweep_before_it_starts(tasks, tmp_path):
    run_sweep(plan_from_flags([str(tasks[0])], ["lora"], [0], TINY), tmp_path / "sweep", log=lambda text: None)
    changed = plan_from_flags([str(tasks[0])], ["lora"], [0], {**TINY, "optim.lr": 0.5})
    with pytest.raises(TietaError, match=r"other settings \(optim.lr 0.001 there, 0.5 now\)"):
        run_sweep(changed, tmp_path / "sweep", log=lambda text: None)


def test_one_failed_run_is_reported_and_the_rest_go_on(tasks, tmp_path, monkeypatch):
    real_fit = runner.fit

    def failing_fit(config, output, **kwargs):
        if config.method == "tome+lora" and config.seed == 0:
            raise RuntimeError("out of memory")
        return real_fit(config, output, **kwargs)

    monkeypatch.setattr(runner, "fit", failing_fit)
    lines = []
    plan = plan_from_flags([str(t) for t in tasks], ["lora", "tome+lora"], [0], TINY)
    outcomes = run_sweep(plan, tmp_path / "sweep", log=lines.append)
    statuses = {(o.cell.task.name, o.cell.run.name): o.status for o in outcomes}
    assert statuses == {("a", "lora"): TRAINED, ("a", "tome+lora"): FAILED,
                        ("b", "lora"): TRAINED, ("b", "tome+lora"): FAILED}
    summary = lines[-1]
    assert summary.startswith("sweep summary: 2 trained, 2 failed")
    assert "failed: a · tome+lora · seed 0: RuntimeError: out of memory" in summary
    assert "out of memory" in (tmp_path / "sweep" / "failures.log").read_text()  # the traceback is kept


def test_a_missing_task_folder_is_reported_and_skipped(tasks, tmp_path):
    plan = plan_from_dict({"tasks": ["a", "absent", {"name": "b", "classes": 5}], "runs": {"lora": {}},
                           "base": TINY}, "test", root=tmp_path / "data")
    lines = []
    outcomes = run_sweep(plan, tmp_path / "sweep", log=lines.append)
    assert {o.cell.task.name: o.status for o in outcomes} == {"a": TRAINED, "absent": NO_DATA, "b": NO_DATA}
    text = "\n".join(lines)
    assert "task absent skipped: data folder" in text and "does not exist" in text
    assert "task b skipped: its data has 2 classes, the sweep says 5" in text


def test_a_bad_setting_is_refused_before_any_run(tasks, tmp_path):
    plan = plan_from_dict({"tasks": ["a"], "runs": {"lora": {}, "bad": {"optim.lr": -1}}, "base": TINY},
                          "test", root=tmp_path / "data")
    with pytest.raises(TietaError, match="run bad: optim.lr must be positive"):
        run_sweep(plan, tmp_path / "sweep", log=lambda text: None)
    assert not (tmp_path / "sweep" / "a").exists()


@pytest.mark.parametrize("text, message", [
    ("tasks: [a]\nruns: [lora]", "runs should be a mapping"),
    ("tasks: []\nruns: {lora: {}}", "tasks should be a non-empty list"),
    ("tasks: [a]\nruns: {lora: {}}\nseeds: [0, 0]", "repeat a seed"),
    ("tasks: [a]\nruns: {lora: {}}\nseeds: [-1]", "seeds should be a list of non-negative integers"),
    ("tasks: [../a]\nruns: {lora: {}}", "cannot name a folder"),
    ("tasks: [a]\nruns: {x/y: {}}", "cannot name a folder"),
    ("tasks: [a]\nruns: {lora: {}}\nextra: 1", "unknown key 'extra'"),
    ("tasks: [{name: a, classes: many}]\nruns: {lora: {}}", "positive integer"),
    ("tasks: [a\nruns", "not valid YAML"),
    ("- 1\n- 2", "should hold a mapping"),
])
def test_malformed_sweep_files_get_one_sentence(tmp_path, text, message):
    path = tmp_path / "sweep.yaml"
    path.write_text(text)
    with pytest.raises(TietaError, match=message):
        read_plan(path)


def test_vtab_names_bring_their_group_and_class_count(tmp_path):
    plan = plan_from_dict({"tasks": ["cifar", "kitti", {"name": "elpv", "group": "specialized"}],
                           "runs": {"lora": {"method": "lora", "optim": {"lr_groups": {"head": 0.01}}}}}, "test")
    assert [(t.name, t.group, t.classes) for t in plan.tasks] == [
        ("cifar", "natural", 100), ("kitti", "structured", 4), ("elpv", "specialized", None)]
    assert plan.runs[0].settings == {"method": "lora", "optim.lr_groups": {"head": 0.01}}


def test_the_shipped_sweep_files_name_all_19_tasks_with_valid_settings():
    from tieta.sweep.runner import cell_config
    from tieta.sweep.vtab1k import VTAB_1K

    folder = Path(__file__).resolve().parents[2] / "configs"
    files = sorted(path.name for path in folder.glob("*_vtab.yaml"))
    assert files == ["dyt_vtab.yaml", "pyra_vtab.yaml"]
    for name in files:
        plan = read_plan(folder / name)
        assert {(t.name, t.group, t.classes) for t in plan.tasks} == {(n, g, c) for n, (g, c) in VTAB_1K.items()}
        for cell in plan.cells()[:len(plan.runs)]:
            cell_config(plan, cell)  # every run's settings are accepted


def test_the_command_line_grid_and_its_errors(tasks, tmp_path, capsys):
    common = ["--model", "test_vit", "--weights", "random", "--img-size", "32", "--epochs", "1",
              "--warmup-epochs", "0", "--batch-size", "4", "--set", "lora.rank=2"]
    assert main(["sweep", "--data", str(tasks[0]), "--method", "lora", "--output", str(tmp_path / "s")] + common) == 0
    out = capsys.readouterr().out
    assert "sweep summary: 1 trained" in out and f"next: tieta report {tmp_path / 's'}" in out
    assert main(["sweep", "--output", str(tmp_path / "t")]) == 2
    assert "give a sweep file, or --data" in capsys.readouterr().err
    assert main(["sweep", str(tmp_path / "nope.yaml"), "--output", str(tmp_path / "t")]) == 2
    assert "sweep file" in capsys.readouterr().err


def test_data_gives_a_sweep_file_its_tasks(tasks, tmp_path, capsys):
    """A sweep file without tasks (as tieta plan writes it) takes them from --data; a file's own
    tasks are replaced by --data's, which --root and --tasks cannot then choose among."""
    sweep_file = tmp_path / "plan.yaml"
    sweep_file.write_text(yaml.safe_dump({"base": {k: v for k, v in TINY.items()}, "runs": {"lora": {"method": "lora"}}}))
    assert read_plan(sweep_file, tasks=[]).tasks == []
    assert main(["sweep", str(sweep_file), "--data", str(tasks[1]), "--output", str(tmp_path / "s")]) == 0
    assert (tmp_path / "s" / "b" / "lora" / "seed0" / "summary.json").is_file()
    assert not (tmp_path / "s" / "a").exists()
    assert main(["sweep", str(sweep_file), "--output", str(tmp_path / "t")]) == 2
    assert "tasks should be a non-empty list (or give the task folders with --data)" in capsys.readouterr().err
    assert main(["sweep", str(sweep_file), "--data", str(tasks[0]), "--method", "lora", "--output",
                 str(tmp_path / "t")]) == 2
    assert "not both" in capsys.readouterr().err
    assert main(["sweep", str(sweep_file), "--data", str(tasks[0]), "--root", "x", "--output", str(tmp_path / "t")]) == 2
    assert "--data gives the sweep file's tasks" in capsys.readouterr().err


def test_several_devices_train_in_their_own_processes(tasks, tmp_path):
    plan = plan_from_flags([str(t) for t in tasks], ["lora"], [0], TINY)
    plan.runs.append(type(plan.runs[0])("broken", {"method": "lora", "weights": str(tmp_path / "absent.safetensors")}))
    lines = []
    outcomes = run_sweep(plan, tmp_path / "sweep", devices=["cpu", "cpu"], log=lines.append)
    statuses = {(o.cell.task.name, o.cell.run.name): o.status for o in outcomes}
    assert statuses == {("a", "lora"): TRAINED, ("b", "lora"): TRAINED, ("a", "broken"): FAILED,
                        ("b", "broken"): FAILED}
    assert (tmp_path / "sweep" / "b" / "lora" / "seed0" / "summary.json").is_file()
    assert (tmp_path / "sweep" / "logs" / "a.lora.seed0.log").is_file()
    failure = next(o for o in outcomes if o.status == FAILED)
    assert "absent.safetensors" in failure.reason and "(log: " in failure.reason  # the run's own sentence


@pytest.mark.parametrize("devices, message", [("banana", "is not a device"), ("cuda:0", "CUDA")])
def test_a_device_this_machine_lacks_is_refused_before_any_run(tasks, tmp_path, capsys, devices, message):
    if message == "CUDA" and __import__("torch").cuda.is_available():
        pytest.skip("this machine has CUDA")
    argv = ["sweep", "--data", str(tasks[0]), "--method", "lora", "--output", str(tmp_path / "s"),
            "--devices", devices, "--model", "test_vit", "--weights", "random"]
    assert main(argv) == 2
    assert message in capsys.readouterr().err
    assert not (tmp_path / "s").exists()


def test_ctrl_c_ends_the_sweep_with_its_summary_so_far(tasks, tmp_path, monkeypatch, capsys):
    real_fit = runner.fit

    def interrupted_fit(config, output, **kwargs):
        if config.method == "tome+lora":
            raise KeyboardInterrupt
        return real_fit(config, output, **kwargs)

    monkeypatch.setattr(runner, "fit", interrupted_fit)
    argv = ["sweep", "--data", str(tasks[0]), "--method", "lora", "tome+lora", "pyra+lora", "--output",
            str(tmp_path / "s"), "--model", "test_vit", "--weights", "random", "--img-size", "32", "--epochs", "1",
            "--warmup-epochs", "0", "--batch-size", "4"]
    assert main(argv) == 130
    captured = capsys.readouterr()
    assert "sweep summary: 1 trained, 2 not run" in captured.out and "interrupted" in captured.err
    assert (tmp_path / "s" / "a" / "lora" / "seed0" / "summary.json").is_file()
