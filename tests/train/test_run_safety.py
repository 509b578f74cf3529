"""Run folders that never lose results: --overwrite, the lock, divergence, a full disk, a read-only
folder, tampered checkpoints."""

from __future__ import annotations

import errno
import json
import subprocess
import sys
from pathlib import Path

import pytest
from safetensors import safe_open
from safetensors.torch import load_file, save_file

from conftest import fail_in_epoch
from tieta import TietaError
from tieta.cli import main
from tieta import files as files_module
from tieta.train import checkpoint as checkpoint_module
from tieta.train import fit as fit_module
from tieta.train import rundir as rundir_module
from tieta.train.config import load_config
from tieta.train.fit import evaluate_checkpoint, fit
from tieta.train.loop import Diverged
from tieta.train.rundir import RunDir, read_state

TINY = ["--model", "test_vit", "--weights", "random", "--img-size", "32", "--epochs", "2", "--warmup-epochs", "1",
        "--batch-size", "4", "--set", "eval_batch_size=8"]


def _config(task: Path, **extra):
    values = {"model": "test_vit", "weights": "random", "img_size": 32, "optim.epochs": 2, "optim.warmup_epochs": 1,
              "optim.batch_size": 4, "eval_batch_size": 8, "data.path": str(task), **extra}
    return load_config(overrides=values)


def _contents(folder: Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in folder.iterdir() if p.is_file() and p.name != ".lock"}


def test_overwrite_keeps_the_old_run_until_the_new_one_has_checkpointed(vtab_task, tmp_path, monkeypatch):
    run = tmp_path / "run"
    fit(_config(vtab_task), run)
    before = _contents(run)
    # a setting that fails: refused before anything is written
    assert main(["train", *TINY, "--data", str(vtab_task), "--output", str(run), "--overwrite",
                 "--set", "optim.clip_grad=abc"]) == 2
    assert _contents(run) == before
    # a run that fails in its first epoch: the old run is untouched
    fail_in_epoch(monkeypatch, 1, RuntimeError("boom"))
    with pytest.raises(RuntimeError):
        fit(_config(vtab_task, method="tome+lora"), run, overwrite=True)
    assert _contents(run) == before and not (run / ".incoming").exists()
    monkeypatch.undo()
    # a replacement that got past its first epoch: only the new run's files
    fit(_config(vtab_task, method="tome+lora"), run, overwrite=True)
    assert read_state(run).state == "finished"
    assert json.loads((run / "summary.json").read_text())["method"] == "tome+lora"
    assert "tome" in (run / "config.yaml").read_text()


def test_overwrite_replaces_only_tietas_files(vtab_task, tmp_path):
    run = tmp_path / "run"
    fit(_config(vtab_task), run)
    (run / "notes.txt").write_text("mine")
    fit(_config(vtab_task), run, overwrite=True)
    assert (run / "notes.txt").read_text() == "mine"


def test_a_second_process_is_kept_out_of_a_run_folder(vtab_task, tmp_path, capsys):
    holder = RunDir(tmp_path / "run")
    holder.open()  # another tieta process training into it
    try:
        assert main(["train", *TINY, "--data", str(vtab_task), "--output", str(tmp_path / "run")]) == 2
        assert "in use by another tieta process" in capsys.readouterr().err
        with pytest.raises(TietaError, match="in use"):
            fit(_config(vtab_task), tmp_path / "run", overwrite=True)
    finally:
        holder.close()
    fit(_config(vtab_task), tmp_path / "run", overwrite=True)  # free again


def test_divergence_is_a_failed_run_with_one_sentence(vtab_task, tmp_path, capsys, monkeypatch):
    run = tmp_path / "run"
    real = fit_module.training_objective  # a learning rate that diverges is refused now: a loss that does

    def diverging(config):
        loss_fn = real(config)
        return lambda model, images, labels: loss_fn(model, images, labels) * float("inf")

    monkeypatch.setattr(fit_module, "training_objective", diverging)
    code = main(["train", *TINY, "--epochs", "4", "--data", str(vtab_task), "--output", str(run)])
    assert code == 2
    error = capsys.readouterr().err.strip()
    assert error.startswith("tieta: error: training diverged") and "\n" not in error
    state = read_state(run)
    assert state.state == "failed" and "diverged" in state.reason
    assert not (run / "summary.json").exists()


def test_divergence_keeps_the_last_good_checkpoint_and_valid_metrics(vtab_task, tmp_path, monkeypatch):
    run, steps = tmp_path / "run", []
    real = fit_module.training_objective

    def objective(config):
        loss_fn = real(config)

        def nan_in_epoch_2(model, images, labels):
            steps.append(1)
            loss = loss_fn(model, images, labels)
            return loss * float("nan") if len(steps) == 5 else loss  # 3 steps an epoch

        return nan_in_epoch_2

    monkeypatch.setattr(fit_module, "training_objective", objective)
    with pytest.raises(Diverged, match="epoch 2"):
        fit(_config(vtab_task, **{"optim.epochs": 3}), run)
    lines = (run / "metrics.jsonl").read_text().splitlines()
    assert [json.loads(line)["epoch"] for line in lines] == [1]
    with safe_open(str(run / "progress.safetensors"), "pt") as handle:
        assert handle.metadata()["epoch"] == "1"
    tensors = load_file(run / "progress.safetensors")
    assert all(t.float().isfinite().all() for name, t in tensors.items() if name.startswith("model."))
    assert read_state(run).state == "failed"


def test_metrics_lines_are_strict_json(tmp_path):
    run = RunDir(tmp_path / "run")
    run.open()
    run.log({"epoch": 1, "loss": float("nan"), "acc": float("inf"), "nested": [float("-inf"), 1.0]})
    run.close()
    line = (tmp_path / "run" / "metrics.jsonl").read_text()
    assert json.loads(line) == {"epoch": 1, "loss": None, "acc": None, "nested": [None, 1.0]}


def test_a_full_disk_leaves_the_previous_checkpoint_intact(vtab_task, tmp_path, monkeypatch):
    run = tmp_path / "run"
    real_write, real_fsync, calls = checkpoint_module.write_file, files_module.os.fsync, []

    def full_disk(handle):
        raise OSError(errno.ENOSPC, "No space left on device")

    def write_on_a_full_disk(path, data):
        calls.append(path)
        if len(calls) != 2:
            return real_write(path, data)
        monkeypatch.setattr(files_module.os, "fsync", full_disk)  # the second epoch's checkpoint fails
        try:
            return real_write(path, data)
        finally:
            monkeypatch.setattr(files_module.os, "fsync", real_fsync)

    monkeypatch.setattr(checkpoint_module, "write_file", write_on_a_full_disk)
    with pytest.raises(TietaError, match="No space left on device.*previous one is intact"):
        fit(_config(vtab_task, **{"optim.epochs": 3}), run)
    with safe_open(str(run / "progress.safetensors"), "pt") as handle:
        assert handle.metadata()["epoch"] == "1"
    assert not [p for p in run.iterdir() if "partial" in p.name]
    assert read_state(run).state == "failed"
    monkeypatch.undo()
    fit_module.resume_run(run)  # once there is room again
    assert read_state(run).state == "finished"


def test_a_read_only_folder_is_refused_before_data_and_model_are_loaded(vtab_task, tmp_path, monkeypatch):
    monkeypatch.setattr(rundir_module.os, "access", lambda path, mode: False)  # tests may run as root
    monkeypatch.setattr(fit_module, "open_task", lambda path: pytest.fail("the data was loaded first"))
    with pytest.raises(TietaError, match="permission denied"):
        fit(_config(vtab_task), tmp_path / "run")
    assert not (tmp_path / "run").exists()


def test_too_little_disk_is_refused_before_training(vtab_task, tmp_path, monkeypatch):
    monkeypatch.setattr(rundir_module.shutil, "disk_usage", lambda path: type("Usage", (), {"free": 1000})())
    with pytest.raises(TietaError, match="MiB free"):
        fit(_config(vtab_task), tmp_path / "run")
    assert not (tmp_path / "run").exists()


def test_tampered_checkpoints_are_refused(vtab_task, tmp_path, capsys):
    run = tmp_path / "run"
    fit(_config(vtab_task), run)
    path = run / "checkpoint.safetensors"
    original = path.read_bytes()
    flipped = bytearray(original)
    flipped[-3] ^= 0x40  # one bit of one tensor
    path.write_bytes(bytes(flipped))
    assert main(["eval", str(run)]) == 2
    assert "does not match its checksum" in capsys.readouterr().err
    path.write_bytes(original[: len(original) // 2])  # truncated
    assert main(["eval", str(run)]) == 2
    assert "not a readable safetensors checkpoint" in capsys.readouterr().err
    path.write_bytes(original)
    tensors = load_file(path)
    with safe_open(str(path), "pt") as handle:
        metadata = handle.metadata()
    for key, value in (("tieta_config", "{not json"), ("num_classes", "abc")):
        save_file(tensors, str(path), metadata={**metadata, key: value, "tieta_sha256": "0"})
        with pytest.raises(TietaError):
            evaluate_checkpoint(run)
        broken = {k: v for k, v in {**metadata, key: value}.items() if k != "tieta_sha256"}
        save_file(tensors, str(path), metadata=broken)  # no checksum: refused, whatever it holds
        assert main(["eval", str(run)]) == 2
        assert "has no checksum" in capsys.readouterr().err
        assert main(["checksum", "--write", str(path)]) == 0  # a file the user trusts gets one
        assert main(["eval", str(run)]) == 2  # and then its metadata is read, and refused
        assert "run settings" in capsys.readouterr().err


def test_a_bad_image_read_in_a_loader_worker_is_one_sentence(vtab_task, tmp_path, capsys):
    (vtab_task / "images" / "train" / "000003.jpg").write_bytes(b"garbage")
    code = main(["train", *TINY, "--data", str(vtab_task), "--output", str(tmp_path / "run"),
                 "--set", "data.cache=false", "--set", "data.num_workers=1"])
    error = capsys.readouterr().err.strip()
    assert code == 2 and error.startswith("tieta: error: cannot read image") and "\n" not in error
    assert read_state(tmp_path / "run").reason.startswith("cannot read image")


def test_a_tampered_progress_checkpoint_is_refused_on_resume(vtab_task, tmp_path, monkeypatch, capsys):
    run = tmp_path / "run"
    fail_in_epoch(monkeypatch, 2, KeyboardInterrupt())
    with pytest.raises(KeyboardInterrupt):
        fit(_config(vtab_task), run)
    monkeypatch.undo()
    progress = run / "progress.safetensors"
    flipped = bytearray(progress.read_bytes())
    flipped[-5] ^= 0x01
    progress.write_bytes(bytes(flipped))
    assert main(["train", "--resume", str(run)]) == 2
    assert "does not match its checksum" in capsys.readouterr().err
    assert read_state(run).state == "failed"


def test_a_run_that_finished_into_the_folder_meanwhile_is_not_written_over(vtab_task, tmp_path):
    late = RunDir(tmp_path / "run")  # checked while the folder was still empty ...
    fit(_config(vtab_task), tmp_path / "run")  # ... then another process trained into it
    before = _contents(tmp_path / "run")
    with pytest.raises(TietaError, match="already exists"):
        late.open()
    assert _contents(tmp_path / "run") == before


def test_two_trainings_started_into_one_new_folder_do_not_mix(vtab_task, tmp_path):
    command = [sys.executable, "-m", "tieta", "train", *TINY, "--epochs", "3", "--data", str(vtab_task),
               "--output", str(tmp_path / "run")]
    processes = [subprocess.Popen(command, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
                 for _ in range(2)]
    results = [(process.wait(timeout=300), process.stderr.read()) for process in processes]
    codes = sorted(code for code, _ in results)
    assert codes == [0, 2], results
    refused = next(error for code, error in results if code == 2)
    assert "in use by another tieta process" in refused or "already exists" in refused
    epochs = [json.loads(line)["epoch"] for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    assert epochs == [1, 2, 3]


def test_a_lock_file_linked_elsewhere_is_not_followed(vtab_task, tmp_path):
    victim = tmp_path / "victim.txt"
    victim.write_text("precious")
    (tmp_path / "run").mkdir()
    (tmp_path / "run" / ".lock").symlink_to(victim)
    with pytest.raises(TietaError, match="cannot create the run folder"):
        fit(_config(vtab_task), tmp_path / "run")
    assert victim.read_text() == "precious"
