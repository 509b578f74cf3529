"""data.augment: none (the papers' recipe) or timm's RandAugment training transform."""

import numpy as np
import pytest
import torch
from PIL import Image

from tieta import TietaError
from tieta.data.augment import AugmentedImages, RAND_AUGMENT, normalization_of, training_transform
from tieta.data.transforms import Normalize
from tieta.train.config import load_config, validate


def test_none_is_no_transform():
    assert training_transform("none", 32, (0.5,) * 3, (0.5,) * 3) is None


def test_timm_gives_uint8_images_at_the_run_size_that_vary(tmp_path):
    pixels = np.random.default_rng(0).integers(0, 255, (40, 56, 3), dtype=np.uint8)
    Image.fromarray(pixels).save(tmp_path / "a.png")
    augment = training_transform("timm", 32, *normalization_of(Normalize("imagenet")))
    dataset = AugmentedImages([(tmp_path / "a.png", 1)], 32, 2, augment)
    torch.manual_seed(0)
    reads = [dataset[0] for _ in range(4)]
    assert all(image.shape == (3, 32, 32) and image.dtype == torch.uint8 and label == 1 for image, label in reads)
    assert any(not torch.equal(reads[0][0], image) for image, _ in reads[1:])  # a new augmentation each read


def test_timm_transform_is_rand_augment_with_crop_and_flip():
    from timm.data import create_transform

    names = repr(create_transform(32, is_training=True, auto_augment=RAND_AUGMENT, separate=True))
    assert RAND_AUGMENT == "rand-m9-mstd0.5-inc1"
    assert "RandomResizedCrop" in names and "RandomHorizontalFlip" in names and "RandAugment" in names


def test_normalization_is_read_back_from_the_module():
    mean, std = normalization_of(Normalize("inception"))
    assert mean == pytest.approx((0.5,) * 3) and std == pytest.approx((0.5,) * 3)


@pytest.mark.parametrize("key, value, message", [
    ("data.augment", "mixup", "data.augment must be one of none, timm"),
    ("data.holdout", 1.0, "data.holdout, the fraction of images held out for testing, must be between 0 and 1"),
    ("data.holdout", 0, "must be between 0 and 1"),
])
def test_bad_settings_are_refused(key, value, message):
    with pytest.raises(TietaError, match=message):
        validate(load_config(overrides={key: value}))


def test_runs_from_before_the_data_settings_compare_equal():
    from tieta.train.config import RunConfig, comparable, first_difference

    now = RunConfig().to_dict()
    before = {**now, "data": {k: v for k, v in now["data"].items() if k not in ("holdout", "augment")}}
    assert first_difference(comparable(before), comparable(now)) == ""
    augmented = {**now, "data": {**now["data"], "augment": "timm"}}
    assert first_difference(comparable(before), comparable(augmented)) == "data.augment 'none' there, 'timm' now"
