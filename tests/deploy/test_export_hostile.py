"""tieta export under pressure: replacing an export whole or not at all (a kill at every rename, two
exports into one folder), and every part of an export checked when it is read back."""

from __future__ import annotations

import errno
import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

import tieta
from conftest import write_vtab_task
from tieta.cli import main
from tieta.deploy.export import INFO_FILE, ONNX_FILE, WEIGHTS_FILE, export_run, read_info
from tieta.errors import TietaError
from tieta.train.checkpoint import CHECKSUM_KEY, read_tensors, write_tensors
from tieta.train.config import load_config
from tieta.train.fit import fit
from tieta.train.rundir import CHECKPOINT

TINY = {"model": "test_vit", "weights": "random", "img_size": 32, "optim.epochs": 1, "optim.warmup_epochs": 0,
        "data.normalization": "imagenet",  # named, so that an export saying another name disagrees with it
        "optim.batch_size": 4, "eval_batch_size": 8, "lora.rank": 2, "adapter.dim": 2}
NEW_FILES = {WEIGHTS_FILE, INFO_FILE}
OLD_FILES = NEW_FILES | {ONNX_FILE}  # the older export was written with --onnx

# runs `tieta ARGS...` and ends the process (as a kill would) at the N-th rename of any kind
KILL_AT_RENAME = """
import os, sys
import tieta.deploy.export, tieta.files
from tieta.cli import main
calls, stop = [0], int(sys.argv[1])
def counted(real):
    def call(*args, **kwargs):
        calls[0] += 1
        if calls[0] == stop:
            os._exit(9)
        return real(*args, **kwargs)
    return call
os.rename, os.replace = counted(os.rename), counted(os.replace)
tieta.files._renameat2 = counted(tieta.files._renameat2)
sys.exit(main(sys.argv[2:]))
"""

# runs `tieta ARGS...`, pausing once the export is staged (touches READY) until GO exists
PAUSE_BEFORE_COMMIT = """
import sys, time
from pathlib import Path
import tieta.deploy.export as export
from tieta.cli import main
real = export._commit
def paused(*args, **kwargs):
    Path(sys.argv[1]).touch()
    while not Path(sys.argv[2]).exists():
        time.sleep(0.05)
    return real(*args, **kwargs)
export._commit = paused
sys.exit(main(sys.argv[3:]))
"""


@pytest.fixture(scope="module")
def runs(tmp_path_factory) -> tuple[Path, Path]:
    """Two finished runs of one task: a (LoRA) and b (LoRA + adapter)."""
    root = tmp_path_factory.mktemp("runs")
    task = write_vtab_task(root / "task")
    for name, method in (("a", "lora"), ("b", "lora+adapter")):
        fit(load_config(overrides={**TINY, "data.path": str(task), "method": method}), root / name)
    return root / "a", root / "b"


@pytest.fixture(scope="module")
def pristine(runs, tmp_path_factory) -> Path:
    """An export of run a, copied by the tests that change one."""
    return export_run(runs[0], tmp_path_factory.mktemp("pristine") / "export")["output"]


@pytest.fixture
def exported(pristine, tmp_path) -> Path:
    return Path(shutil.copytree(pristine, tmp_path / "export"))


def _source(folder: Path) -> str:
    return Path(json.loads((folder / INFO_FILE).read_text())["source_run"]).name


def _old_export(runs, folder: Path) -> Path:
    """An export of run a with a model.onnx (a stand-in: only its presence matters here)."""
    export_run(runs[0], folder)
    (folder / ONNX_FILE).write_bytes(b"the older model's graph")
    return folder


def _names(folder: Path) -> set[str]:
    return {entry.name for entry in folder.iterdir()}


def test_overwriting_with_another_run_leaves_nothing_of_the_old_export(runs, tmp_path, capsys):
    output = _old_export(runs, tmp_path / "export")
    assert main(["export", str(runs[1]), "--output", str(output), "--overwrite"]) == 0
    assert _names(output) == NEW_FILES and _source(output) == "b"  # no model.onnx of run a beside b's weights
    assert tieta.load(output)(torch.zeros(1, 3, 32, 32)).shape == (1, 3)
    assert not [entry for entry in tmp_path.iterdir() if entry.name.startswith(".")]  # the staging folder is gone


def test_overwrite_refuses_a_folder_holding_files_an_export_does_not_write(runs, tmp_path, capsys):
    output = _old_export(runs, tmp_path / "export")
    (output / "notes.txt").write_text("mine")
    assert main(["export", str(runs[1]), "--output", str(output), "--overwrite"]) == 2
    error = capsys.readouterr().err.strip()
    assert "holds notes.txt, which tieta export does not write" in error and "\n" not in error
    assert _names(output) == OLD_FILES | {"notes.txt"} and _source(output) == "a"


@pytest.mark.parametrize("make, message", [
    (lambda path: path.write_text("a file"), "not a folder"),
    (lambda path: path.symlink_to(path.parent), "is a symbolic link"),
])
def test_an_output_that_is_no_folder_is_refused(runs, tmp_path, capsys, make, message):
    make(tmp_path / "export")
    assert main(["export", str(runs[0]), "--output", str(tmp_path / "export"), "--overwrite"]) == 2
    assert message in capsys.readouterr().err


def test_every_file_and_the_folder_get_the_usual_modes(runs, tmp_path):
    previous = os.umask(0o027)
    try:
        export_run(runs[0], tmp_path / "export")
    finally:
        os.umask(previous)
    assert (tmp_path / "export").stat().st_mode & 0o777 == 0o750
    assert {(path.name, path.stat().st_mode & 0o777) for path in (tmp_path / "export").iterdir()} == \
        {(WEIGHTS_FILE, 0o640), (INFO_FILE, 0o640)}


def _tieta(script: str, *args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-c", script, *args], capture_output=True, text=True, timeout=300)


def test_a_kill_at_any_rename_leaves_the_old_export_or_the_new_one(runs, tmp_path):
    output = _old_export(runs, tmp_path / "export")
    command = ["export", str(runs[1]), "--output", str(output), "--overwrite"]
    kills = 0
    for stop in range(1, 12):
        done = _tieta(KILL_AT_RENAME, str(stop), *command)
        assert done.returncode in (0, 9), done.stderr
        if _source(output) == "a":
            assert _names(output) == OLD_FILES
        else:
            assert _names(output) == NEW_FILES and _source(output) == "b"
        tieta.load(output)  # whole, whichever it is
        if done.returncode == 0:
            break
        kills += 1
    assert done.returncode == 0 and _source(output) == "b"
    assert kills >= 3  # the weights, the description, and the exchange of the folders


def test_of_two_exports_into_one_new_folder_the_second_to_finish_is_refused(runs, tmp_path, capsys):
    output, ready, go = tmp_path / "export", tmp_path / "ready", tmp_path / "go"
    first = subprocess.Popen([sys.executable, "-c", PAUSE_BEFORE_COMMIT, str(ready), str(go), "export",
                              str(runs[0]), "--output", str(output)], stderr=subprocess.PIPE, text=True)
    try:
        deadline = time.monotonic() + 240
        while not ready.exists():  # the first export is staged, not yet in place
            assert first.poll() is None and time.monotonic() < deadline, first.stderr.read() if first.stderr else ""
            time.sleep(0.1)
        assert main(["export", str(runs[1]), "--output", str(output)]) == 0
    finally:
        go.touch()
        _, error = first.communicate(timeout=240)
    assert first.returncode == 2
    assert error.strip() == (f"tieta: error: {output} was written by another process while this export ran; "
                             "nothing was replaced")
    assert _names(output) == NEW_FILES and _source(output) == "b"
    assert not [entry for entry in tmp_path.iterdir() if entry.name.startswith(".")]


def test_a_folder_that_appears_at_the_last_instant_is_the_same_refusal(runs, tmp_path, monkeypatch, capsys):
    def lost(source, target):  # another process's folder came between the check and the move
        raise FileExistsError(errno.EEXIST, "exists", str(target))

    monkeypatch.setattr("tieta.deploy.export.move_folder", lost)
    assert main(["export", str(runs[0]), "--output", str(tmp_path / "export")]) == 2
    assert "was written by another process while this export ran; nothing was replaced" in capsys.readouterr().err
    assert not list(tmp_path.iterdir())  # the staged export is gone too


def _edit_info(folder: Path, change) -> None:
    info = json.loads((folder / INFO_FILE).read_text())
    change(info)
    (folder / INFO_FILE).write_text(json.dumps(info))


def _set(**values):
    """A change of tieta_export.json's own entries (not its settings)."""
    return lambda info: info.update(values)


@pytest.mark.parametrize("change, message", [
    (_set(num_classes=3.7), "gives num_classes as 3.7; tieta export writes a whole number"),
    (_set(num_classes=True), "gives num_classes as true"),
    (_set(num_classes="3"), 'gives num_classes as "3"'),
    (_set(img_size=10**12), "gives img_size as 1000000000000; tieta export writes a whole number from 1 to 4,096"),
    (_set(img_size=0), "gives img_size as 0"),
    (_set(class_names=["one"]), "names 1 classes but its model has 3"),
    (_set(class_names=["a", 2, "c"]), "gives class_names as a list; tieta export writes a list of names"),
    (_set(format="1"), "is not what tieta export writes"),
    (_set(format=0), "is not what tieta export writes"),
    (_set(config=[1, 2]), "gives config as a list"),
    (_set(method=7), "gives method as 7; tieta export writes a name"),
    (_set(model="test_vit3"), 'disagrees with itself: it gives model "test_vit3" but its settings give "test_vit"'),
    (_set(method="lora+adapter"), 'it gives method "lora+adapter" but its settings give "lora"'),
    (_set(normalization="inception"), 'it gives normalization "inception" but its settings give "imagenet"'),
    (_set(img_size=64), "it gives img_size 64 but its settings give 32"),
    (lambda info: info["config"].update(optim=5), "holds settings tieta cannot use"),
    (lambda info: info.pop("config"), "lacks what tieta needs"),
])
def test_what_an_export_says_is_checked(exported, change, message):
    _edit_info(exported, change)
    with pytest.raises(TietaError) as refused:
        tieta.load(exported)
    assert message in str(refused.value) and "\n" not in str(refused.value)


def test_deeply_nested_or_huge_export_descriptions_are_one_sentence(exported, capsys):
    (exported / INFO_FILE).write_text('{"format": 1, "config": ' + "[" * 100_000 + "]" * 100_000 + "}")
    assert main(["predict", str(exported), str(exported)]) == 2
    assert "nests more than 32 levels deep" in capsys.readouterr().err
    os.truncate(exported / INFO_FILE, 0)
    os.truncate(exported / INFO_FILE, (16 << 20) + 1)
    with pytest.raises(TietaError, match="more than the 16,777,216 tieta reads"):
        read_info(exported)


def test_an_input_size_the_model_does_not_take_is_refused(exported):
    _edit_info(exported, lambda info: info["config"].update(img_size=None))  # the model's own: 160
    with pytest.raises(TietaError, match="gives img_size 32 but the model it describes takes 160"):
        tieta.load(exported)


def test_a_listed_method_whose_tensors_are_absent_is_refused(exported):
    _edit_info(exported, lambda info: info.update(method="lora+adapter") or info["config"].update(method="lora+adapter"))
    with pytest.raises(TietaError, match=r"does not fit the model it describes: it lacks blocks\.0\.adapter"):
        tieta.load(exported)


@pytest.mark.parametrize("dtype", [torch.float16, torch.int32])
def test_tensors_of_another_type_are_refused(exported, dtype):
    tensors, metadata = read_tensors(exported / WEIGHTS_FILE)
    tensors["head.weight"] = tensors["head.weight"].to(dtype)
    write_tensors(tensors, exported / WEIGHTS_FILE, {k: v for k, v in metadata.items() if k != CHECKSUM_KEY})
    with pytest.raises(TietaError, match=f"has head.weight as {dtype} where the model's is torch.float32"):
        tieta.load(exported)


def _drop_checksum(path: Path) -> None:
    """Rewrite a safetensors file with safetensors' own writer, its checksum entry left out."""
    tensors, metadata = read_tensors(path)
    save_file(load_file(path), str(path), metadata={k: v for k, v in metadata.items() if k != CHECKSUM_KEY})


def test_an_export_without_its_checksum_is_refused_until_one_is_written(exported, capsys):
    _drop_checksum(exported / WEIGHTS_FILE)
    with pytest.raises(TietaError, match="has no checksum"):
        tieta.load(exported)
    assert main(["predict", str(exported), str(exported)]) == 2
    assert f"tieta checksum --write {exported / WEIGHTS_FILE}" in capsys.readouterr().err
    assert main(["checksum", "--write", str(exported / WEIGHTS_FILE)]) == 0
    assert tieta.load(exported)(torch.zeros(1, 3, 32, 32)).shape == (1, 3)


def test_a_run_without_its_checksum_is_refused_by_eval_until_one_is_written(runs, tmp_path, capsys):
    run = Path(shutil.copytree(runs[0], tmp_path / "run"))
    _drop_checksum(run / CHECKPOINT)
    assert main(["eval", str(run)]) == 2
    assert "has no checksum" in capsys.readouterr().err
    assert main(["checksum", "--write", str(run / CHECKPOINT)]) == 0
    assert main(["eval", str(run)]) == 0
