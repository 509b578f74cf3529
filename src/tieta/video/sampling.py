"""Which frames of a clip a model sees: the reference's frame sampling (DyT's video loaders,
``_random_sample_frame_idx`` and ``get_temporal_crops_index``), as pure functions of the clip's
frame count, the settings and a random generator.

Two styles, told apart by the sampling rate:

- a stride (``rate > 0``, Kinetics-400: 8 frames at a rate of 16): frames ``start, start + rate, ...``;
  in training the start is random, at evaluation ``views`` starts spread evenly over the clip. A clip
  shorter than the span repeats its last frame.
- segments (``rate == 0``, Something-Something-v2): the clip cut into ``frames`` equal segments; in
  training a random frame of each, at evaluation the middle of each (one view only).

``rng`` is a ``numpy.random.RandomState``: its ``randint`` draws what the reference draws from
``np.random``, so a seeded generator reproduces the reference's indices exactly.
"""

from __future__ import annotations

import numpy as np

from tieta.errors import TietaError


def training_indices(count: int, frames: int, rate: int, rng: np.random.RandomState) -> list[int]:
    """``frames`` frame indices into a clip of ``count`` frames, drawn for one training step.

    Args:
        count: the clip's number of frames (at least 1).
        frames: T, the number of frames the model sees.
        rate: the stride between them; 0 for segments.
    """
    _check(count, frames, rate)
    if rate == 0:
        return [int(rng.randint(start, end + 1)) for start, end in _segments(count, frames)]
    if rate * (frames - 1) + 1 >= count:  # the span does not fit: from frame 0, the last frame repeated
        indices: list[int] = []
        for i in range(frames):
            indices.append(i * rate if i * rate < count else indices[-1])
        return indices
    start = int(rng.randint(count - rate * (frames - 1)))
    return list(range(start, start + rate * frames, rate))


def evaluation_indices(count: int, frames: int, rate: int, views: int) -> list[list[int]]:
    """The frame indices of each of ``views`` temporal views of a clip of ``count`` frames.

    With a stride, the views start evenly from the first frame to the last possible start (one view:
    the middle one); with segments there is one view, each segment's middle frame.

    Raises:
        TietaError: several views with segments (the reference has one).
    """
    _check(count, frames, rate)
    if views < 1:
        raise TietaError(f"the number of temporal views must be at least 1, got {views}")
    if rate == 0:
        if views != 1:
            raise TietaError(f"segment sampling (sampling rate 0) has one temporal view, not {views}")
        return [[(start + end) // 2 for start, end in _segments(count, frames)]]
    slack = max(count - ((frames - 1) * rate + 1), 0)  # how far the span can slide
    starts = [slack // 2] if views == 1 else [round(slack / (views - 1) * i) for i in range(views)]
    return [[min(offset + start, count - 1) for offset in range(0, frames * rate, rate)] for start in starts]


def _segments(count: int, frames: int) -> list[tuple[int, int]]:
    """(first, last) frame of each of ``frames`` equal segments of frames 0 to count - 1."""
    size = (count - 1) / frames
    return [(round(size * i), round(size * (i + 1))) for i in range(frames)]


def _check(count: int, frames: int, rate: int) -> None:
    if count < 1 or frames < 1 or rate < 0:
        raise TietaError(f"frame sampling needs a clip with frames, at least one frame to take and a sampling rate "
                         f"of at least 0, got {count} frames, {frames} to take, rate {rate}")
