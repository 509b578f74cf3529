"""Segmentation task folders: detection, both layouts, the class count, hostile lists, folders and
masks (each refused in one sentence), the settings' checks, and the (image, mask) items a run reads."""

import os
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from torch.utils.data import DataLoader

from tieta import TietaError
from tieta.dense.dataset import (SegmentationDataConfig, SegmentationDataset, is_segmentation_task, mask_labels,
                                 open_segmentation_task)
from tieta.dense.testdata import CLASS_NAMES, make_segmentation_task

from tests.conftest import VTAB_MINI

SOURCE = VTAB_MINI / "dtd10"
SMALL = SegmentationDataConfig(crop_size=48, scale=(128, 64))


@pytest.fixture(scope="module")
def made(tmp_path_factory):
    """The two layouts of one small task, made once; tests copy them before changing anything."""
    if not SOURCE.is_dir():
        pytest.skip(f"vtab-mini data not found at {VTAB_MINI} (set TIETA_VTAB_MINI)")
    root = tmp_path_factory.mktemp("segmentation")
    return {layout: make_segmentation_task(root / layout, SOURCE, layout=layout) for layout in ("ade20k", "lists")}


@pytest.fixture
def task_copy(made, tmp_path):
    def copy(layout: str) -> Path:
        return Path(shutil.copytree(made[layout], tmp_path / layout))
    return copy


def test_a_segmentation_task_is_detected(made, tmp_path):
    assert is_segmentation_task(made["ade20k"]) and is_segmentation_task(made["lists"])
    assert not is_segmentation_task(SOURCE)  # an image classification task
    (tmp_path / "video").mkdir()
    (tmp_path / "video" / "train.txt").write_text("a.mp4 0\n")
    (tmp_path / "labels").mkdir()
    (tmp_path / "labels" / "train.txt").write_text("a.jpg 3\n")
    (tmp_path / "half" / "images" / "training").mkdir(parents=True)
    (tmp_path / "file.png").write_bytes(b"")
    for path in ("video", "labels", "half", "file.png", "missing"):
        assert not is_segmentation_task(tmp_path / path)


@pytest.mark.parametrize("layout", ["ade20k", "lists"])
def test_both_layouts_open_to_the_same_task(made, layout):
    task = open_segmentation_task(made[layout])
    assert task.layout == layout and task.num_classes == 4 and task.class_names == list(CLASS_NAMES)
    assert len(task.split("train")) == 6 and len(task.split("test")) == 3 and task.split("val") == task.split("test")
    for image, mask in task.split("train") + task.split("test"):
        assert image.is_file() and image.suffix == ".jpg" and mask.is_file() and mask.suffix == ".png"
        labels = mask_labels(mask, True)
        assert set(np.unique(labels)) <= {0, 1, 2, 3, 255} and labels.shape == (64, 96)
    with pytest.raises(TietaError, match="has the splits train, test, val"):
        task.split("train800")


def test_without_classes_txt_the_classes_are_the_masks_labels(task_copy):
    root = task_copy("ade20k")
    (root / "classes.txt").unlink()
    assert open_segmentation_task(root).num_classes == 4
    unreduced = open_segmentation_task(root, reduce_zero_label=False)
    assert unreduced.num_classes == 5 and unreduced.class_names is None  # 0 ("other") is a class then
    for mask in (root / "annotations").rglob("*.png"):
        Image.new("L", (96, 64), 0).save(mask)
    with pytest.raises(TietaError, match="no mask of .* has a label other than the ignore index 255"):
        open_segmentation_task(root)


def test_the_made_masks_mark_where_the_shapes_were_pasted(made):
    """Inside a shape the picture is the shape's photo, not the background's (JPEG aside)."""
    task = open_segmentation_task(made["ade20k"])
    image, mask = task.split("train")[0]
    labels = mask_labels(mask, True)
    assert all((labels == shape).sum() >= 16 for shape in (1, 2, 3))  # every shape shows somewhere
    pixels = np.asarray(Image.open(image).convert("RGB"), dtype=float)
    for shape in (1, 2, 3):  # a pasted shape's colours differ from the background's on average
        assert np.abs(pixels[labels == shape].mean(0) - pixels[labels == 0].mean(0)).max() > 1


@pytest.mark.parametrize("line, message", [
    ("/etc/x.jpg masks/a.png", "image path /etc/x.jpg leaves the task folder"),
    ("images/train_0000.jpg ../a.png", "mask path ../a.png leaves the task folder"),
    ("images/train_0000.jpg", "expected '<image path> <mask path>'"),
    ("images/train_0000.jpg masks/train_0000.png 3", "expected '<image path> <mask path>'"),
    ("images/a.txt masks/train_0000.png", "images/a.txt is not an image"),
    ("images/train_0000.jpg masks/train_0000.jpg", "mask masks/train_0000.jpg is not a .png label map"),
    ("images/train_0000.jpg masks/missing.png", "mask .*missing.png does not exist"),
    ("images/train_0000.jpg masks/" + "x" * 300 + ".png", "cannot read mask .*xxx.png: File name too long"),
])
def test_a_list_names_pairs_inside_the_task(task_copy, line, message):
    root = task_copy("lists")
    (root / "train.txt").write_text("images/train_0001.jpg masks/train_0001.png\n\n" + line + "\n")
    with pytest.raises(TietaError, match=message) as caught:
        open_segmentation_task(root)
    assert "\n" not in str(caught.value)
    if "leaves" in message or "expected" in message:
        assert "train.txt:3" in str(caught.value)


def test_unreadable_lists_are_refused_in_one_sentence(task_copy):
    root = task_copy("lists")
    (root / "train.txt").write_bytes(b"images/\xff.jpg masks/a.png\n")
    with pytest.raises(TietaError, match=r"train.txt:1: not UTF-8 text \(byte 0xff"):
        open_segmentation_task(root)
    (root / "train.txt").write_text("\n\n")
    with pytest.raises(TietaError, match="names no images"):
        open_segmentation_task(root)
    (root / "train.txt").unlink()
    os.mkfifo(root / "train.txt")  # would block a plain read
    with pytest.raises(TietaError, match="is not a regular file"):
        open_segmentation_task(root)


def test_a_mask_of_another_size_is_refused_naming_both_files(task_copy):
    root = task_copy("ade20k")
    mask = root / "annotations" / "validation" / "val_0007.png"
    Image.new("L", (90, 64), 1).save(mask)
    with pytest.raises(TietaError) as caught:
        open_segmentation_task(root)
    assert str(caught.value) == (f"mask {mask} is 90 x 64 pixels but its image "
                                 f"{root / 'images' / 'validation' / 'val_0007.jpg'} is 96 x 64")


def test_an_image_without_its_mask_and_bad_masks_are_refused(task_copy):
    root = task_copy("ade20k")
    mask = root / "annotations" / "training" / "train_0002.png"
    mask.unlink()
    with pytest.raises(TietaError, match="image .*train_0002.jpg has no mask .*train_0002.png"):
        open_segmentation_task(root)
    Image.new("RGB", (96, 64)).save(mask)  # a colour-coded mask: not a label map
    task = open_segmentation_task(root)  # the header's size is right; the pixels are read when used
    with pytest.raises(TietaError, match="pixel type 'RGB': a mask is a single-channel 8-bit label map"):
        SegmentationDataset(task.split("train"), task, SMALL, training=False)[2]
    mask.write_bytes(b"\x89PNG\r\n\x1a\n broken")
    with pytest.raises(TietaError, match="cannot read mask .*train_0002.png"):
        open_segmentation_task(root)
    mask.unlink()
    os.mkfifo(mask)
    with pytest.raises(TietaError, match="mask .*train_0002.png is not a regular file"):
        open_segmentation_task(root)


def test_a_label_beyond_classes_txt_is_refused_when_read(task_copy):
    root = task_copy("ade20k")
    (root / "classes.txt").write_text("background\ndisc\nsquare\n")  # the triangle (3) has no name
    task = open_segmentation_task(root)
    assert task.num_classes == 3
    dataset = SegmentationDataset(task.split("train"), task, SMALL, training=True)
    with pytest.raises(TietaError, match=r"mask .*train_0000.png has label 3, beyond the task's 3 classes \(0-2, and "
                                         r"255 ignored\)"):
        dataset[0]
    (root / "classes.txt").write_text("\n")
    with pytest.raises(TietaError, match="names no classes"):
        open_segmentation_task(root)
    (root / "classes.txt").write_text("".join(f"c{index}\n" for index in range(256)))
    with pytest.raises(TietaError, match="names 256 classes, more than the 255"):
        open_segmentation_task(root)


def test_missing_folders_and_other_layouts_are_refused(tmp_path):
    with pytest.raises(TietaError, match="does not exist"):
        open_segmentation_task(tmp_path / "missing")
    with pytest.raises(TietaError, match="is not a segmentation task folder"):
        open_segmentation_task(SOURCE)
    (tmp_path / "images" / "training").mkdir(parents=True)
    with pytest.raises(TietaError, match="has no images"):
        open_segmentation_task(tmp_path)


@pytest.mark.parametrize("field, value, message", [
    ("crop_size", 0, "segmentation.crop_size must be a positive integer"),
    ("scale", (512,), "segmentation.scale must be two positive integers"),
    ("ratio_range", (2.0, 0.5), "segmentation.ratio_range must be two ratios"),
    ("cat_max_ratio", 0, r"segmentation.cat_max_ratio must be in \(0, 1\]"),
    ("flip_prob", 1.5, r"segmentation.flip_prob must be in \[0, 1\]"),
    ("photometric", "yes", "must be true or false"),
    ("ignore_index", 300, "segmentation.ignore_index must be a label value 0-255"),
])
def test_the_settings_are_checked_in_one_sentence(field, value, message):
    SegmentationDataConfig().check()
    with pytest.raises(TietaError, match=message):
        SegmentationDataConfig(**{field: value}).check()


def test_training_and_evaluation_items(made):
    task = open_segmentation_task(made["lists"])
    training = SegmentationDataset(task.split("train"), task, SMALL, training=True, mean=(0.5, 0.5, 0.5))
    torch.manual_seed(0)
    first = training[1]
    torch.manual_seed(0)
    again = training[1]
    assert torch.equal(first[0], again[0]) and torch.equal(first[1], again[1])  # the run's seed decides
    images, masks = next(iter(DataLoader(training, batch_size=3)))
    assert images.shape == (3, 3, 48, 48) and images.dtype == torch.float32 and masks.shape == (3, 48, 48)
    assert masks.dtype == torch.int64 and set(masks.unique().tolist()) <= {0, 1, 2, 3, 255}
    evaluation = SegmentationDataset(task.split("test"), task, SMALL, training=False)
    image, mask = evaluation[0]
    assert image.shape == (3, 64, 96) and mask.shape == (64, 96)  # (128, 64) holds 96 x 64 as it is
    big = SegmentationDataset(task.split("test"), task, SegmentationDataConfig(scale=(256, 128)), training=False)
    assert big[0][0].shape == (3, 128, 192) and big[0][1].shape == (64, 96)  # the mask keeps its own size
    with pytest.raises(TietaError, match="another reduce_zero_label"):
        SegmentationDataset(task.split("test"), task, SegmentationDataConfig(reduce_zero_label=False), training=False)


def test_a_segmentation_task_is_written_to_a_new_folder_only(tmp_path):
    (tmp_path / "full").mkdir()
    (tmp_path / "full" / "keep.txt").write_text("mine")
    with pytest.raises(TietaError, match="already exists and is not an empty folder"):
        make_segmentation_task(tmp_path / "full", SOURCE)
    assert (tmp_path / "full" / "keep.txt").read_text() == "mine"
    with pytest.raises(TietaError, match="layout must be one of ade20k, lists"):
        make_segmentation_task(tmp_path / "new", SOURCE, layout="coco")
    with pytest.raises(TietaError, match="fewer than the"):
        make_segmentation_task(tmp_path / "new", SOURCE, train_images=300)


def test_a_linked_images_folder_is_followed_as_for_image_tasks(made, tmp_path):
    root = tmp_path / "linked"
    root.mkdir()
    shutil.copytree(made["ade20k"] / "images", tmp_path / "storage")  # images kept on other storage
    (root / "images").symlink_to(tmp_path / "storage")
    shutil.copytree(made["ade20k"] / "annotations", root / "annotations")
    task = open_segmentation_task(root)
    assert len(task.split("train")) == 6 and task.num_classes == 4  # (4 classes from the masks' labels)


def test_the_fingerprint_covers_the_pairs_and_the_classes(made, task_copy):
    from tieta.dense.dataset import segmentation_fingerprint

    first = segmentation_fingerprint(open_segmentation_task(made["lists"]), ("train", "test"))
    root = task_copy("lists")
    assert segmentation_fingerprint(open_segmentation_task(root), ("train", "test")) == first  # moved: the same
    assert first.startswith("4 classes, 9 images, sha256 ")
    (root / "train.txt").write_text("\n".join((root / "train.txt").read_text().splitlines()[:-1]) + "\n")
    assert segmentation_fingerprint(open_segmentation_task(root), ("train", "test")) != first
    root = task_copy("ade20k")
    before = segmentation_fingerprint(open_segmentation_task(root), ("train", "test"))
    (root / "classes.txt").write_text("sky\ndisc\nsquare\ntriangle\n")
    assert segmentation_fingerprint(open_segmentation_task(root), ("train", "test")) != before
    assert segmentation_fingerprint(open_segmentation_task(root, reduce_zero_label=False), ("train",)) != \
        segmentation_fingerprint(open_segmentation_task(root), ("train",))


def test_the_reduction_marks_with_255_only(made, task_copy):
    with pytest.raises(TietaError, match="ignore_index must be 255 with reduce_zero_label"):
        open_segmentation_task(made["ade20k"], ignore_index=0)
    root = task_copy("ade20k")
    (root / "classes.txt").write_text("other\nbackground\ndisc\nsquare\ntriangle\n")
    task = open_segmentation_task(root, reduce_zero_label=False, ignore_index=0)  # 0, "other", ignored
    assert task.num_classes == 5
    image, mask = SegmentationDataset(task.split("test"), task, SegmentationDataConfig(
        reduce_zero_label=False, ignore_index=0, scale=(128, 64)), training=False)[0]
    assert set(mask.unique().tolist()) == {0, 1, 2, 3, 4} and image.shape == (3, 64, 96)


def test_images_and_masks_over_the_pixel_limit_are_refused_on_their_header(made, monkeypatch):
    import tieta.data.transforms

    monkeypatch.setattr(tieta.data.transforms, "MAX_IMAGE_PIXELS", 96 * 64 - 1)  # one pixel below the pictures'
    with pytest.raises(TietaError, match=r"image .*train_0000.jpg is 96 x 64 pixels, outside the limit"):
        open_segmentation_task(made["ade20k"])
