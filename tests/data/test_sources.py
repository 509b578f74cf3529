"""The other image sources: a class-per-folder tree with a held-out test split, CSV/TSV list files
(a train/test pair, or one file with a held-out split). Each opens into a Task, is checked as the
task folders are, fingerprinted, and trains for real."""

import json
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from tieta import TietaError
from tieta.cli import main
from tieta.data.vtab import ImageDataset, fingerprint, open_task

TINY = ["--model", "test_vit", "--weights", "random", "--img-size", "32", "--lora-rank", "2", "--epochs", "1",
        "--set", "optim.batch_size=4"]


pytestmark = pytest.mark.usefixtures("quick_throughput")  # the runs here check the data path, not the speed


def write_image(path: Path, label: int, seed: int = 0) -> None:
    """A 12 x 12 image whose colour says its class (so the classes can be learned)."""
    pixels = np.random.default_rng(seed).integers(0, 60, size=(12, 12, 3), dtype=np.uint8)
    pixels[..., label % 3] += 150
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(pixels).save(path)


def write_class_tree(root: Path, classes=("cat", "dog", "fox"), per_class: int = 5) -> Path:
    for label, name in enumerate(classes):
        for index in range(per_class):
            write_image(root / name / f"{index}.png", label, seed=label * 100 + index)
    return root


def write_lists(root: Path, suffix: str = ".csv", header: bool = True, names: bool = True) -> Path:
    """images/<n>.png with train and test list files: labels as class names or integers."""
    separator = "," if suffix == ".csv" else "\t"
    classes = ["zebra", "ant", "moose"]  # not in sorted order: the numbering must sort them
    for split, count in (("train", 4), ("test", 2)):
        rows = [f"path{separator}label"] if header else []
        for label, name in enumerate(classes):
            for index in range(count):
                image = f"images/{split}-{name}-{index}.png"
                write_image(root / image, label, seed=hash((split, label, index)) % 1000)
                rows.append(f"{image}{separator}{name if names else label}")
        (root / f"{split}{suffix}").write_text("\n".join(rows) + "\n")
    return root


def test_class_tree_holds_out_a_stratified_seeded_test_split(tmp_path):
    root = write_class_tree(tmp_path / "tree", per_class=5)
    task = open_task(root, holdout=0.2)
    assert task.layout == "classes" and task.num_classes == 3 and task.class_names == ["cat", "dog", "fox"]
    train, test = task.split("train"), task.split("test")
    assert [sum(label == c for _, label in test) for c in range(3)] == [1, 1, 1]  # round(5 x 0.2) per class
    assert len(train) == 12 and not {p for p, _ in train} & {p for p, _ in test}
    again = open_task(root, holdout=0.2)
    assert again.split("test") == test and fingerprint(again, ("train", "test")) == fingerprint(task, ("train", "test"))
    assert fingerprint(open_task(root, holdout=0.4), ("train", "test")) != fingerprint(task, ("train", "test"))


def test_a_class_with_one_image_is_only_trained_on(tmp_path):
    root = write_class_tree(tmp_path / "tree", per_class=2)
    write_image(root / "solo" / "0.png", 0)
    task = open_task(root, holdout=0.5)
    assert task.class_names[-1] == "solo" and all(label != 3 for _, label in task.split("test"))
    assert sum(label == 3 for _, label in task.split("train")) == 1


def test_class_tree_without_holdout_says_how_to_get_a_test_split(tmp_path):
    root = write_class_tree(tmp_path / "tree")
    with pytest.raises(TietaError, match=r"no test split: set data.holdout \(e.g. --set data.holdout=0.2\)"):
        open_task(root)


def test_holdout_is_refused_where_the_data_has_a_test_split(vtab_task, tmp_path):
    with pytest.raises(TietaError, match="has its own test split; data.holdout"):
        open_task(vtab_task, holdout=0.2)
    with pytest.raises(TietaError, match="has its own test split"):
        open_task(write_lists(tmp_path / "lists"), holdout=0.2)


def test_empty_class_folder_is_refused(tmp_path):
    root = write_class_tree(tmp_path / "tree")
    (root / "empty").mkdir()
    with pytest.raises(TietaError, match="class folder .*empty has no images"):
        open_task(root, holdout=0.2)


def test_list_folder_with_class_names_numbers_them_sorted(tmp_path):
    task = open_task(write_lists(tmp_path / "lists"))
    assert task.layout == "lists" and task.class_names == ["ant", "moose", "zebra"] and task.num_classes == 3
    train = task.split("train")
    assert len(train) == 12 and len(task.split("test")) == 6
    assert {label for path, label in train if "zebra" in path.name} == {2}  # "zebra" is first in the file
    assert all(path.is_file() for path, _ in train)


@pytest.mark.parametrize("suffix", [".csv", ".tsv"])
def test_integer_labels_and_no_header(tmp_path, suffix):
    task = open_task(write_lists(tmp_path / "lists", suffix=suffix, header=False, names=False))
    assert task.class_names is None and task.num_classes == 3
    assert sorted({label for _, label in task.split("test")}) == [0, 1, 2]


def test_single_list_file_with_holdout(tmp_path):
    root = write_lists(tmp_path / "lists")
    task = open_task(root / "train.csv", holdout=0.25)
    assert task.data_path == str((root / "train.csv").resolve()) and task.num_classes == 3
    assert len(task.split("test")) == 3 and len(task.split("train")) == 9
    with pytest.raises(TietaError, match="single list file .* no test split: set data.holdout"):
        open_task(root / "train.csv")


@pytest.mark.parametrize("row, message", [
    ("../outside.png,ant", "train.csv:2: image path ../outside.png leaves the folder of the list file"),
    ("/abs/a.png,ant", "train.csv:2: image path /abs/a.png leaves the folder"),
    ("a.png,ant,extra", "train.csv:2: expected '<image path>,<label>'"),
    ("a.png,-1", "train.csv:2: label -1 is negative"),
])
def test_bad_rows_name_file_and_line(tmp_path, row, message):
    root = write_lists(tmp_path / "lists", names=False)
    lines = (root / "train.csv").read_text().splitlines()
    (root / "train.csv").write_text("\n".join([lines[0], row, *lines[1:]]) + "\n")
    with pytest.raises(TietaError, match=message.replace("(", r"\(").replace(".", r"\.")):
        open_task(root)


def test_test_class_that_is_not_a_training_class(tmp_path):
    root = write_lists(tmp_path / "lists")
    (root / "test.csv").write_text("images/test-ant-0.png,wolf\n")
    with pytest.raises(TietaError, match=r"test.csv:1: class 'wolf' is not among the training file's classes"):
        open_task(root)


def test_stray_integer_label_is_refused(tmp_path):
    root = write_lists(tmp_path / "lists", names=False)
    with (root / "train.csv").open("a") as handle:
        handle.write("images/train-ant-0.png,7\n")
    with pytest.raises(TietaError, match="class 3 has no training image"):
        open_task(root)


def test_missing_image_is_refused_in_one_sentence(tmp_path):
    root = write_lists(tmp_path / "lists")
    (root / "images" / "train-ant-1.png").unlink()
    task = open_task(root)
    with pytest.raises(TietaError, match="train-ant-1.png does not exist"):
        ImageDataset(task.split("train"), 32, task.num_classes, cache=False)


def test_list_fingerprint_changes_with_the_list(tmp_path):
    root = write_lists(tmp_path / "lists")
    before = fingerprint(open_task(root), ("train", "test"))
    lines = (root / "train.csv").read_text().splitlines()
    (root / "train.csv").write_text("\n".join(lines[:-1]) + "\n")
    assert fingerprint(open_task(root), ("train", "test")) != before


def test_not_utf8_list(tmp_path):
    root = write_lists(tmp_path / "lists")
    (root / "train.csv").write_bytes(b"path,label\nimages/\xff.png,ant\n")
    with pytest.raises(TietaError, match=r"train.csv:2: not UTF-8 text \(byte 0xff\)"):
        open_task(root)


def test_unrecognised_folder_names_every_layout(tmp_path):
    (tmp_path / "empty").mkdir()
    with pytest.raises(TietaError, match="class-per-folder tree.*train.csv and test.csv.*dataset_dict.json"):
        open_task(tmp_path / "empty")


def _train(tmp_path, data, *extra) -> dict:
    run = tmp_path / "run"
    assert main(["train", *TINY, "--data", str(data), "--output", str(run), *extra]) == 0
    return json.loads((run / "summary.json").read_text())


def test_training_on_a_class_tree_with_augmentation(tmp_path, capsys):
    root = write_class_tree(tmp_path / "tree", per_class=5)
    summary = _train(tmp_path, root, "--set", "data.holdout=0.2", "--set", "data.augment=timm")
    assert summary["num_classes"] == 3 and summary["data"] == str(root.resolve())
    assert summary["data_fingerprint"].startswith("3 classes, 15 images")
    # the run's held-out split is evaluated again with the checkpoint, and its class names exported
    assert main(["eval", str(tmp_path / "run")]) == 0
    assert "acc" in capsys.readouterr().out


def test_training_on_a_single_list_file(tmp_path):
    root = write_lists(tmp_path / "lists")
    summary = _train(tmp_path, root / "train.csv", "--set", "data.holdout=0.25")
    assert summary["data"] == str((root / "train.csv").resolve())
    assert summary["data_fingerprint"].startswith("3 classes, 12 images")


def test_training_on_list_files_resumes_only_on_the_same_list(tmp_path):
    from conftest import fail_in_epoch
    from tieta.train.fit import resume_run

    root = write_lists(tmp_path / "lists")
    with pytest.MonkeyPatch.context() as patch:
        fail_in_epoch(patch, 2)
        assert main(["train", *TINY, "--epochs", "2", "--data", str(root), "--output", str(tmp_path / "run")]) != 0
    (root / "train.csv").write_text("path,label\nimages/train-ant-0.png,ant\nimages/train-zebra-0.png,zebra\n"
                                    "images/train-moose-0.png,moose\n")
    with pytest.raises(TietaError, match="changed since the run started"):
        resume_run(tmp_path / "run")


def test_adding_an_image_keeps_the_other_classes_held_out_images(tmp_path):
    root = write_class_tree(tmp_path / "tree", per_class=10)
    before = open_task(root, holdout=0.2).split("test")
    write_image(root / "dog" / "new.png", 1, seed=999)
    after = open_task(root, holdout=0.2).split("test")
    assert [item for item in before if item[1] != 1] == [item for item in after if item[1] != 1]


def test_val_list_tests_where_there_is_no_test_list(tmp_path):
    root = write_lists(tmp_path / "lists")
    (root / "test.csv").rename(root / "val.csv")
    task = open_task(root)
    assert len(task.split("test")) == 6 and task.split("val") == task.split("test")


def test_folders_of_folders_are_no_class_tree(tmp_path):
    write_image(tmp_path / "task" / "images" / "train" / "0.png", 0)  # a VTAB task without its lists
    with pytest.raises(TietaError, match="is neither a VTAB-1k task folder"):
        open_task(tmp_path / "task", holdout=0.2)


def test_a_sweep_opens_a_class_tree_with_its_base_holdout(tmp_path):
    from tieta.sweep.plan import plan_from_flags
    from tieta.sweep.runner import _open_tasks

    root = write_class_tree(tmp_path / "tree")
    tasks, problems = _open_tasks(plan_from_flags([str(root)], ["lora"], [0], {"data.holdout": 0.2}))
    assert not problems and tasks["tree"].layout == "classes" and len(tasks["tree"].split("test")) == 3
    with pytest.raises(TietaError, match="no task of the sweep has data .*set data.holdout"):
        _open_tasks(plan_from_flags([str(root)], ["lora"], [0], {}))
