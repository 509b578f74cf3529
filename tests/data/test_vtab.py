import shutil

import numpy as np
import pytest
import torch
from PIL import Image

from tieta import TietaError
from tieta.data.transforms import Normalize, load_resized
from tieta.data.vtab import ImageDataset, open_task


def test_reads_vtab_layout(vtab_task):
    task = open_task(vtab_task)
    assert task.layout == "vtab" and task.num_classes == 3
    train = task.split("train")
    assert len(train) == 12 and len(task.split("test")) == 6
    assert len(task.split("train800")) + len(task.split("val200")) == 12
    assert train[0][0] == vtab_task / "images/train/000000.jpg" and train[-1][1] == 2


def test_task_folder_aliases(tmp_path, vtab_task):
    shutil.move(vtab_task, tmp_path / "cifar100")
    assert open_task(tmp_path / "cifar").root == tmp_path / "cifar100"
    shutil.move(tmp_path / "cifar100", tmp_path / "oxford_iiit_pet")
    assert open_task(tmp_path / "oxford_pet").root == tmp_path / "oxford_iiit_pet"


def test_image_folder_layout(tmp_path):
    for split in ("train", "val"):
        for name in ("cat", "dog"):
            (tmp_path / split / name).mkdir(parents=True)
            Image.new("RGB", (8, 8)).save(tmp_path / split / name / "a.png")
    task = open_task(tmp_path)
    assert task.layout == "folder" and task.class_names == ["cat", "dog"]
    assert [label for _, label in task.split("test")] == [0, 1]


def test_bicubic_resize_then_normalize_matches_torchvision(vtab_task):
    from torchvision import transforms

    path = vtab_task / "images/train/000000.jpg"
    reference = transforms.Compose([
        transforms.Resize((16, 16), interpolation=transforms.InterpolationMode.BICUBIC),
        transforms.ToTensor(),
        transforms.Normalize((0.485, 0.456, 0.406), (0.229, 0.224, 0.225)),
    ])(Image.open(path).convert("RGB"))
    ours = Normalize("imagenet")(load_resized(path, 16)[None])[0]
    torch.testing.assert_close(ours, reference, rtol=1e-5, atol=1e-5)


def test_cached_and_lazy_datasets_agree(vtab_task):
    items = open_task(vtab_task).split("test")
    cached, lazy = ImageDataset(items, 16, 3, cache=True), ImageDataset(items, 16, 3, cache=False)
    for i in range(len(items)):
        assert torch.equal(cached[i][0], lazy[i][0]) and cached[i][1] == lazy[i][1]
    assert cached[0][0].dtype == torch.uint8 and cached[0][0].shape == (3, 16, 16)


@pytest.mark.parametrize("line,message", [
    ("images/train/000000.jpg", "expected"),
    ("images/train/000000.jpg cat", "expected"),
    ("images/train/000000.jpg -1", "negative"),
])
def test_malformed_list_lines(vtab_task, line, message):
    (vtab_task / "test.txt").write_text(line + "\n")
    with pytest.raises(TietaError, match=message):
        open_task(vtab_task)


def test_label_out_of_range_and_missing_image(vtab_task):
    items = open_task(vtab_task).split("test")
    with pytest.raises(TietaError, match="out of range"):
        ImageDataset(items, 16, 2)
    with pytest.raises(TietaError, match="does not exist"):
        ImageDataset([(vtab_task / "nope.jpg", 0)], 16, 3)


def test_unreadable_image(vtab_task):
    bad = vtab_task / "images/train/000000.jpg"
    bad.write_bytes(b"not an image")
    with pytest.raises(TietaError, match="cannot read image"):
        ImageDataset([(bad, 0)], 16, 3)


def test_missing_or_unknown_folder(tmp_path):
    with pytest.raises(TietaError, match="does not exist"):
        open_task(tmp_path / "absent")
    with pytest.raises(TietaError, match="neither"):
        open_task(tmp_path)


@pytest.mark.parametrize("task,classes,train,test", [("cifar10", 10, 1000, 2000), ("dtd10", 10, 1000, 200),
                                                      ("elpv", 4, 1000, 1624)])
def test_vtab_mini_tasks(vtab_mini, task, classes, train, test):
    folder = open_task(vtab_mini / task)
    assert folder.num_classes == classes
    items = folder.split("train")
    assert len(items) == train and len(folder.split("test")) == test
    assert all(path.is_file() for path, _ in items[:50])
    image = load_resized(items[0][0], 32)
    assert image.shape == (3, 32, 32)
