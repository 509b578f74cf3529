"""tieta report against folders it did not write: files of the user's in the way, run files that are
FIFOs, devices, links or another tool's, runs of other data or recipes, a tampered throughput.json."""

from __future__ import annotations

import errno
import json
import os
import signal
from pathlib import Path

import pytest
import torch
import yaml

from tieta.cli import main
from tieta.errors import TietaError
from tieta.files import MANIFEST
from tieta.report import sweep_bench
from tieta.report.aggregate import run_rows
from tieta.report.collect import RunRecord, SweepResults, collect
from tieta.report.sweep_bench import THROUGHPUT_FILE, cache_problem, read_kept, sweep_throughput
from tieta.report.sweep_report import write_report
from tieta.sweep.plan import plan_from_dict
from tieta.sweep.runner import write_plan
from tieta.train.checkpoint import write_tensors
from tieta.train.rundir import CHECKPOINT

TASKS = {"cifar": "natural", "eurosat": "specialized"}
RUNS = ("lora", "pyra")
PRINT = "3 classes, 30 images, sha256 0123456789abcdef"


def _summary(run: str, acc: float, **extra) -> dict:
    return {"acc": acc, "best_acc": acc, "method": run, "gmacs": 1.0, "img_size": 32, "data_fingerprint": PRINT,
            **extra}


def _write_run(folder: Path, summary: dict, config: dict, state: str = "finished") -> Path:
    folder.mkdir(parents=True)
    (folder / "config.yaml").write_text(yaml.safe_dump(config))
    (folder / "state.json").write_text(json.dumps({"state": state, "reason": "", "epoch": 1, "epochs": 1}))
    (folder / "summary.json").write_text(json.dumps(summary))
    return folder


def _sweep(folder: Path, seeds=(0, 1)) -> Path:
    """A sweep folder of two tasks, two runs and two seeds, every run at 60% + its seed."""
    plan = plan_from_dict({"tasks": [{"name": t, "group": g, "path": str(folder / "data" / t)} for t, g in TASKS.items()],
                           "runs": {run: {"method": run} for run in RUNS}, "seeds": list(seeds)}, "test")
    write_plan(plan, folder)
    for run in RUNS:
        for seed in seeds:
            for task in TASKS:
                _write_run(folder / task / run / f"seed{seed}", _summary(run, 60.0 + seed),
                           {"seed": seed, "method": run, "model": "test_vit", "optim": {"lr": 0.001}})
    return folder


def _cell(folder: Path, task="cifar", run="lora", seed=1) -> Path:
    return folder / task / run / f"seed{seed}"


def _quiet(text: str) -> None:
    pass


@pytest.fixture
def no_hang():
    """Fail, instead of waiting for ever, where something blocks (a FIFO opened for reading)."""
    def stop(signum, frame):
        raise TimeoutError("blocked")

    previous = signal.signal(signal.SIGALRM, stop)
    signal.alarm(60)
    yield
    signal.alarm(0)
    signal.signal(signal.SIGALRM, previous)


# --- what a report writes ---------------------------------------------------------------------

def test_a_report_md_of_the_users_is_never_replaced(tmp_path, capsys):
    folder, docs = _sweep(tmp_path / "sweep"), tmp_path / "docs"
    docs.mkdir()
    (docs / "report.md").write_text("# My notes\n")
    assert main(["report", str(folder), "--output", str(docs), "--no-bench"]) == 2
    error = capsys.readouterr().err.strip()
    assert error == f"tieta: error: {docs / 'report.md'} exists and was not written by tieta (or was changed " \
                    "since); move it away or write elsewhere"
    assert (docs / "report.md").read_text() == "# My notes\n"
    assert sorted(p.name for p in docs.iterdir()) == ["report.md"]  # refused before anything was written


def test_a_report_csv_link_is_refused_and_its_target_untouched(tmp_path, capsys):
    folder = _sweep(tmp_path / "sweep")
    (tmp_path / "target.csv").write_text("mine")
    (folder / "report.csv").symlink_to(tmp_path / "target.csv")
    assert main(["report", str(folder), "--no-bench"]) == 2
    assert "report.csv: it is a symbolic link" in capsys.readouterr().err
    assert (tmp_path / "target.csv").read_text() == "mine"


def test_a_report_replaces_its_own_files_and_an_older_tietas(tmp_path):
    folder = _sweep(tmp_path / "sweep")
    first = write_report(folder, bench=False, log=_quiet)
    assert {p.name for p in first["files"]} == {"report.md", "report.csv", "accuracy_vs_gmacs.png",
                                                 "group_means.png"}
    write_report(folder, bench=False, log=_quiet)  # its own files, recorded: replaced
    # as an older tieta left them: the same files, no record of them
    (folder / MANIFEST).unlink()
    write_report(folder, bench=False, log=_quiet)
    assert (folder / "report.md").read_text().startswith("# Report: sweep\n")
    # a figure the report.md does not show is not recognisably tieta's
    (folder / MANIFEST).unlink()
    (folder / "report.md").write_text("# Report: sweep\n")
    with pytest.raises(TietaError, match="accuracy_vs_gmacs.png exists and was not written by tieta"):
        write_report(folder, bench=False, log=_quiet)
    assert (folder / "report.md").read_text() == "# Report: sweep\n"  # refused before anything was written


def test_a_full_disk_leaves_the_previous_report(tmp_path, monkeypatch):
    folder = _sweep(tmp_path / "sweep")
    write_report(folder, bench=False, log=_quiet)
    before = (folder / "report.md").read_bytes()

    def full(descriptor):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(os, "fsync", full)
    with pytest.raises(TietaError, match=r"No space left on device\); the previous one is intact"):
        write_report(folder, bench=False, log=_quiet)
    monkeypatch.undo()
    assert (folder / "report.md").read_bytes() == before
    assert not [p for p in folder.iterdir() if p.name.endswith(".tieta-partial")]


# --- what a report reads ----------------------------------------------------------------------

def _missing(folder: Path) -> list[str]:
    return collect(folder).missing


@pytest.mark.parametrize("make, reason", [
    (lambda path: os.mkfifo(path), "summary.json is not a regular file"),
    (lambda path: path.symlink_to("/dev/zero"), "summary.json is not a regular file"),
    (lambda path: path.write_text(json.dumps({"accuracy": 0.93, "tool": "another"})),
     "summary.json has no acc (not a tieta run summary)"),
    (lambda path: path.write_text(json.dumps(_summary("lora", 150))),
     "summary.json gives acc 150, not a percentage from 0 to 100"),
    (lambda path: path.write_text(json.dumps(_summary("lora", -5))),
     "summary.json gives acc -5, not a percentage from 0 to 100"),
    (lambda path: path.write_text(json.dumps(_summary("lora", 61, best_acc=True))),
     "summary.json gives best_acc true, not a percentage from 0 to 100"),
    (lambda path: path.write_text(json.dumps(_summary("lora", 61, method=["lora"]))),
     "summary.json gives method as a list, not text"),
    (lambda path: path.write_text("[" * 10_000 + "]" * 10_000), "summary.json nests more than 32 levels deep"),
    (lambda path: path.unlink(), "finished, but its summary.json is missing"),
])
def test_a_summary_that_cannot_be_reported_is_listed_with_why_never_averaged(tmp_path, no_hang, make, reason):
    folder = _sweep(tmp_path / "sweep")
    (_cell(folder) / "summary.json").unlink()
    if "missing" not in reason:
        make(_cell(folder) / "summary.json")
    results = collect(folder)
    assert results.missing == [f"cifar · lora · seed 1: {reason}"]
    lora = run_rows(results)[0]
    assert lora.final["cifar"].n == 1 and lora.final["cifar"].mean == 60.0  # seed 1's cifar is not counted
    written = write_report(folder, bench=False, log=_quiet)
    assert f"- cifar · lora · seed 1: {reason}" in (folder / "report.md").read_text()
    assert written["missing"] == results.missing


@pytest.mark.parametrize("config, reason", [
    ({"seed": 1, "optim": 5}, "config.yaml gives optim as 5, not a mapping"),
    ({"seed": 1, "data": "cifar"}, 'config.yaml gives data as "cifar", not a mapping'),
    ({"seed": "one"}, "config.yaml gives no whole-number seed ('one')"),
    (["a", "list"], "config.yaml is not a mapping of settings"),
])
def test_run_settings_of_the_wrong_shape_are_listed_with_why(tmp_path, config, reason):
    folder = _sweep(tmp_path / "sweep")
    (_cell(folder) / "config.yaml").write_text(yaml.safe_dump(config))
    written = write_report(folder, bench=False, log=_quiet)
    assert written["missing"] == [f"cifar · lora · seed 1: {reason}"]


def test_a_run_folder_reached_through_a_link_is_left_out_with_why(tmp_path):
    folder = _sweep(tmp_path / "sweep")
    _cell(folder).rename(tmp_path / "elsewhere")
    _cell(folder).symlink_to(tmp_path / "elsewhere")
    logged = []
    written = write_report(folder, bench=False, log=logged.append)
    assert written["left_out"] == ["cifar · lora · seed 1: reached through a symbolic link (not followed; give the "
                                   "folder itself to report it)"]
    assert logged[0] == "left out " + written["left_out"][0]
    assert "**Left out:** 1 run with results" in (folder / "report.md").read_text()


def test_a_run_trained_on_other_data_is_left_out_with_why(tmp_path):
    folder = _sweep(tmp_path / "sweep")
    summary = json.loads((_cell(folder) / "summary.json").read_text())
    other = "3 classes, 31 images, sha256 fedcba9876543210"
    (_cell(folder) / "summary.json").write_text(json.dumps({**summary, "acc": 99.0, "data_fingerprint": other}))
    results = collect(folder)
    assert results.left_out == [f"cifar · lora · seed 1: trained on other data ({other}) than 3 other runs of "
                                f"cifar ({PRINT})"]
    assert max(r.summary["acc"] for r in results.records) == 61.0  # its 99% is in no mean


# --- a folder of runs without a plan ----------------------------------------------------------

def _runs(folder: Path, lrs=(0.001, 0.001, 0.001, 0.01)) -> Path:
    for index, lr in enumerate(lrs):
        _write_run(folder / f"run{index}", _summary("lora", 60.0 + index, data=str(folder / "data" / "cifar")),
                   {"seed": index, "method": "lora", "model": "test_vit", "optim": {"lr": lr, "epochs": 10}})
    return folder


def test_discovery_lists_links_finished_runs_without_summaries_and_skips_hidden_folders(tmp_path):
    folder = _runs(tmp_path / "runs", lrs=(0.001, 0.001))
    _write_run(tmp_path / "outside", _summary("lora", 70.0), {"seed": 5, "optim": {"lr": 0.001, "epochs": 10}})
    (folder / "linked").symlink_to(tmp_path / "outside")
    (folder / "run1" / "summary.json").unlink()
    _write_run(folder / ".run0.tieta-incoming-x1", _summary("lora", 99.0), {"seed": 9})  # a replacement in progress
    _write_run(folder / "nested" / ".hidden" / "run", _summary("lora", 98.0), {"seed": 8})
    results = collect(folder)
    assert [r.folder.name for r in results.records] == ["run0"]
    assert results.missing == [f"{folder / 'run1'}: finished, but its summary.json is missing"]
    assert results.left_out == [f"{folder / 'linked'}: reached through a symbolic link (not followed; give the "
                                "folder itself to report it)"]


def test_discovery_leaves_out_runs_of_another_recipe(tmp_path):
    folder = _runs(tmp_path / "runs")
    results = collect(folder)
    assert sorted(r.folder.name for r in results.records) == ["run0", "run1", "run2"]
    assert results.left_out == [f"{folder / 'run3'}: trained with another recipe (optim.lr 0.01 where 3 other runs "
                                "used 0.001)"]
    _write_run(folder / "run4", _summary("lora", 50.0), {"seed": 4, "method": "lora", "model": "test_vit",
                                                         "optim": {"lr": 0.001, "epochs": 10}, "img_size": 64})
    (folder / "run4" / "summary.json").write_text(json.dumps(_summary("lora", 50.0, img_size=64)))
    assert f"{folder / 'run4'}: trained with another recipe (img_size 64 where 3 other runs used 32)" in \
        collect(folder).left_out


# --- the kept throughput ----------------------------------------------------------------------

def _checkpoint(folder: Path, value: float) -> None:
    folder.mkdir(parents=True, exist_ok=True)
    write_tensors({"head.weight": torch.full((2, 2), value)}, folder / CHECKPOINT, {"tieta_config": "{}"})


@pytest.fixture
def timed(tmp_path, monkeypatch):
    """Two runs of one task with checkpoints, and a stand-in for the timing that counts its calls."""
    folder = tmp_path / "sweep"
    records = []
    for index, run in enumerate(RUNS):
        _checkpoint(folder / run, index)
        records.append(RunRecord("cifar", run, 0, folder / run, _summary(run, 60.0), {}))
    results = SweepResults(["cifar"], {"cifar": None}, {}, list(RUNS), [0], records)
    calls = []

    def measure(chosen, device, batch_size, rounds, log):
        calls.append(1)
        return {"rows": {r.run: {"images_per_s": 100.0, "speedup": 1.0, "speedup_spread": [1.0]} for r in chosen}}

    monkeypatch.setattr(sweep_bench, "_measure", measure)
    logged = []

    def throughput():
        return sweep_throughput(results, folder, list(RUNS), "cpu", 4, 1, log=logged.append)

    return folder, throughput, calls, logged


def test_a_run_trained_again_is_timed_again(timed):
    folder, throughput, calls, _ = timed
    throughput()
    throughput()
    assert len(calls) == 1  # kept
    _checkpoint(folder / "pyra", 7.0)  # trained again (another schedule, other weights)
    throughput()
    assert len(calls) == 2


@pytest.mark.parametrize("tamper", [
    lambda kept: kept.update(rows="fast"),
    lambda kept: kept.update(folders=5),
    lambda kept: kept["rows"]["lora"].update(images_per_s="many"),
    lambda kept: kept["rows"].pop("pyra"),
    lambda kept: kept.update(batch_size=4.0),
    lambda kept: kept.update(models=[1]),
])
def test_a_tampered_throughput_file_is_timed_again_never_trusted(timed, tamper):
    folder, throughput, calls, logged = timed
    throughput()
    kept = json.loads((folder / THROUGHPUT_FILE).read_text())
    tamper(kept)
    assert cache_problem(kept) is not None
    (folder / THROUGHPUT_FILE).write_text(json.dumps(kept))
    measured = throughput()
    assert len(calls) == 2 and measured["rows"]["lora"]["images_per_s"] == 100.0
    assert any("is not what tieta writes" in line for line in logged)
    assert any("could not keep the measurement" in line for line in logged)  # not tieta's file any more
    assert read_kept(folder / THROUGHPUT_FILE, _quiet) == (None, False)


def test_an_older_tietas_throughput_file_is_timed_again_and_replaced(timed):
    folder, throughput, calls, _ = timed
    throughput()
    kept = json.loads((folder / THROUGHPUT_FILE).read_text())
    del kept["models"]  # an older tieta kept no checksums, nor any record of its files
    (folder / THROUGHPUT_FILE).write_text(json.dumps(kept))
    (folder / MANIFEST).unlink()
    throughput()
    assert len(calls) == 2 and "models" in json.loads((folder / THROUGHPUT_FILE).read_text())
    throughput()
    assert len(calls) == 2
