"""mmseg's segmentation pipeline (the ADE20K config DyT's dense-task code uses), image and mask together.

Training, in mmseg's order:

1. Resize: the (long, short) scale (2048, 512) times a ratio drawn uniformly from [0.5, 2.0], the
   image rescaled to fit it keeping its aspect (mmcv's ``imrescale``; bilinear for the image, nearest
   for the mask);
2. RandomCrop to crop x crop: where ``cat_max_ratio`` < 1, a crop is drawn again (up to 10 times)
   while its most frequent class covers ``cat_max_ratio`` or more of its labelled pixels, or it
   holds fewer than two classes; after 10 refusals the next draw is taken as it is;
3. RandomFlip: mirrored with probability 0.5;
4. PhotoMetricDistortion: brightness (+-32), then contrast (x 0.5-1.5) either here or last,
   saturation (x 0.5-1.5) and hue (+-18 of OpenCV's 180) in HSV, each applied half of the time;
5. (Normalize, then) Pad to crop x crop at the bottom and right, the mask with the ignore index.

Evaluation: the image rescaled to fit (2048, 512) keeping its aspect; the mask stays at its own size
(mmseg scores the prediction resized back to it).

Random draws come from a ``numpy.random.RandomState`` in mmseg's order and with its calls, so the same
seed gives mmseg's crops, flips and distortions. The image resize is OpenCV's bilinear in its 8-bit
fixed-point arithmetic (one level off in a few border pixels when upscaling); the mask's nearest
resize picks OpenCV's source pixels exactly. The HSV conversions are transcriptions of OpenCV's 8-bit
ones (``cvtColor`` BGR2HSV / HSV2BGR, hue range 180): RGB -> HSV integer for integer, HSV -> RGB as its
per-pixel code (its vectorised code, in some builds, rounds some values one level lower).
"""

from __future__ import annotations

import numpy as np
import torch

CROP_TRIES = 10  # mmseg's RandomCrop: draws refused for cat_max_ratio before one is taken as it is
BRIGHTNESS_DELTA = 32
CONTRAST_RANGE = (0.5, 1.5)
SATURATION_RANGE = (0.5, 1.5)
HUE_DELTA = 18
_HSV_SHIFT = 12  # OpenCV's fixed-point bits for 8-bit RGB -> HSV
_RESIZE_SCALE = 2048  # OpenCV's INTER_RESIZE_COEF_SCALE: bilinear weights in 11-bit fixed point


def random_scale(scale: tuple[int, int], ratio_range: tuple[float, float], rng: np.random.RandomState
                 ) -> tuple[int, int]:
    """mmseg's Resize._random_sample_ratio: ``scale`` times a ratio drawn from ``ratio_range``."""
    low, high = ratio_range
    ratio = rng.random_sample() * (high - low) + low
    return int(scale[0] * ratio), int(scale[1] * ratio)


def rescale_size(width: int, height: int, scale: tuple[int, int]) -> tuple[int, int]:
    """mmcv's rescale_size: (width, height) scaled by one factor so that the long edge fits max(scale)
    and the short edge min(scale), each rounded half up."""
    factor = min(max(scale) / max(height, width), min(scale) / min(height, width))
    return int(width * float(factor) + 0.5), int(height * float(factor) + 0.5)


def _linear_taps(source: int, target: int) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """OpenCV's INTER_LINEAR taps along one axis: for each output index, the two source indices and
    their weights in 11-bit fixed point (rounded from float32, summing to about 2048), the centres
    aligned (half-pixel) and the borders clamped."""
    scale = 1.0 / (target / source)
    where = ((np.arange(target) + 0.5) * scale - 0.5).astype(np.float32)
    first = np.floor(where).astype(np.int64)
    weight = where - first.astype(np.float32)
    clamped = (first < 0) | (first >= source - 1)
    first = np.clip(first, 0, source - 1)
    weight[clamped] = 0
    second = np.minimum(first + 1, source - 1)
    one = np.float32(1.0)
    return (first, second, np.rint((one - weight) * _RESIZE_SCALE).astype(np.int64),
            np.rint(weight * _RESIZE_SCALE).astype(np.int64))


def resize_image(image: np.ndarray, width: int, height: int) -> np.ndarray:
    """(H, W, 3) uint8 resized to (height, width, 3) bilinearly without antialiasing, in OpenCV's
    fixed-point arithmetic for 8-bit images (INTER_LINEAR: 11-bit weights, a horizontal pass kept as
    integers, the vertical pass as its vectorised code rounds). Downscaling gives OpenCV's pixels;
    upscaling may differ by one level in the first and last rows."""
    if image.shape[:2] == (height, width):
        return image.copy()
    x0, x1, left, right = _linear_taps(image.shape[1], width)
    y0, y1, top, bottom = _linear_taps(image.shape[0], height)
    # int32 throughout, as OpenCV's buffers: pixel x weight < 2^19, weight x (row >> 4) < 2^27
    pixels = torch.from_numpy(np.ascontiguousarray(image)).to(torch.int32)
    left, right, top, bottom = (torch.from_numpy(w).to(torch.int32) for w in (left, right, top, bottom))
    x0, x1, y0, y1 = (torch.from_numpy(i) for i in (x0, x1, y0, y1))
    rows = (pixels[:, x0] * left[None, :, None] + pixels[:, x1] * right[None, :, None]) >> 4  # (H, width, 3)
    top, bottom = top[:, None, None], bottom[:, None, None]
    mixed = (((top * rows[y0]) >> 16) + ((bottom * rows[y1]) >> 16) + 2) >> 2
    return mixed.clamp(0, 255).to(torch.uint8).numpy()


def resize_labels(labels: np.ndarray, width: int, height: int) -> np.ndarray:
    """(H, W) labels resized to (height, width) by nearest neighbour: output pixel i takes source pixel
    floor(i * H / height), as OpenCV's INTER_NEAREST."""
    rows = np.minimum((np.arange(height) * (labels.shape[0] / height)).astype(np.int64), labels.shape[0] - 1)
    cols = np.minimum((np.arange(width) * (labels.shape[1] / width)).astype(np.int64), labels.shape[1] - 1)
    return labels[rows[:, None], cols[None, :]]


def rescale_pair(image: np.ndarray, labels: np.ndarray, scale: tuple[int, int]) -> tuple[np.ndarray, np.ndarray]:
    """Image and mask rescaled to fit ``scale`` keeping their aspect (mmseg's Resize, keep_ratio)."""
    width, height = rescale_size(image.shape[1], image.shape[0], scale)
    return resize_image(image, width, height), resize_labels(labels, width, height)


def crop_box(height: int, width: int, crop: int, rng: np.random.RandomState) -> tuple[int, int, int, int]:
    """mmseg's RandomCrop.get_crop_bbox: (y1, y2, x1, x2), the offsets drawn y first."""
    offset_y = rng.randint(0, max(height - crop, 0) + 1)
    offset_x = rng.randint(0, max(width - crop, 0) + 1)
    return offset_y, offset_y + crop, offset_x, offset_x + crop


def random_crop(image: np.ndarray, labels: np.ndarray, crop: int, cat_max_ratio: float, ignore_index: int,
                rng: np.random.RandomState) -> tuple[np.ndarray, np.ndarray]:
    """mmseg's RandomCrop (see the module's docstring); an image smaller than the crop keeps its size
    along that side."""
    box = crop_box(image.shape[0], image.shape[1], crop, rng)
    if cat_max_ratio < 1.0:
        for _ in range(CROP_TRIES):
            window = labels[box[0]:box[1], box[2]:box[3]]
            classes, counts = np.unique(window, return_counts=True)
            counts = counts[classes != ignore_index]
            if len(counts) > 1 and np.max(counts) / np.sum(counts) < cat_max_ratio:
                break
            box = crop_box(image.shape[0], image.shape[1], crop, rng)
    y1, y2, x1, x2 = box
    return image[y1:y2, x1:x2], labels[y1:y2, x1:x2]


def random_flip(image: np.ndarray, labels: np.ndarray, prob: float, rng: np.random.RandomState
                ) -> tuple[np.ndarray, np.ndarray]:
    """Both mirrored left to right where a draw falls below ``prob`` (mmseg's RandomFlip)."""
    if rng.rand() < prob:
        return image[:, ::-1], labels[:, ::-1]
    return image, labels


def _convert(values: np.ndarray, alpha: float = 1.0, beta: float = 0.0) -> np.ndarray:
    """PhotoMetricDistortion.convert: ``values * alpha + beta`` in float32, clipped, truncated to uint8."""
    return np.clip(values.astype(np.float32) * alpha + beta, 0, 255).astype(np.uint8)


def photometric_distortion(image: np.ndarray, rng: np.random.RandomState) -> np.ndarray:
    """mmseg's PhotoMetricDistortion on an (H, W, 3) uint8 RGB image: brightness, contrast first
    (mode 1) or last (mode 0), saturation, hue; each step drawn on with ``randint(2)``."""
    if rng.randint(2):
        image = _convert(image, beta=rng.uniform(-BRIGHTNESS_DELTA, BRIGHTNESS_DELTA))
    mode = rng.randint(2)
    if mode == 1 and rng.randint(2):
        image = _convert(image, alpha=rng.uniform(*CONTRAST_RANGE))
    if rng.randint(2):
        hsv = rgb_to_hsv(image)
        hsv[..., 1] = _convert(hsv[..., 1], alpha=rng.uniform(*SATURATION_RANGE))
        image = hsv_to_rgb(hsv)
    if rng.randint(2):
        hsv = rgb_to_hsv(image)
        hsv[..., 0] = (hsv[..., 0].astype(int) + rng.randint(-HUE_DELTA, HUE_DELTA)) % 180
        image = hsv_to_rgb(hsv)
    if mode == 0 and rng.randint(2):
        image = _convert(image, alpha=rng.uniform(*CONTRAST_RANGE))
    return image


def _opencv_tables() -> tuple[np.ndarray, np.ndarray]:
    """OpenCV's sdiv_table and hdiv_table180: round((255 << 12) / v), round((180 << 12) / (6 d))."""
    index = np.arange(256, dtype=np.float64)
    with np.errstate(divide="ignore"):
        saturation = np.where(index > 0, np.rint((255 << _HSV_SHIFT) / index), 0)
        hue = np.where(index > 0, np.rint((180 << _HSV_SHIFT) / (6.0 * index)), 0)
    return saturation.astype(np.int64), hue.astype(np.int64)


_SDIV, _HDIV = _opencv_tables()


def rgb_to_hsv(image: np.ndarray) -> np.ndarray:
    """OpenCV's 8-bit RGB -> HSV (H in 0-179, S and V in 0-255), integer for integer."""
    r, g, b = (image[..., channel].astype(np.int64) for channel in range(3))
    v = np.maximum(np.maximum(b, g), r)
    diff = v - np.minimum(np.minimum(b, g), r)
    s = (diff * _SDIV[v] + (1 << (_HSV_SHIFT - 1))) >> _HSV_SHIFT
    h = np.where(v == r, g - b, np.where(v == g, b - r + 2 * diff, r - g + 4 * diff))
    h = (h * _HDIV[diff] + (1 << (_HSV_SHIFT - 1))) >> _HSV_SHIFT
    h = np.where(h < 0, h + 180, h)
    return np.stack([np.clip(h, 0, 255), s, v], axis=-1).astype(np.uint8)


_SECTORS = np.array([[1, 3, 0], [1, 0, 2], [3, 0, 1], [0, 2, 1], [0, 1, 3], [2, 1, 0]])  # (b, g, r) per sector


def hsv_to_rgb(hsv: np.ndarray) -> np.ndarray:
    """OpenCV's 8-bit HSV -> RGB (hue range 180), in float32 as OpenCV computes it, rounded to uint8."""
    h = hsv[..., 0].astype(np.float32) * np.float32(6.0 / 180)
    s = hsv[..., 1].astype(np.float32) * np.float32(1.0 / 255)
    v = hsv[..., 2].astype(np.float32) * np.float32(1.0 / 255)
    h = np.fmod(h, np.float32(6.0))
    h = np.where(h < 0, h + np.float32(6.0), h)
    sector = np.floor(h).astype(np.int64)
    h = h - sector.astype(np.float32)
    outside = (sector < 0) | (sector >= 6)
    sector, h = np.where(outside, 0, sector), np.where(outside, np.float32(0), h)
    one = np.float32(1.0)
    table = np.stack([v, v * (one - s), v * (one - s * h), v * (one - s * (one - h))], axis=-1)  # (..., 4)
    picks = _SECTORS[sector]  # (..., 3): the table entry of b, g and r
    b, g, r = (np.take_along_axis(table, picks[..., k:k + 1], axis=-1)[..., 0] for k in range(3))
    grey = s == 0
    b, g, r = (np.where(grey, v, channel) for channel in (b, g, r))
    rgb = np.stack([r, g, b], axis=-1) * np.float32(255.0)
    return np.clip(np.rint(rgb), 0, 255).astype(np.uint8)


def pad_pair(image: torch.Tensor, labels: torch.Tensor, size: int, fill: torch.Tensor, ignore_index: int
             ) -> tuple[torch.Tensor, torch.Tensor]:
    """Pad (3, H, W) and (H, W) at the bottom and right to size x size (mmseg's Pad after Normalize):
    the image with ``fill`` per channel (the normalisation's mean, so that it normalises to 0 as
    mmseg's pad value 0 does), the mask with the ignore index."""
    height, width = labels.shape
    if height >= size and width >= size:
        return image, labels
    padded = fill.view(3, 1, 1).expand(3, max(size, height), max(size, width)).clone()
    padded[:, :height, :width] = image
    mask = torch.full((max(size, height), max(size, width)), ignore_index, dtype=labels.dtype)
    mask[:height, :width] = labels
    return padded, mask


def training_pair(image: np.ndarray, labels: np.ndarray, config, rng: np.random.RandomState,
                  fill: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """The training pipeline (see the module's docstring) on one decoded pair.

    Args:
        image: (H, W, 3) uint8 RGB; labels: (H, W) uint8.
        config: a tieta.dense.dataset.SegmentationDataConfig.
        fill: (3,) the pad value on the 0-255 scale.
    Returns:
        image (3, C, C) float32 on the 0-255 scale, labels (C, C) int64 (C = config.crop_size).
    """
    image, labels = rescale_pair(image, labels, random_scale(config.scale, config.ratio_range, rng))
    image, labels = random_crop(image, labels, config.crop_size, config.cat_max_ratio, config.ignore_index, rng)
    image, labels = random_flip(image, labels, config.flip_prob, rng)
    if config.photometric:
        image = photometric_distortion(np.ascontiguousarray(image), rng)
    pixels = torch.from_numpy(np.ascontiguousarray(image)).permute(2, 0, 1).float()
    mask = torch.from_numpy(np.ascontiguousarray(labels)).long()
    return pad_pair(pixels, mask, config.crop_size, fill, config.ignore_index)


def evaluation_image(image: np.ndarray, scale: tuple[int, int]) -> torch.Tensor:
    """(H, W, 3) uint8 rescaled to fit ``scale`` keeping its aspect: (3, H', W') float32, 0-255 scale."""
    width, height = rescale_size(image.shape[1], image.shape[0], scale)
    return torch.from_numpy(resize_image(image, width, height)).permute(2, 0, 1).float()
