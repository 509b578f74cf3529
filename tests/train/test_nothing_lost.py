"""Nothing the user had is lost: writers against planted links and files, a real full disk, a
replacement killed at every rename, a resume of a changed run, checkpoints edited by hand."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import threading
from pathlib import Path

import pytest
import torch
import yaml
from safetensors import safe_open
from safetensors.torch import load_file, save_file

from conftest import fail_in_epoch, fill_disk, write_vtab_task
from tieta import TietaError
from tieta import files as files_module
from tieta.cli import main
from tieta.train.checkpoint import checksum
from tieta.train.config import load_config
from tieta.train.fit import fit, resume_run
from tieta.train.rundir import read_state


def _config(task: Path, **extra):
    values = {"model": "test_vit", "weights": "random", "img_size": 32, "optim.epochs": 2, "optim.warmup_epochs": 1,
              "optim.batch_size": 4, "eval_batch_size": 8, "data.path": str(task), **extra}
    return load_config(overrides=values)


def _interrupted_run(task: Path, folder: Path, monkeypatch, epochs: int = 3, stop_in: int = 3) -> None:
    fail_in_epoch(monkeypatch, stop_in, KeyboardInterrupt())
    with pytest.raises(KeyboardInterrupt):
        fit(_config(task, **{"optim.epochs": epochs}), folder)
    monkeypatch.undo()


def _metrics(folder: Path) -> list[dict]:
    """The metric records, without the timing (which differs between two equal runs)."""
    records = [json.loads(line) for line in (folder / "metrics.jsonl").read_text().splitlines()]
    return [{k: v for k, v in record.items() if k != "train_images_per_s"} for record in records]


# --- resume: the checkpoint's own record, and a changed run refused -------------------------------

def test_an_unreadable_metrics_line_loses_no_epoch_on_resume(vtab_task, tmp_path, monkeypatch):
    whole = tmp_path / "whole"
    fit(_config(vtab_task, **{"optim.epochs": 3}), whole)
    run = tmp_path / "run"
    _interrupted_run(vtab_task, run, monkeypatch)
    lines = (run / "metrics.jsonl").read_text().splitlines()
    assert len(lines) == 2
    (run / "metrics.jsonl").write_text("{torn\n" + lines[1] + "\n")  # epoch 1's line unreadable, epoch 2's fine
    resume_run(run)
    assert _metrics(run) == _metrics(whole)


@pytest.mark.parametrize("key, value", [("optim.lr", 0.002), ("optim.epochs", 4), ("seed", 1),
                                        ("data.train_split", "train800")])
def test_a_config_edited_between_the_kill_and_the_resume_is_refused(vtab_task, tmp_path, monkeypatch, key, value):
    run = tmp_path / "run"
    _interrupted_run(vtab_task, run, monkeypatch)
    config = run / "config.yaml"
    settings = yaml.safe_load(config.read_text())
    *parents, last = key.split(".")
    place = settings
    for parent in parents:
        place = place[parent]
    place[last] = value
    config.write_text(yaml.safe_dump(settings, sort_keys=False))
    before = {p.name: p.read_bytes() for p in run.iterdir() if p.is_file()}
    with pytest.raises(TietaError, match=f"changed since the run started \\({key} "):
        resume_run(run)
    assert {p.name: p.read_bytes() for p in run.iterdir() if p.is_file()} == before


def test_a_task_folder_changed_before_the_resume_is_refused(tmp_path, monkeypatch, capsys):
    task = write_vtab_task(tmp_path / "task", num_classes=3)
    run = tmp_path / "run"
    _interrupted_run(task, run, monkeypatch)
    shutil.rmtree(task)
    write_vtab_task(task, num_classes=4)  # the same folder, now with 4 classes
    assert main(["train", "--resume", str(run)]) == 2
    error = capsys.readouterr().err
    assert "changed since the run started" in error and "3 classes" in error and "4 classes" in error
    assert read_state(run).state == "interrupted"


# --- checkpoints edited by hand ------------------------------------------------------------------

def _rewrite(path: Path, change_tensors=None, change_metadata=None, recompute: bool = True) -> None:
    tensors = load_file(path)
    with safe_open(str(path), "pt") as handle:
        metadata = handle.metadata()
    tensors = change_tensors(tensors) if change_tensors else tensors
    metadata = change_metadata(metadata) if change_metadata else metadata
    if recompute:
        metadata["tieta_sha256"] = checksum(tensors, metadata)
    save_file(tensors, str(path), metadata=metadata)


def test_edited_checkpoints_are_refused_whatever_was_changed(vtab_task, tmp_path, capsys):
    run = tmp_path / "run"
    fit(_config(vtab_task), run)
    path = run / "checkpoint.safetensors"
    original = path.read_bytes()

    def without_checksum(metadata):
        return {k: v for k, v in metadata.items() if k != "tieta_sha256"}

    _rewrite(path, lambda t: {k: v * 0 for k, v in t.items()}, without_checksum, recompute=False)
    assert main(["eval", str(run)]) == 2
    assert "has no checksum" in capsys.readouterr().err  # an edited tensor is no longer accepted
    for kind in (torch.float16, torch.int32):
        path.write_bytes(original)
        _rewrite(path, lambda t: {k: v.to(kind) for k, v in t.items()})  # checksum made to match
        assert main(["eval", str(run)]) == 2
        assert f"is {kind} in the checkpoint but torch.float32 here" in capsys.readouterr().err
    for classes in ("3.7", "-1", "3" * 40, "٣"):
        path.write_bytes(original)
        _rewrite(path, change_metadata=lambda m: {**m, "num_classes": classes})
        assert main(["eval", str(run)]) == 2
        assert "run settings" in capsys.readouterr().err
    path.write_bytes(original)
    _rewrite(path, change_metadata=lambda m: {**m, "tieta_config": "[" * 100_000 + "]" * 100_000})
    assert main(["eval", str(run)]) == 2
    assert "levels deep" in capsys.readouterr().err
    path.write_bytes(original)
    assert main(["eval", str(run)]) == 0


def test_tieta_checksum_adds_one_only_where_there_is_none(vtab_task, tmp_path, capsys):
    run = tmp_path / "run"
    fit(_config(vtab_task), run)
    path = run / "checkpoint.safetensors"
    assert main(["checksum", str(path)]) == 0 and "verified" in capsys.readouterr().out
    _rewrite(path, change_metadata=lambda m: {k: v for k, v in m.items() if k != "tieta_sha256"}, recompute=False)
    assert main(["checksum", str(path)]) == 2
    assert main(["checksum", "--write", str(path)]) == 0 and "added" in capsys.readouterr().out
    assert main(["eval", str(run)]) == 0
    data = bytearray(path.read_bytes())
    data[-3] ^= 1
    path.write_bytes(bytes(data))
    assert main(["checksum", "--write", str(path)]) == 2  # a mismatch is never re-signed
    assert "does not match its checksum" in capsys.readouterr().err


# --- a replacement killed at every rename ---------------------------------------------------------

def _seed_of_everything(folder: Path) -> set:
    """The seeds that the run files in ``folder`` were written with (one run: one seed)."""
    seeds = set()
    config = folder / "config.yaml"
    if config.is_file():
        seeds.add(int(next(l for l in config.read_text().splitlines() if l.startswith("seed:")).split()[1]))
    for name, key in (("checkpoint.safetensors", "tieta_config"), ("progress.safetensors", "settings")):
        if (folder / name).is_file():
            with safe_open(str(folder / name), "pt") as handle:
                seeds.add(json.loads(handle.metadata()[key])["seed"])
    if (folder / "summary.json").is_file():
        seeds.add("finished")
    return seeds


def test_an_overwrite_killed_at_any_rename_leaves_the_old_run_or_the_new_one(vtab_task, tmp_path, monkeypatch):
    run = tmp_path / "sweep" / "run"
    fit(_config(vtab_task, seed=0), run)
    (run / "notes.txt").write_text("the user's own file")
    snapshots: list[Path] = []

    def snapshot() -> None:  # what a kill at this instant leaves on disk
        target = tmp_path / "snapshots" / str(len(snapshots))
        shutil.copytree(tmp_path / "sweep", target, symlinks=True, ignore=shutil.ignore_patterns(".lock"))
        snapshots.append(target)

    def around(real):
        def renaming(*args, **kwargs):
            snapshot()
            try:
                return real(*args, **kwargs)
            finally:
                snapshot()
        return renaming

    monkeypatch.setattr(files_module.os, "replace", around(os.replace))
    monkeypatch.setattr(files_module.os, "rename", around(os.rename))
    monkeypatch.setattr(files_module, "_renameat2", around(files_module._renameat2))
    fit(_config(vtab_task, seed=1), run, overwrite=True)
    monkeypatch.undo()
    assert len(snapshots) > 10
    kinds = []
    for snap in snapshots:
        seeds = _seed_of_everything(snap / "run")
        assert seeds in ({0, "finished"}, {1}, {1, "finished"}), (snap, seeds)  # never a mix
        assert (snap / "run" / "notes.txt").read_text() == "the user's own file"
        kinds.append(0 if 0 in seeds else 1)
    assert kinds == sorted(kinds) and kinds[0] == 0 and kinds[-1] == 1  # old until the swap, new after
    assert sorted(p.name for p in (tmp_path / "sweep").iterdir()) == ["run"]  # no staging folder left


# --- writers: planted links and files, two at once ------------------------------------------------

def test_planted_links_in_a_run_folder_are_never_written_through(vtab_task, tmp_path):
    victim = tmp_path / "victim.txt"
    victim.write_text("precious")
    run = tmp_path / "run"
    run.mkdir()
    for name in ("state.json.partial", "config.yaml.partial", "metrics.jsonl.partial"):  # the old fixed names
        (run / name).symlink_to(victim)
    fit(_config(vtab_task), run, overwrite=True)
    assert victim.read_text() == "precious" and read_state(run).state == "finished"
    (run / "metrics.jsonl").unlink()
    (run / "metrics.jsonl").symlink_to(victim)  # replaced: the link goes with the old run, the file it names stays
    fit(_config(vtab_task), run, overwrite=True)
    assert victim.read_text() == "precious" and not (run / "metrics.jsonl").is_symlink()


def test_a_link_planted_in_a_run_folder_before_its_resume_is_refused(vtab_task, tmp_path, monkeypatch):
    victim = tmp_path / "victim.txt"
    victim.write_text("precious")
    run = tmp_path / "run"
    _interrupted_run(vtab_task, run, monkeypatch)
    (run / "metrics.jsonl").unlink()
    (run / "metrics.jsonl").symlink_to(victim)
    with pytest.raises(TietaError, match="symbolic link"):
        resume_run(run)
    assert victim.read_text() == "precious"


def test_two_writers_of_one_file_do_not_collide(tmp_path):
    target, errors = tmp_path / "report.md", []

    def write(text: str) -> None:
        try:
            for _ in range(200):
                files_module.write_file(target, text)
        except Exception as error:  # noqa: BLE001 - any error is the failure
            errors.append(error)

    threads = [threading.Thread(target=write, args=(text * 1000,)) for text in "ab"]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert not errors and target.read_text() in ("a" * 1000, "b" * 1000)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["report.md"]


# --- a real full disk -----------------------------------------------------------------------------

def test_a_real_full_disk_mid_run_is_one_sentence_and_the_run_resumes(small_disk, vtab_task, monkeypatch):
    run = small_disk / "run"
    from tieta.train import fit as fit_module

    real, calls = fit_module.train_one_epoch, []

    def fill_after_the_first_epoch(*args, **kwargs):
        calls.append(1)
        if len(calls) == 2:
            fill_disk(small_disk)
        return real(*args, **kwargs)

    monkeypatch.setattr(fit_module, "train_one_epoch", fill_after_the_first_epoch)
    code = main(["train", "--model", "test_vit", "--weights", "random", "--img-size", "32", "--epochs", "3",
                 "--warmup-epochs", "1", "--batch-size", "4", "--data", str(vtab_task), "--output", str(run)])
    monkeypatch.undo()
    assert code == 2
    state = read_state(run)
    assert state.state == "failed" and "No space left on device" in state.reason, state
    with safe_open(str(run / "progress.safetensors"), "pt") as handle:
        assert handle.metadata()["epoch"] == "1"  # the previous epoch's checkpoint, intact
    assert not [p for p in run.iterdir() if "partial" in p.name]
    (small_disk / "filler.bin").unlink()
    resume_run(run)
    assert read_state(run).state == "finished"


def test_a_real_full_disk_during_export_keeps_the_previous_export(small_disk, vtab_task, tmp_path, capsys):
    run = tmp_path / "run"
    fit(_config(vtab_task), run)
    export = small_disk / "export"
    assert main(["export", str(run), "--output", str(export)]) == 0
    before = {p.name: p.read_bytes() for p in export.iterdir()}
    fill_disk(small_disk)
    assert main(["export", str(run), "--output", str(export), "--overwrite"]) == 2
    error = capsys.readouterr().err.strip()
    assert error.startswith("tieta: error:") and "No space left on device" in error and "\n" not in error
    assert {p.name: p.read_bytes() for p in export.iterdir()} == before
    assert sorted(p.name for p in small_disk.iterdir()) == ["export", "filler.bin"]


def test_an_ascii_locale_prints_what_it_cannot_encode_as_question_marks(tmp_path):
    script = "from tieta.cli import _tolerate_any_locale; _tolerate_any_locale(); print('92.5 ± 0.3 · lora')"
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True,
                          env={**os.environ, "PYTHONIOENCODING": "ascii"})
    assert done.returncode == 0 and done.stdout.strip() == "92.5 ? 0.3 ? lora", done.stderr
