"""Clip transforms against transcriptions of the reference's (DyT's video_datasets/transform.py, from
SlowFast, and the evaluation path of its VideoDataset.__getitem__), on normalised clips as there:
tieta resizes 0-255 frames and normalises afterwards, which gives the same numbers."""

import math
import random

import numpy as np
import pytest
import torch
from PIL import Image

from tieta.data.transforms import Normalize, normalization_numbers
from tieta.video.clips import read_clip
from tieta.video.transforms import (
    Draws, clip_rand_augment, evaluation_views, k400_training, random_crop, random_resized_crop, short_side_jitter,
    ssv2_training,
)
from tests.video.clipdata import clip_folders  # noqa: F401  (a fixture)

MEAN, STD = (torch.tensor(values) for values in normalization_numbers("inception"))


def normalised_reference_layout(frames: torch.Tensor) -> torch.Tensor:
    """(T, 3, H, W) uint8 -> the reference's (C, T, H, W), (x / 255 - mean) / std, as it builds it."""
    frames = frames.permute(0, 2, 3, 1).float() / 255.
    return ((frames - MEAN) / STD).permute(3, 0, 1, 2)


def normalised(clip: torch.Tensor) -> torch.Tensor:
    """tieta's (..., T, 3, S, S) 0-255 output, normalised per batch, in the reference's (..., C, T, S, S)."""
    return Normalize("inception")(clip).transpose(-4, -3)


# --- the reference, transcribed ---------------------------------------------------------------

def ref_random_short_side_scale_jitter(images, min_size, max_size, interpolation='bilinear'):
    size = int(round(np.random.uniform(min_size, max_size)))
    height = images.shape[2]
    width = images.shape[3]
    if (width <= height and width == size) or (height <= width and height == size):
        return images
    new_width = size
    new_height = size
    if width < height:
        new_height = int(math.floor((float(height) / width) * size))
    else:
        new_width = int(math.floor((float(width) / height) * size))
    return torch.nn.functional.interpolate(images, size=(new_height, new_width), mode=interpolation,
                                           align_corners=False)


def ref_random_crop(images, size):
    if images.shape[2] == size and images.shape[3] == size:
        return images
    height = images.shape[2]
    width = images.shape[3]
    y_offset = 0
    if height > size:
        y_offset = int(np.random.randint(0, height - size))
    x_offset = 0
    if width > size:
        x_offset = int(np.random.randint(0, width - size))
    return images[:, :, y_offset: y_offset + size, x_offset: x_offset + size]


def ref_get_param_spatial_crop(scale, ratio, height, width, num_repeat=10, log_scale=True, switch_hw=False):
    for _ in range(num_repeat):
        area = height * width
        target_area = random.uniform(*scale) * area
        if log_scale:
            log_ratio = (math.log(ratio[0]), math.log(ratio[1]))
            aspect_ratio = math.exp(random.uniform(*log_ratio))
        else:
            aspect_ratio = random.uniform(*ratio)
        w = int(round(math.sqrt(target_area * aspect_ratio)))
        h = int(round(math.sqrt(target_area / aspect_ratio)))
        if np.random.uniform() < 0.5 and switch_hw:
            w, h = h, w
        if 0 < w <= width and 0 < h <= height:
            i = random.randint(0, height - h)
            j = random.randint(0, width - w)
            return i, j, h, w
    in_ratio = float(width) / float(height)
    if in_ratio < min(ratio):
        w = width
        h = int(round(w / min(ratio)))
    elif in_ratio > max(ratio):
        h = height
        w = int(round(h * max(ratio)))
    else:
        w = width
        h = height
    i = (height - h) // 2
    j = (width - w) // 2
    return i, j, h, w


def ref_random_resized_crop(images, target_height, target_width, scale=(0.08, 1.0), ratio=(3.0 / 4.0, 4.0 / 3.0),
                            interpolation='bilinear'):
    height = images.shape[2]
    width = images.shape[3]
    i, j, h, w = ref_get_param_spatial_crop(scale, ratio, height, width)
    cropped = images[:, :, i: i + h, j: j + w]
    return torch.nn.functional.interpolate(cropped, size=(target_height, target_width), mode=interpolation,
                                           align_corners=False)


def ref_evaluation(frames, spatial_size, num_spatial_views, interpolation='bicubic'):
    """One temporal view's crops: the resize of __getitem__ and _generate_spatial_crops."""
    if frames.size(-2) < frames.size(-1):
        new_width = frames.size(-1) * spatial_size // frames.size(-2)
        new_height = spatial_size
    else:
        new_height = frames.size(-2) * spatial_size // frames.size(-1)
        new_width = spatial_size
    frames = torch.nn.functional.interpolate(frames, size=(new_height, new_width), mode=interpolation,
                                             align_corners=False)
    if num_spatial_views == 1:
        assert min(frames.size(-2), frames.size(-1)) >= spatial_size
        h_st = (frames.size(-2) - spatial_size) // 2
        w_st = (frames.size(-1) - spatial_size) // 2
        h_ed, w_ed = h_st + spatial_size, w_st + spatial_size
        return [frames[:, :, h_st: h_ed, w_st: w_ed]]
    assert min(frames.size(-2), frames.size(-1)) == spatial_size
    crops = []
    margin = max(frames.size(-2), frames.size(-1)) - spatial_size
    for st in (0, margin // 2, margin):
        ed = st + spatial_size
        if frames.size(-2) > frames.size(-1):
            crops.append(frames[:, :, st: ed, :])
        else:
            crops.append(frames[:, :, :, st: ed])
    return crops


def ref_clip_rand_augment(images, transform):
    """The reference's RandAugment on a list of frames: ops drawn once, each op's draws once, every
    frame changed alike (its AugmentOp.__call__ on a list), with timm's operations."""
    ops = np.random.choice(transform.ops, transform.num_layers, replace=transform.choice_weights is None,
                           p=transform.choice_weights)
    for op in ops:
        if op.prob < 1.0 and random.random() > op.prob:
            continue
        magnitude = op.magnitude
        if op.magnitude_std and op.magnitude_std > 0:
            magnitude = random.gauss(magnitude, op.magnitude_std)
        magnitude = min(10.0, max(0, magnitude))
        level_args = op.level_fn(magnitude, op.hparams) if op.level_fn is not None else ()
        images = [op.aug_fn(img, *level_args, **op.kwargs) for img in images]
    return images


# --- the tests ------------------------------------------------------------------------------------

def frames_of(shape, seed=0):
    """(T, 3, H, W) uint8 with smooth content (bicubic on noise overshoots far more than on photos)."""
    generator = torch.Generator().manual_seed(seed)
    small = torch.rand(shape[0], 3, shape[2] // 4, shape[3] // 4, generator=generator) * 255
    return torch.nn.functional.interpolate(small, size=shape[2:], mode="bilinear").round().to(torch.uint8)


@pytest.mark.parametrize("shape", [(4, 3, 48, 64), (4, 3, 64, 40), (3, 3, 32, 32)])
def test_scale_jitter_and_crop_are_the_references(shape):
    frames = frames_of(shape)
    for seed in range(6):
        np.random.seed(seed)
        clip = ref_random_short_side_scale_jitter(normalised_reference_layout(frames), 32, round(32 * 1.15),
                                                  interpolation="bicubic")
        expected = ref_random_crop(clip, 32)
        draws = Draws.from_seed(seed)
        found = random_crop(short_side_jitter(frames.float(), 32, round(32 * 1.15), draws), 32, draws)
        torch.testing.assert_close(normalised(found), expected, atol=1e-4, rtol=0)


@pytest.mark.parametrize("shape", [(4, 3, 48, 64), (2, 3, 64, 40), (2, 3, 200, 20)])
def test_random_resized_crop_is_the_references(shape):
    frames = frames_of(shape)
    for seed in range(6):
        random.seed(seed)
        expected = ref_random_resized_crop(normalised_reference_layout(frames), 32, 32, interpolation="bicubic")
        found = random_resized_crop(frames.float(), 32, Draws.from_seed(seed))
        torch.testing.assert_close(normalised(found), expected, atol=1e-4, rtol=0)


@pytest.mark.parametrize("shape", [(4, 3, 48, 64), (4, 3, 64, 40), (2, 3, 40, 40)])
@pytest.mark.parametrize("spatial_views", [1, 3])
def test_evaluation_views_are_the_references(shape, spatial_views):
    temporal = [frames_of(shape, seed) for seed in range(2)]  # two temporal views
    expected = torch.stack(sum((ref_evaluation(normalised_reference_layout(frames), 32, spatial_views)
                                for frames in temporal), []))
    found = evaluation_views(temporal, 32, spatial_views)
    assert found.shape == (2 * spatial_views, shape[0], 3, 32, 32) and found.dtype == torch.float32
    torch.testing.assert_close(normalised(found), expected, atol=1e-4, rtol=0)


def test_three_spatial_views_run_along_the_long_side():
    frames = torch.arange(64, dtype=torch.uint8).view(1, 1, 1, 64).expand(2, 3, 32, 64).contiguous()
    views = evaluation_views([frames], 32, 3)
    assert [int(view[0, 0, 0, 0].round()) for view in views] == [0, 16, 32]  # left, middle, right


def test_rand_augment_is_the_references_and_alike_on_every_frame(clip_folders):
    from timm.data.auto_augment import rand_augment_transform
    clip = read_clip(next((clip_folders / "train" / "class_0").iterdir()))
    frames = clip.rgb(list(range(0, 16, 2)))  # 8 frames of a real clip, (T, 3, 64, 64)
    changed = 0
    for seed in range(8):
        draws = Draws.from_seed(seed)
        clip_seed = random.Random(seed).getrandbits(32)  # what clip_rand_augment draws first
        python_state, numpy_state = random.getstate(), np.random.get_state()
        found = clip_rand_augment(frames, "rand-m7-n4-mstd0.5-inc1", draws)
        assert random.getstate() == python_state  # the global generators are left as they were
        assert all(np.array_equal(a, b) for a, b in zip(np.random.get_state(), numpy_state))
        random.seed(clip_seed)
        np.random.seed(clip_seed)
        transform = rand_augment_transform("rand-m7-n4-mstd0.5-inc1",
                                           {"translate_const": int(64 * 0.45), "interpolation": Image.BICUBIC})
        images = ref_clip_rand_augment([Image.fromarray(frame) for frame in frames.permute(0, 2, 3, 1).numpy()],
                                       transform)
        expected = torch.stack([torch.from_numpy(np.asarray(image).copy()) for image in images]).permute(0, 3, 1, 2)
        assert found.dtype == torch.uint8 and torch.equal(found, expected), seed
        changed += not torch.equal(found, frames)
    assert changed >= 4


def test_rand_augment_changes_identical_frames_identically():
    frames = frames_of((1, 3, 32, 32)).expand(5, 3, 32, 32)
    for seed in range(5):
        found = clip_rand_augment(frames, "rand-m7-n4-mstd0.5-inc1", Draws.from_seed(seed))
        assert all(torch.equal(found[0], frame) for frame in found)


def test_training_transforms_give_square_float_clips():
    frames = frames_of((8, 3, 48, 64))
    mirrored = 0
    for seed in range(8):
        draws = Draws.from_seed(seed)
        clip = k400_training(frames, 32, draws)
        assert clip.shape == (8, 3, 32, 32) and clip.dtype == torch.float32
        same = Draws.from_seed(seed)
        again = random_crop(short_side_jitter(frames.float(), 32, 37, same), 32, same)
        assert torch.equal(clip, again) or torch.equal(clip, again.flip(-1))
        mirrored += torch.equal(clip, again.flip(-1))
        assert ssv2_training(frames, 32, Draws.from_seed(seed)).shape == (8, 3, 32, 32)
    assert 0 < mirrored < 8  # mirrored half of the time


def test_normalize_takes_clips_and_views_as_it_takes_images():
    clips = torch.rand(2, 3, 4, 3, 8, 8) * 255  # (B, V, T, 3, H, W)
    normalize = Normalize("imagenet")
    torch.testing.assert_close(normalize(clips), normalize(clips.reshape(-1, 3, 8, 8)).reshape(clips.shape))
