"""datasets DatasetDicts: saved with save_to_disk (--data DIR) or loaded from the hub (--data hf:NAME,
here with load_dataset replaced by a local DatasetDict, as no network is used in tests)."""

import json
import sys

import numpy as np
import pytest
from PIL import Image

from tieta import TietaError
from tieta.cli import main
from tieta.data.vtab import ImageDataset, fingerprint, open_task

datasets = pytest.importorskip("datasets")
datasets.disable_progress_bars()

TINY = ["--model", "test_vit", "--weights", "random", "--img-size", "32", "--lora-rank", "2", "--epochs", "1",
        "--set", "optim.batch_size=4"]


pytestmark = pytest.mark.usefixtures("quick_throughput")  # the runs here check the data path, not the speed


def image(label: int, seed: int) -> Image.Image:
    pixels = np.random.default_rng(seed).integers(0, 60, size=(12, 12, 3), dtype=np.uint8)
    pixels[..., label % 3] += 150
    return Image.fromarray(pixels)


def dataset_dict(splits=("train", "test"), image_column="img", label_column="label", class_label=True,
                 per_class=3, labels=None):
    label_feature = datasets.ClassLabel(names=["red", "green", "blue"]) if class_label else datasets.Value("int64")
    features = datasets.Features({image_column: datasets.Image(), label_column: label_feature,
                                  "note": datasets.Value("string")})
    parts = {}
    for number, split in enumerate(splits):
        ys = labels or [label for label in range(3) for _ in range(per_class)]
        parts[split] = datasets.Dataset.from_dict(
            {image_column: [image(y, number * 100 + i) for i, y in enumerate(ys)], label_column: ys,
             "note": ["x"] * len(ys)}, features=features)
    return datasets.DatasetDict(parts)


def saved(tmp_path, name="saved", **kwargs):
    dataset_dict(**kwargs).save_to_disk(str(tmp_path / name))
    return tmp_path / name


def test_saved_dataset_dict_is_recognised(tmp_path):
    task = open_task(saved(tmp_path))
    assert task.layout == "datasets" and task.num_classes == 3 and task.class_names == ["red", "green", "blue"]
    train = task.split("train")
    assert len(train) == 9 and len(task.split("test")) == 9
    images = ImageDataset(train, 16, task.num_classes, cache=True)
    assert images[0][0].shape == (3, 16, 16) and int(images.labels[3]) == 1
    assert images[0][0][0].float().mean() > images[0][0][2].float().mean()  # class 0 is red


def test_columns_are_found_by_their_features(tmp_path):
    task = open_task(saved(tmp_path, image_column="picture", label_column="kind", splits=("train", "validation")))
    assert task.num_classes == 3 and len(task.split("test")) == 9  # validation tests where there is no test


def test_integer_labels_number_the_classes(tmp_path):
    task = open_task(saved(tmp_path, class_label=False, label_column="labels", image_column="image"))
    assert task.class_names is None and task.num_classes == 3


def test_unclear_columns_are_refused_naming_them(tmp_path):
    with pytest.raises(TietaError, match=r"cannot tell the label column .* name it label or labels.*kind \(Value\)"):
        open_task(saved(tmp_path, class_label=False, label_column="kind"))


def test_unlabelled_rows_are_refused(tmp_path):
    with pytest.raises(TietaError, match=r"row 0 of the 'train' split .* has the label -1 \(unlabelled\)"):
        open_task(saved(tmp_path, class_label=False, labels=[-1, 0, 1]))


def test_train_only_dataset_needs_holdout(tmp_path):
    root = saved(tmp_path, splits=("train",), per_class=4)
    with pytest.raises(TietaError, match="no test split: set data.holdout"):
        open_task(root)
    task = open_task(root, holdout=0.25)
    assert len(task.split("test")) == 3 and len(task.split("train")) == 9


def test_fingerprint_covers_the_dataset(tmp_path):
    before = fingerprint(open_task(saved(tmp_path)), ("train", "test"))
    assert fingerprint(open_task(saved(tmp_path, name="again")), ("train", "test")) == before  # wherever it lies
    changed = saved(tmp_path, name="changed", labels=[0, 1, 2, 2, 1, 0, 0, 1, 2])
    assert fingerprint(open_task(changed), ("train", "test")) != before


def test_hub_name_loads_with_load_dataset(tmp_path, monkeypatch):
    asked = []
    monkeypatch.setattr(datasets, "load_dataset", lambda name: asked.append(name) or dataset_dict())
    task = open_task("hf:someone/colours")
    assert asked == ["someone/colours"] and task.data_path == "hf:someone/colours" and task.num_classes == 3
    assert str(task.split("test")[0][0]) == "someone/colours[test][0]"


def test_hub_failure_is_one_sentence(monkeypatch):
    def offline(name):
        raise ConnectionError("Couldn't reach 'nobody/none' on the Hub (LocalEntryNotFoundError)\nmore lines")

    monkeypatch.setattr(datasets, "load_dataset", offline)
    with pytest.raises(TietaError, match=r"^cannot load the hub dataset nobody/none: Couldn't reach .*Error\)$"):
        open_task("hf:nobody/none")


def test_missing_datasets_library_names_the_extra(tmp_path, monkeypatch):
    root = saved(tmp_path)
    monkeypatch.setitem(sys.modules, "datasets", None)  # import datasets now fails
    with pytest.raises(TietaError, match=r"pip install 'tieta\[datasets\]'"):
        open_task(root)


def test_training_on_a_saved_dataset_dict(tmp_path):
    run = tmp_path / "run"
    assert main(["train", *TINY, "--data", str(saved(tmp_path)), "--output", str(run)]) == 0
    summary = json.loads((run / "summary.json").read_text())
    assert summary["num_classes"] == 3 and summary["data_fingerprint"].startswith("3 classes, 18 images")


def test_training_on_a_hub_dataset(tmp_path, monkeypatch):
    monkeypatch.setattr(datasets, "load_dataset", lambda name: dataset_dict(per_class=2))
    run = tmp_path / "run"
    assert main(["train", *TINY, "--data", "hf:someone/colours", "--output", str(run)]) == 0
    summary = json.loads((run / "summary.json").read_text())
    assert summary["data"] == "hf:someone/colours"
    assert "hf:someone/colours" in (run / "config.yaml").read_text()


def test_corrupt_stored_image_names_its_split_and_row(tmp_path):
    features = datasets.Features({"image": datasets.Image(), "label": datasets.ClassLabel(names=["a", "b"])})
    rows = {"image": [{"bytes": b"not an image", "path": None}, {"bytes": b"nor this", "path": None}],
            "label": [0, 1]}
    part = datasets.Dataset.from_dict(rows, features=features)
    datasets.DatasetDict(train=part, test=part).save_to_disk(str(tmp_path / "bad"))
    task = open_task(tmp_path / "bad")
    with pytest.raises(TietaError, match=r"cannot read image .*bad\[train\]\[0\]: it is not an image file"):
        ImageDataset(task.split("train"), 16, 2, cache=True)


def test_hub_name_must_be_given():
    with pytest.raises(TietaError, match="hf:NAME needs a dataset name"):
        open_task("hf:")
