"""Exact resume: a run killed (SIGKILL, mid-epoch) or interrupted, then resumed, ends with the metrics
of the same run left alone."""

from __future__ import annotations

import json
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from conftest import fail_in_epoch, write_vtab_task
from tieta import TietaError
from tieta.cli import main
from tieta.train.config import load_config
from tieta.train.fit import fit, resume_run
from tieta.train.rundir import read_state

# the defaults keep dropout and drop-path on: resuming must restore every random state
RUN = ["--model", "test_vit", "--weights", "random", "--img-size", "32", "--warmup-epochs", "1",
       "--batch-size", "2", "--set", "eval_batch_size=8"]
COMPARED = ("loss", "acc", "eval_loss", "lr", "tau")


def _metrics(run: Path) -> list[dict]:
    return [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]


def _same_metrics(resumed: Path, alone: Path) -> None:
    a, b = _metrics(resumed), _metrics(alone)
    assert [r["epoch"] for r in a] == [r["epoch"] for r in b]
    for x, y in zip(a, b):
        assert {k: x.get(k) for k in COMPARED} == {k: y.get(k) for k in COMPARED}


def _command(task: Path, output: Path, method: str, epochs: int) -> list[str]:
    return [sys.executable, "-m", "tieta", "train", *RUN, "--epochs", str(epochs), "--data", str(task),
            "--method", method, "--output", str(output)]


def _epochs_done(run: Path) -> int:
    try:
        return json.loads((run / "state.json").read_text())["epoch"]
    except (OSError, ValueError, KeyError):
        return 0


def test_sigkill_mid_epoch_then_resume_gives_the_uninterrupted_metrics(tmp_path):
    task = write_vtab_task(tmp_path / "task", per_class=8)  # 24 images, 12 steps an epoch
    killed, alone = tmp_path / "killed", tmp_path / "alone"
    process = subprocess.Popen(_command(task, killed, "dyt", 4), stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.monotonic() + 240
    while _epochs_done(killed) < 2 and process.poll() is None and time.monotonic() < deadline:
        time.sleep(0.02)
    assert process.poll() is None, "the run ended before it could be killed"
    time.sleep(0.05)  # well inside epoch 3 (an epoch takes far longer)
    process.send_signal(signal.SIGKILL)
    process.wait()
    state = read_state(killed)
    assert state.state == "interrupted" and state.epoch == 2
    assert not (killed / "summary.json").exists()
    assert main(["eval", str(killed)]) == 2  # an unfinished run is refused, not evaluated
    resumed = subprocess.run([sys.executable, "-m", "tieta", "train", "--resume", str(killed)],
                             capture_output=True, text=True, timeout=300)
    assert resumed.returncode == 0, resumed.stderr[-2000:]
    assert "resuming" in resumed.stdout + resumed.stderr
    done = subprocess.run(_command(task, alone, "dyt", 4), capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-2000:]
    _same_metrics(killed, alone)
    assert read_state(killed).state == "finished" and not (killed / "progress.safetensors").exists()
    one, two = (json.loads((run / "summary.json").read_text()) for run in (killed, alone))
    assert one["acc"] == two["acc"] and one["best_acc"] == two["best_acc"]


def _config(task: Path, **extra):
    values = {"model": "test_vit", "weights": "random", "img_size": 32, "optim.epochs": 3,
              "optim.warmup_epochs": 1, "optim.batch_size": 4, "eval_batch_size": 8, "data.path": str(task), **extra}
    return load_config(overrides=values)


@pytest.mark.parametrize("method", ["pyra+lora", "evit+adapter"])
def test_ctrl_c_marks_the_run_interrupted_and_resume_finishes_it_exactly(vtab_task, tmp_path, monkeypatch, method):
    fail_in_epoch(monkeypatch, 2)
    with pytest.raises(KeyboardInterrupt):
        fit(_config(vtab_task, method=method), tmp_path / "run")
    state = read_state(tmp_path / "run")
    assert state.state == "interrupted" and state.epoch == 1 and "SIGTERM" in state.reason
    monkeypatch.undo()
    resume_run(tmp_path / "run")
    fit(_config(vtab_task, method=method), tmp_path / "alone")
    _same_metrics(tmp_path / "run", tmp_path / "alone")


def test_resume_refuses_finished_runs_and_empty_folders(vtab_task, tmp_path, capsys):
    fit(_config(vtab_task, **{"optim.epochs": 1}), tmp_path / "run")
    with pytest.raises(TietaError, match="finished"):
        resume_run(tmp_path / "run")
    (tmp_path / "empty").mkdir()
    assert main(["train", "--resume", str(tmp_path / "empty")]) == 2
    assert main(["train", "--resume", str(tmp_path / "run"), "--lr", "0.1"]) == 2
    assert "own settings" in capsys.readouterr().err


def test_a_run_killed_before_its_first_checkpoint_resumes_from_the_start(vtab_task, tmp_path, monkeypatch):
    fail_in_epoch(monkeypatch, 1)
    with pytest.raises(KeyboardInterrupt):
        fit(_config(vtab_task), tmp_path / "run")
    monkeypatch.undo()
    resume_run(tmp_path / "run")
    fit(_config(vtab_task), tmp_path / "alone")
    _same_metrics(tmp_path / "run", tmp_path / "alone")


def test_sigterm_stops_the_run_as_interrupted(vtab_task, tmp_path):
    run = tmp_path / "run"
    process = subprocess.Popen(_command(vtab_task, run, "lora", 5000), stdout=subprocess.DEVNULL,
                               stderr=subprocess.PIPE, text=True)
    deadline = time.monotonic() + 120
    while _epochs_done(run) < 1 and process.poll() is None and time.monotonic() < deadline:
        time.sleep(0.02)
    process.send_signal(signal.SIGTERM)  # a scheduler ending the job
    _, error = process.communicate(timeout=60)
    assert process.returncode == 130
    assert "tieta train --resume" in error and "Traceback" not in error
    state = read_state(run)
    assert state.state == "interrupted" and state.epoch >= 1
