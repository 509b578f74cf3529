"""EXIF orientation: a photo stored sideways with a tag saying how to turn it is read upright, in
training, evaluation and ``tieta predict`` alike (all read images through load_resized)."""

import numpy as np
import torch
from PIL import ExifTags, Image

from tieta.data.transforms import load_resized, load_rgb


def _sideways(path, orientation: int = 6) -> np.ndarray:
    """Save a 16 x 8 image (red left half, blue right half) with an EXIF orientation tag; returns
    its stored pixels."""
    pixels = np.zeros((8, 16, 3), dtype=np.uint8)
    pixels[:, :8, 0] = 255
    pixels[:, 8:, 2] = 255
    image = Image.fromarray(pixels)
    exif = image.getexif()
    exif[ExifTags.Base.Orientation] = orientation
    image.save(path, exif=exif.tobytes())
    return pixels


def test_orientation_tag_is_applied(tmp_path):
    stored = _sideways(tmp_path / "photo.png", orientation=6)  # 6: turn 90 degrees clockwise to view
    upright = np.asarray(load_rgb(tmp_path / "photo.png"))
    assert upright.shape == (16, 8, 3)  # width and height swapped
    assert np.array_equal(upright, np.rot90(stored, k=-1))
    # red (the stored left half) is on top once turned clockwise
    assert upright[0, 0, 0] == 255 and upright[-1, 0, 2] == 255


def test_orientation_reaches_the_resized_tensor(tmp_path):
    _sideways(tmp_path / "photo.jpg", orientation=3)  # 3: upside down -> red on the right
    tensor = load_resized(tmp_path / "photo.jpg", 16)
    assert tensor.shape == (3, 16, 16) and tensor.dtype == torch.uint8
    assert tensor[0, :, -2:].float().mean() > 200 and tensor[2, :, :2].float().mean() > 200


def test_images_without_a_tag_are_read_as_stored(tmp_path):
    pixels = np.random.default_rng(0).integers(0, 255, (8, 16, 3), dtype=np.uint8)
    Image.fromarray(pixels).save(tmp_path / "plain.png")
    assert np.array_equal(np.asarray(load_rgb(tmp_path / "plain.png")), pixels)


def test_predict_reads_images_upright(tmp_path):
    from tieta.deploy.predict import _batches

    _sideways(tmp_path / "photo.jpg", orientation=3)
    (files, images), = _batches([tmp_path / "photo.jpg"], 16, 4, lambda path, why: None)
    assert torch.equal(images[0], load_resized(tmp_path / "photo.jpg", 16))
    assert images[0, 0, :, -2:].float().mean() > 200  # red on the right: turned upside down
