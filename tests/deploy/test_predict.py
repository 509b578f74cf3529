"""tieta predict: new images classified with a run or an export; bad files skipped and counted."""

from __future__ import annotations

import csv
import os
import shutil
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from tieta.cli import main
from tieta.deploy.export import export_run
from tieta.deploy.predict import open_predictor, predict, shown_path
from tieta.train.config import load_config
from tieta.train.fit import fit

CLASSES = ("cracked", "intact", "soiled")


def _image_folder_task(root: Path) -> Path:
    """An image-folder task whose classes have names (and differ by colour)."""
    rng = np.random.default_rng(0)
    for split, count in (("train", 4), ("test", 2)):
        for label, name in enumerate(CLASSES):
            (root / split / name).mkdir(parents=True)
            for index in range(count):
                pixels = rng.integers(0, 60, size=(20, 20, 3), dtype=np.uint8)
                pixels[..., label] += 150
                Image.fromarray(pixels).save(root / split / name / f"{index}.png")
    return root


@pytest.fixture(scope="module")
def trained(tmp_path_factory) -> tuple[Path, Path, Path]:
    root = tmp_path_factory.mktemp("predict")
    task = _image_folder_task(root / "task")
    config = load_config(overrides={"model": "test_vit", "weights": "random", "img_size": 64, "optim.epochs": 3,
                                    "optim.warmup_epochs": 0, "optim.lr": 1e-2, "optim.batch_size": 4,
                                    "data.path": str(task), "method": "tome+lora", "merge.schedule": 1})
    fit(config, root / "run")
    export_run(root / "run", root / "export")
    return task, root / "run", root / "export"


def test_a_run_and_its_export_predict_the_same_with_class_names(trained):
    task, run, export = trained
    images = [task / "test"]
    from_run = predict(open_predictor(run), images, top_k=2, device="cpu")
    from_export = predict(open_predictor(export), images, top_k=2, device="cpu")
    assert len(from_run.rows) == 6 and not from_run.skipped
    for (path_a, top_a), (path_b, top_b) in zip(from_run.rows, from_export.rows):
        assert path_a == path_b and [name for name, _ in top_a] == [name for name, _ in top_b]
        assert [p for _, p in top_a] == pytest.approx([p for _, p in top_b], abs=1e-5)
    assert {name for _, top in from_run.rows for name, _ in top} <= set(CLASSES)
    correct = sum(top[0][0] == path.parent.name for path, top in from_run.rows)
    assert correct >= 4  # the colours are learnable


def test_bad_files_are_reported_skipped_and_counted(trained, tmp_path, capsys):
    task, run, _ = trained
    (tmp_path / "broken.jpg").write_bytes(b"not an image")
    (tmp_path / "half.png").write_bytes((task / "test" / "intact" / "0.png").read_bytes()[:60])
    code = main(["predict", str(run), str(task / "test" / "intact"), str(tmp_path / "broken.jpg"),
                 str(tmp_path / "half.png"), str(tmp_path / "missing.jpg"), "--top-k", "9"])
    captured = capsys.readouterr()
    assert code == 0
    assert captured.err.count("tieta: skipped") == 3
    assert "classified 2 images, skipped 3" in captured.err
    assert captured.out.count(".png") == 2 and "intact" in captured.out


def test_csv_output_with_top_k(trained, tmp_path, capsys):
    task, _, export = trained
    output = tmp_path / "preds.csv"
    assert main(["predict", str(export), str(task / "test"), "--top-k", "2", "--output", str(output)]) == 0
    rows = list(csv.DictReader(output.open()))
    assert len(rows) == 6 and set(rows[0]) == {"image", "class_1", "probability_1", "class_2", "probability_2"}
    assert all(float(row["probability_1"]) >= float(row["probability_2"]) for row in rows)
    assert main(["predict", str(export), str(task / "test"), "--output", str(output)]) == 2  # kept
    assert "--overwrite" in capsys.readouterr().err


@pytest.mark.parametrize("args, message", [
    (["nowhere", "x.png"], "does not exist"),
    (["{run}", "{tmp}/empty"], "no image files to classify"),
    (["{run}", "{task}/test", "--top-k", "0"], "must be at least 1"),
    (["{run}", "{task}/test", "--batch-size", "-1"], "must be at least 1"),
    (["{run}", "{task}/test", "--device", "cuda:9"], "cuda"),
    (["{task}", "{task}/test"], "holds no tieta run"),  # a task folder is not a run
    (["{run}", "{tmp}/broken.jpg"], "no image could be read (1 tried"),
])
def test_bad_arguments_are_one_sentence(trained, tmp_path, capsys, args, message):
    task, run, _ = trained
    (tmp_path / "empty").mkdir()
    (tmp_path / "broken.jpg").write_bytes(b"not an image")
    args = [a.format(run=run, tmp=tmp_path, task=task) for a in args]
    try:
        code = main(["predict", *args])
    except SystemExit as usage_error:  # argparse's own usage errors
        code = usage_error.code
    assert code == 2
    error = capsys.readouterr().err.strip().splitlines()[-1]
    assert "error" in error and message in error and "Traceback" not in error


def test_csv_output_never_writes_through_a_link_nor_touches_a_partial_file(trained, tmp_path, capsys):
    task, _, export = trained
    target, output = tmp_path / "elsewhere.txt", tmp_path / "p.csv"
    target.write_text("someone else's file")
    output.symlink_to(target)
    args = ["predict", str(export), str(task / "test" / "intact"), "--output", str(output), "--overwrite"]
    assert main(args) == 2
    assert "symbolic link" in capsys.readouterr().err
    assert target.read_text() == "someone else's file" and output.is_symlink()
    output.unlink()
    (tmp_path / "p.csv.partial").write_text("the user's own")
    assert main(args) == 0
    assert (tmp_path / "p.csv.partial").read_text() == "the user's own"
    assert len(list(csv.DictReader(output.open()))) == 2
    assert sorted(path.name for path in tmp_path.iterdir()) == ["elsewhere.txt", "p.csv", "p.csv.partial"]


def test_a_file_name_that_is_not_utf8_is_written_with_its_bytes_escaped(trained, tmp_path):
    task, _, export = trained
    folder = tmp_path / "images"
    folder.mkdir()
    odd = os.fsdecode(os.fsencode(folder) + b"/\xff caf\xc3\xa9.png")  # one stray byte, then a valid é
    shutil.copyfile(task / "test" / "intact" / "0.png", odd)
    output = tmp_path / "p.csv"
    assert main(["predict", str(export), str(folder), "--output", str(output)]) == 0
    rows = list(csv.DictReader(output.open(encoding="utf-8")))
    assert [row["image"] for row in rows] == [f"{folder}/\\xff café.png"]
    assert shown_path(Path(odd)) == rows[0]["image"]


def test_a_name_that_is_not_utf8_is_printed_on_an_ascii_terminal(trained, tmp_path):
    import subprocess
    import sys

    task, _, export = trained
    folder = tmp_path / "images"
    folder.mkdir()
    odd = os.fsdecode(os.fsencode(folder) + b"/\xff caf\xc3\xa9.png")
    shutil.copyfile(task / "test" / "intact" / "0.png", odd)
    done = subprocess.run([sys.executable, "-m", "tieta", "predict", str(export), str(folder), "--device", "cpu"],
                          capture_output=True, env={**os.environ, "PYTHONIOENCODING": "ascii"})
    assert done.returncode == 0, done.stderr
    assert b"\\xff caf?.png" in done.stdout  # as in the CSV: a stray byte escaped; "?" for what ASCII lacks
