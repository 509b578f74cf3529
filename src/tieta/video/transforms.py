"""The reference's clip transforms (DyT's video loaders, from SlowFast): training augmentation, the
same for every frame of a clip, and the evaluation views.

- Kinetics-400 style training: the short side scaled to a random size in [S, 1.15 S] (bicubic), a
  random S x S crop, mirrored half of the time.
- Something-Something-v2 style training: RandAugment ``rand-m7-n4-mstd0.5-inc1`` on the frames as
  decoded (timm's operations; one draw of operations and magnitudes for the whole clip), then a random
  resized crop of 8-100 % of the area and aspect 3/4-4/3 to S x S (bicubic); never mirrored, since
  SSv2's classes tell left from right ("pushing something from left to right").
- Evaluation: each temporal view's short side scaled to S (bicubic), then one centred S x S crop, or
  three along the long side (start, middle, end).

Clips come in as (T, 3, H, W) uint8 and leave as float32 on the 0-255 scale: the reference normalises
before it resizes, and resizing is linear (its weights sum to one), so normalising the result
afterwards, per batch, as images are (tieta.data.transforms.Normalize), gives the same numbers. The
bicubic overshoot past 0 or 255 is kept, as the reference keeps it.
"""

from __future__ import annotations

import contextlib
import math
import random
from dataclasses import dataclass
from typing import Iterator

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image
from timm.data.auto_augment import rand_augment_transform

from tieta.errors import TietaError

INTERPOLATION = "bicubic"  # the reference loaders' interpolation, for every resize
K400_SCALES = (1.0, 1.15)  # short side, as multiples of S
SSV2_SCALES = (0.08, 1.0)  # crop area, as shares of the frame
CROP_RATIOS = (3 / 4, 4 / 3)
SSV2_RAND_AUGMENT = "rand-m7-n4-mstd0.5-inc1"  # 4 operations of magnitude 7 +- 0.5, increasing severity
SPATIAL_VIEWS = (1, 3)


@dataclass
class Draws:
    """The random generators of one clip: ``numpy`` stands for the reference's ``np.random``,
    ``python`` for its ``random`` module (a seeded pair replays the reference's draws)."""

    numpy: np.random.RandomState
    python: random.Random

    @classmethod
    def from_seed(cls, seed: int) -> "Draws":
        return cls(np.random.RandomState(seed % 2**32), random.Random(seed))


def k400_training(frames: torch.Tensor, size: int, draws: Draws) -> torch.Tensor:
    """Short-side scale jitter, a random crop and a random mirror, as the reference's K400 loader.

    Args:
        frames: (T, 3, H, W) uint8.
    Returns:
        (T, 3, size, size) float32, 0-255 scale.
    """
    clip = short_side_jitter(frames.float(), round(size * K400_SCALES[0]), round(size * K400_SCALES[1]), draws)
    clip = random_crop(clip, size, draws)
    return clip.flip(-1) if draws.numpy.uniform() < 0.5 else clip  # (the reference draws it from torch)


def ssv2_training(frames: torch.Tensor, size: int, draws: Draws) -> torch.Tensor:
    """RandAugment on the whole clip, then a random resized crop, as the reference's SSv2 loader.

    Args:
        frames: (T, 3, H, W) uint8.
    Returns:
        (T, 3, size, size) float32, 0-255 scale.
    """
    augmented = clip_rand_augment(frames, SSV2_RAND_AUGMENT, draws)
    return random_resized_crop(augmented.float(), size, draws)


def short_side_jitter(clip: torch.Tensor, min_size: int, max_size: int, draws: Draws) -> torch.Tensor:
    """The clip resized so that its short side is a random size in [min_size, max_size] (SlowFast's
    ``random_short_side_scale_jitter``: the long side floored, nothing done where it already fits).

    Args:
        clip: (T, 3, H, W) float.
    """
    target = int(round(draws.numpy.uniform(min_size, max_size)))
    height, width = clip.shape[-2:]
    if (width <= height and width == target) or (height <= width and height == target):
        return clip
    if width < height:
        new_height, new_width = int(math.floor(height / width * target)), target
    else:
        new_height, new_width = target, int(math.floor(width / height * target))
    return F.interpolate(clip, size=(new_height, new_width), mode=INTERPOLATION, align_corners=False)


def random_crop(clip: torch.Tensor, size: int, draws: Draws) -> torch.Tensor:
    """A random size x size crop of every frame at one place (SlowFast's ``random_crop``: its offsets
    are drawn below the largest, as there)."""
    height, width = clip.shape[-2:]
    if height == size and width == size:
        return clip
    top = int(draws.numpy.randint(0, height - size)) if height > size else 0
    left = int(draws.numpy.randint(0, width - size)) if width > size else 0
    return clip[..., top:top + size, left:left + size]


def random_resized_crop(clip: torch.Tensor, size: int, draws: Draws, scale: tuple[float, float] = SSV2_SCALES,
                        ratio: tuple[float, float] = CROP_RATIOS) -> torch.Tensor:
    """A random crop of ``scale`` of the area and aspect ``ratio`` (log-uniform), resized to size x size
    (SlowFast's ``random_resized_crop``: ten tries, then the centred crop of the nearest aspect).

    Args:
        clip: (T, 3, H, W) float.
    """
    height, width = clip.shape[-2:]
    top, left, crop_height, crop_width = _crop_box(height, width, scale, ratio, draws.python)
    cropped = clip[..., top:top + crop_height, left:left + crop_width]
    return F.interpolate(cropped, size=(size, size), mode=INTERPOLATION, align_corners=False)


def _crop_box(height: int, width: int, scale: tuple[float, float], ratio: tuple[float, float],
              rng: random.Random) -> tuple[int, int, int, int]:
    """(top, left, height, width) of a random resized crop."""
    for _ in range(10):
        area = rng.uniform(*scale) * height * width
        aspect = math.exp(rng.uniform(math.log(ratio[0]), math.log(ratio[1])))
        crop_width, crop_height = int(round(math.sqrt(area * aspect))), int(round(math.sqrt(area / aspect)))
        if 0 < crop_width <= width and 0 < crop_height <= height:
            return rng.randint(0, height - crop_height), rng.randint(0, width - crop_width), crop_height, crop_width
    aspect = width / height
    if aspect < min(ratio):
        crop_width, crop_height = width, int(round(width / min(ratio)))
    elif aspect > max(ratio):
        crop_width, crop_height = int(round(height * max(ratio))), height
    else:
        crop_width, crop_height = width, height
    return (height - crop_height) // 2, (width - crop_width) // 2, crop_height, crop_width


def clip_rand_augment(frames: torch.Tensor, config: str, draws: Draws) -> torch.Tensor:
    """timm's RandAugment ``config`` applied identically to every frame: the reference draws the
    operations and magnitudes once per clip and applies them to each frame; here each frame replays
    one seed in timm's transform, which draws the same. As the reference's: the fill is grey (128),
    the translation constant 45 % of the short side, the interpolation bicubic.

    timm draws from the global ``random`` and ``np.random``: they are seeded for each frame and put
    back as they were afterwards (a DataLoader's workers are processes, so no thread shares them).

    Args:
        frames: (T, 3, H, W) uint8.
    Returns:
        (T, 3, H, W) uint8.
    """
    height, width = frames.shape[-2:]
    hparams = {"translate_const": int(min(height, width) * 0.45), "interpolation": Image.Resampling.BICUBIC}
    transform = rand_augment_transform(config, hparams)
    seed = draws.python.getrandbits(32)
    out = []
    for frame in frames.permute(0, 2, 3, 1).numpy():
        with _global_seed(seed):
            image = transform(Image.fromarray(frame))
        out.append(torch.from_numpy(np.asarray(image, dtype=np.uint8).copy()))
    return torch.stack(out).permute(0, 3, 1, 2)


@contextlib.contextmanager
def _global_seed(seed: int) -> Iterator[None]:
    """``random`` and ``np.random`` seeded with ``seed`` inside, as they were outside."""
    python_state, numpy_state = random.getstate(), np.random.get_state()
    random.seed(seed)
    np.random.seed(seed)
    try:
        yield
    finally:
        random.setstate(python_state)
        np.random.set_state(numpy_state)


def evaluation_views(clips: list[torch.Tensor], size: int, spatial_views: int) -> torch.Tensor:
    """The views of a clip at evaluation: each temporal view resized (short side ``size``) and cut
    into ``spatial_views`` crops, in the reference's order (every crop of the first temporal view first).

    Args:
        clips: one (T, 3, H, W) uint8 tensor per temporal view.
        spatial_views: 1 (the centre) or 3 (start, middle and end of the long side).
    Returns:
        (len(clips) * spatial_views, T, 3, size, size) float32, 0-255 scale.
    """
    if spatial_views not in SPATIAL_VIEWS:
        raise TietaError(f"the number of spatial views must be 1 or 3, got {spatial_views}")
    views = []
    for frames in clips:
        height, width = frames.shape[-2:]
        if height < width:
            new_height, new_width = size, width * size // height
        else:
            new_height, new_width = height * size // width, size
        clip = F.interpolate(frames.float(), size=(new_height, new_width), mode=INTERPOLATION, align_corners=False)
        if spatial_views == 1:
            top, left = (new_height - size) // 2, (new_width - size) // 2
            views.append(clip[..., top:top + size, left:left + size])
            continue
        margin = max(new_height, new_width) - size
        for start in (0, margin // 2, margin):
            views.append(clip[..., start:start + size, :] if new_height > new_width else
                         clip[..., :, start:start + size])
    return torch.stack(views)
