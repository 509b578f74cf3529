"""The segmentation pipeline against mmseg's code (tests/dense/mmseg_transcription.py): the same seed
gives the same scale, crop, flip and distortion; OpenCV's HSV conversions on known colours."""

import colorsys

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from tieta.dense import transforms
from tieta.dense.dataset import SegmentationDataConfig, mask_labels
from tests.dense import mmseg_transcription as mmseg


def _mask(rng: np.random.RandomState, height: int, width: int, dominant: float) -> np.ndarray:
    """A label map mostly of class 1 (share ``dominant``), with blocks of classes 0, 2, 3 and 255."""
    labels = np.where(rng.rand(height, width) < dominant, 1, rng.randint(0, 4, (height, width)))
    labels[: height // 4, : width // 5] = 255
    return labels.astype(np.uint8)


@pytest.mark.parametrize("seed", range(12))
def test_the_crop_redraws_as_mmseg_does_for_cat_max_ratio(seed):
    rng = np.random.RandomState(100 + seed)
    labels = _mask(rng, 40, 56, dominant=[0.2, 0.9, 1.0][seed % 3])
    image = rng.randint(0, 256, (40, 56, 3)).astype(np.uint8)
    np.random.seed(seed)
    expected = mmseg.RandomCrop((24, 24), cat_max_ratio=0.75)({"img": image, "gt_semantic_seg": labels})
    after = np.random.randint(1 << 30)  # the reference's generator after the crop
    ours = np.random.RandomState(seed)
    cropped, cropped_labels = transforms.random_crop(image, labels, 24, 0.75, 255, ours)
    assert np.array_equal(cropped, expected["img"]) and np.array_equal(cropped_labels, expected["gt_semantic_seg"])
    assert ours.randint(1 << 30) == after  # as many draws: the later steps see the same numbers


def test_a_crop_of_one_class_takes_the_eleventh_draw():
    labels, image = np.ones((30, 30), np.uint8), np.zeros((30, 30, 3), np.uint8)
    labels[0, 0] = 2  # never enough: every crop is 1 (or holds the lone 2, at most 1/100 of it)
    rng, boxes = np.random.RandomState(5), []
    for _ in range(transforms.CROP_TRIES + 1):
        boxes.append(transforms.crop_box(30, 30, 10, rng))
    _, cropped = transforms.random_crop(image, labels, 10, 0.75, 255, np.random.RandomState(5))
    y1, y2, x1, x2 = boxes[-1]
    assert np.array_equal(cropped, labels[y1:y2, x1:x2])


def test_a_smaller_image_keeps_its_size_and_is_padded_with_the_mean_and_the_ignore_index():
    image, labels = np.full((10, 14, 3), 7, np.uint8), np.ones((10, 14), np.uint8)
    cropped, cropped_labels = transforms.random_crop(image, labels, 12, 1.0, 255, np.random.RandomState(0))
    assert cropped.shape == (10, 12, 3) and cropped_labels.shape == (10, 12)
    fill = torch.tensor([1.0, 2.0, 3.0])
    padded, mask = transforms.pad_pair(torch.from_numpy(cropped.copy()).permute(2, 0, 1).float(),
                                       torch.from_numpy(cropped_labels.copy()).long(), 12, fill, 255)
    assert padded.shape == (3, 12, 12) and mask.shape == (12, 12)
    assert (padded[:, :10] == 7).all() and torch.equal(padded[:, 10:, 0], fill.view(3, 1).expand(3, 2))
    assert (mask[:10] == 1).all() and (mask[10:] == 255).all()


@pytest.mark.parametrize("size", [(500, 375), (375, 500), (2048, 100), (60, 90)])
def test_the_random_scale_and_the_rescaled_size_are_mmcvs(size):
    for seed in range(5):
        np.random.seed(seed)
        scale, _ = mmseg.random_sample_ratio((2048, 512), (0.5, 2.0))
        assert transforms.random_scale((2048, 512), (0.5, 2.0), np.random.RandomState(seed)) == scale
        assert transforms.rescale_size(*size, scale) == mmseg.rescale_size(size, scale)


def test_the_mask_is_resized_by_nearest_neighbour_and_the_image_bilinearly():
    rng = np.random.RandomState(0)
    labels = rng.randint(0, 5, (13, 17)).astype(np.uint8)
    for width, height in ((40, 30), (6, 5), (17, 13)):
        nearest = F.interpolate(torch.from_numpy(labels)[None, None].float(), size=(height, width), mode="nearest")
        assert np.array_equal(transforms.resize_labels(labels, width, height), nearest[0, 0].byte().numpy())
    image = rng.randint(0, 256, (13, 17, 3)).astype(np.uint8)
    resized = transforms.resize_image(image, 34, 26)
    assert resized.shape == (26, 34, 3) and resized.dtype == np.uint8
    # upsampling by 2, half-pixel centres: output 1 lies at source 0.25, output 2 at 0.75
    p0, p1 = image[0, 0].astype(float), image[0, 1].astype(float)
    assert np.abs(resized[0, 1] - (0.75 * p0 + 0.25 * p1)).max() <= 0.5 + 1e-4
    assert np.abs(resized[0, 2] - (0.25 * p0 + 0.75 * p1)).max() <= 0.5 + 1e-4
    assert np.array_equal(resized[0, 0], image[0, 0])


@pytest.mark.parametrize("seed", range(16))
def test_the_photometric_distortion_is_mmsegs(seed):
    image = np.random.RandomState(seed).randint(0, 256, (9, 11, 3)).astype(np.uint8)
    reference = mmseg.PhotoMetricDistortion(transforms.rgb_to_hsv, transforms.hsv_to_rgb)
    np.random.seed(seed)
    expected = reference({"img": image.copy()})["img"]
    assert np.array_equal(transforms.photometric_distortion(image.copy(), np.random.RandomState(seed)), expected)


def test_the_hsv_conversions_are_opencvs_on_known_colours():
    colours = np.array([[[255, 0, 0], [0, 255, 0], [0, 0, 255], [255, 255, 0], [128, 128, 128], [0, 0, 0],
                         [255, 255, 255], [255, 0, 255]]], dtype=np.uint8)
    # cv2.cvtColor(colours, cv2.COLOR_RGB2HSV): hue in 0-179 (degrees / 2)
    expected = [[0, 255, 255], [60, 255, 255], [120, 255, 255], [30, 255, 255], [0, 0, 128], [0, 0, 0],
                [0, 0, 255], [150, 255, 255]]
    assert transforms.rgb_to_hsv(colours)[0].tolist() == expected
    assert np.array_equal(transforms.hsv_to_rgb(transforms.rgb_to_hsv(colours)), colours)


def test_the_hsv_conversions_round_close_to_the_exact_ones():
    rgb = np.random.RandomState(0).randint(0, 256, (1, 500, 3)).astype(np.uint8)
    hsv = transforms.rgb_to_hsv(rgb)
    exact = np.array([colorsys.rgb_to_hsv(*(pixel / 255.0)) for pixel in rgb[0]])
    assert np.abs(hsv[0, :, 2] - exact[:, 2] * 255).max() < 1e-9  # V is max(R, G, B)
    assert np.abs(hsv[0, :, 1] - exact[:, 1] * 255).max() < 0.6  # S rounded (in 12-bit fixed point)
    hue = np.abs(hsv[0, :, 0] - exact[:, 0] * 180)
    assert np.minimum(hue, 180 - hue).max() < 0.6  # H rounded (0 and 180 are one hue)
    back = transforms.hsv_to_rgb(hsv).astype(int)
    assert np.abs(back - rgb).max() <= 8  # H's 2-degree steps on saturated colours


def test_labels_are_reduced_as_mmsegs_load_annotations(tmp_path):
    from PIL import Image

    labels = np.array([[0, 1, 2, 150], [254, 255, 3, 0]], dtype=np.uint8)
    Image.fromarray(labels).save(tmp_path / "mask.png")
    assert np.array_equal(mask_labels(tmp_path / "mask.png", True), mmseg.reduce_zero_label(labels))
    assert mask_labels(tmp_path / "mask.png", True).tolist() == [[255, 0, 1, 149], [253, 255, 2, 255]]
    assert np.array_equal(mask_labels(tmp_path / "mask.png", False), labels)


@pytest.mark.parametrize("seed", range(6))
def test_the_training_pipeline_draws_as_mmseg_in_its_order(seed):
    """Resize, crop, flip and distortion chained as mmseg's train_pipeline, on one shared seed."""
    rng = np.random.RandomState(50 + seed)
    image = rng.randint(0, 256, (30, 44, 3)).astype(np.uint8)
    labels = _mask(rng, 30, 44, dominant=0.5)
    config = SegmentationDataConfig(crop_size=32, scale=(128, 32))
    np.random.seed(seed)
    scale, _ = mmseg.random_sample_ratio(config.scale, config.ratio_range)
    width, height = mmseg.rescale_size((44, 30), scale)
    results = {"img": transforms.resize_image(image, width, height),
               "gt_semantic_seg": transforms.resize_labels(labels, width, height)}
    results = mmseg.RandomCrop((32, 32), 0.75)(results)
    results = mmseg.random_flip(results, 0.5)
    results = mmseg.PhotoMetricDistortion(transforms.rgb_to_hsv, transforms.hsv_to_rgb)(
        {**results, "img": np.ascontiguousarray(results["img"])})
    fill = torch.tensor([0.5, 0.5, 0.5]) * 255
    ours, mask = transforms.training_pair(image, labels, config, np.random.RandomState(seed), fill)
    h, w = results["gt_semantic_seg"].shape
    assert ours.shape == (3, 32, 32) and mask.shape == (32, 32)
    assert torch.equal(ours[:, :h, :w], torch.from_numpy(results["img"].copy()).permute(2, 0, 1).float())
    assert torch.equal(mask[:h, :w], torch.from_numpy(results["gt_semantic_seg"].copy()).long())
    assert (mask[h:] == 255).all() and (mask[:, w:] == 255).all() and (ours[:, h:] == 127.5).all()


def test_the_evaluation_resize_keeps_the_aspect():
    image = np.zeros((375, 500, 3), np.uint8)
    assert transforms.evaluation_image(image, (2048, 512)).shape == (3, 512, 683)
    assert transforms.evaluation_image(np.zeros((100, 3000, 3), np.uint8), (2048, 512)).shape == (3, 68, 2048)


def test_a_palette_mask_is_read_as_its_indices(tmp_path):
    from PIL import Image

    labels = np.array([[0, 1, 2], [3, 2, 1]], dtype=np.uint8)
    mask = Image.new("P", (3, 2))
    mask.putdata(labels.flatten().tolist())
    mask.putpalette([255, 0, 0, 0, 255, 0, 0, 0, 255, 9, 9, 9] + [0] * (252 * 3))  # colours unlike the indices
    mask.save(tmp_path / "mask.png")
    assert Image.open(tmp_path / "mask.png").mode == "P"
    assert np.array_equal(mask_labels(tmp_path / "mask.png", False), labels)


def test_against_opencv_where_it_is_installed():
    """mmseg resizes and converts colours with OpenCV; tieta does not depend on it, so this runs only
    where it is installed (pip install opencv-python-headless)."""
    cv2 = pytest.importorskip("cv2")
    rng = np.random.RandomState(0)
    for height, width in ((30, 44), (100, 37), (375, 500)):
        image = rng.randint(0, 256, (height, width, 3)).astype(np.uint8)
        labels = rng.randint(0, 5, (height, width)).astype(np.uint8)
        for new_width, new_height in ((20, 15), (57, 83), (88, 60), (683, 512)):
            ours = transforms.resize_image(image, new_width, new_height).astype(int)
            theirs = cv2.resize(image, (new_width, new_height), interpolation=cv2.INTER_LINEAR)
            if new_width <= width and new_height <= height:
                assert np.array_equal(ours, theirs)
            else:  # upscaling: a few border pixels one level off
                assert np.abs(ours - theirs).max() <= 1 and (ours != theirs).mean() < 0.02
            assert np.array_equal(transforms.resize_labels(labels, new_width, new_height),
                                  cv2.resize(labels, (new_width, new_height), interpolation=cv2.INTER_NEAREST))
    colours = rng.randint(0, 256, (300, 300, 3)).astype(np.uint8)
    assert np.array_equal(transforms.rgb_to_hsv(colours), cv2.cvtColor(colours, cv2.COLOR_RGB2HSV))
    hsv = colours.copy()
    hsv[..., 0] %= 180
    one_by_one = np.stack([cv2.cvtColor(hsv[:1, i:i + 1], cv2.COLOR_HSV2RGB)[0, 0] for i in range(300)])
    assert np.array_equal(transforms.hsv_to_rgb(hsv[:1])[0], one_by_one)  # OpenCV's per-pixel code
    assert np.abs(transforms.hsv_to_rgb(hsv).astype(int) - cv2.cvtColor(hsv, cv2.COLOR_HSV2RGB)).max() <= 1
