"""Frame sampling against a literal transcription of the reference's index code (DyT's
video_datasets/k400.py and sthv2_dataset.py, VideoDataset._random_sample_frame_idx and
get_temporal_crops_index): the same indices for the same draws from np.random."""

import itertools

import numpy as np
import pytest

from tieta import TietaError
from tieta.video.sampling import evaluation_indices, training_indices


class Reference:
    """The reference's index code, transcribed line for line (self.num_frames etc. as attributes)."""

    def __init__(self, num_frames, sampling_rate, num_temporal_views=1):
        self.num_frames, self.sampling_rate, self.num_temporal_views = num_frames, sampling_rate, num_temporal_views

    def get_temporal_crops_index(self, len_frames):
        if self.sampling_rate <= 0:
            assert self.num_temporal_views == 1, (
                'temporal multi-crop for uniform sampling is not supported.'
            )
            seg_size = (len_frames - 1) / self.num_frames
            frame_indices = []
            for i in range(self.num_frames):
                start, end = round(seg_size * i), round(seg_size * (i + 1))
                frame_indices.append((start + end) // 2)

            return [frame_indices]

        seg_len = (self.num_frames - 1) * self.sampling_rate + 1
        slide_len = max(len_frames - seg_len, 0)
        crop_indice = []
        for i in range(self.num_temporal_views):
            if self.num_temporal_views == 1:
                st = slide_len // 2
            else:
                st = round(slide_len / (self.num_temporal_views - 1) * i)
            crop_indice.append(list(map(lambda x: min(x + st, len_frames - 1),
                                        range(0, self.num_frames * self.sampling_rate, self.sampling_rate))))
        return crop_indice

    def _random_sample_frame_idx(self, len):
        frame_indices = []

        if self.sampling_rate <= 0:  # tsn sample
            seg_size = (len - 1) / self.num_frames
            for i in range(self.num_frames):
                start, end = round(seg_size * i), round(seg_size * (i + 1))
                frame_indices.append(np.random.randint(start, end + 1))  # random
        elif self.sampling_rate * (self.num_frames - 1) + 1 >= len:
            for i in range(self.num_frames):
                frame_indices.append(i * self.sampling_rate if i * self.sampling_rate < len else frame_indices[-1])
        else:
            start = np.random.randint(len - self.sampling_rate * (self.num_frames - 1))
            frame_indices = list(range(start, start + self.sampling_rate * self.num_frames, self.sampling_rate))

        return frame_indices


COUNTS = [1, 2, 7, 8, 16, 17, 50, 112, 113, 114, 300]
SETTINGS = [(8, 16), (8, 0), (8, 4), (16, 2), (4, 1), (1, 16), (1, 0), (3, 0)]


@pytest.mark.parametrize("frames,rate", SETTINGS)
def test_training_indices_are_the_references(frames, rate):
    for count, seed in itertools.product(COUNTS, range(5)):
        np.random.seed(seed)
        expected = [int(index) for index in Reference(frames, rate)._random_sample_frame_idx(count)]
        found = training_indices(count, frames, rate, np.random.RandomState(seed))
        assert found == expected, (count, seed)
        assert all(0 <= index < count for index in found)


@pytest.mark.parametrize("frames,rate", SETTINGS)
@pytest.mark.parametrize("views", [1, 2, 3, 4])
def test_evaluation_indices_are_the_references(frames, rate, views):
    if rate == 0 and views > 1:
        with pytest.raises(TietaError, match="one temporal view"):
            evaluation_indices(50, frames, rate, views)
        return
    for count in COUNTS:
        expected = Reference(frames, rate, views).get_temporal_crops_index(count)
        assert evaluation_indices(count, frames, rate, views) == expected, count


def test_the_k400_setting_spans_the_clip():
    """8 frames at a stride of 16 over 300 frames: 3 views starting at the first frame, the middle
    and the last possible start (300 - 113 = 187)."""
    views = evaluation_indices(300, 8, 16, 3)
    assert [view[0] for view in views] == [0, 94, 187]
    assert views[2][-1] == 299 and all(b - a == 16 for view in views for a, b in zip(view, view[1:]))
    start = training_indices(300, 8, 16, np.random.RandomState(0))[0]
    assert 0 <= start <= 187


def test_segments_take_one_frame_of_each():
    """SSv2: 8 segments of a 33-frame clip (4 frames each); training draws inside each segment."""
    assert evaluation_indices(33, 8, 0, 1) == [[2, 6, 10, 14, 18, 22, 26, 30]]
    for seed in range(20):
        picked = training_indices(33, 8, 0, np.random.RandomState(seed))
        assert all(4 * i <= index <= 4 * (i + 1) for i, index in enumerate(picked))


def test_a_short_clip_repeats_its_last_frame():
    assert training_indices(20, 8, 4, np.random.RandomState(0)) == [0, 4, 8, 12, 16, 16, 16, 16]
    assert evaluation_indices(20, 8, 4, 1) == [[0, 4, 8, 12, 16, 19, 19, 19]]


@pytest.mark.parametrize("count,frames,rate", [(0, 8, 16), (10, 0, 16), (10, 8, -1)])
def test_impossible_settings_are_refused(count, frames, rate):
    with pytest.raises(TietaError, match="frame sampling needs"):
        training_indices(count, frames, rate, np.random.RandomState(0))
    with pytest.raises(TietaError, match="frame sampling needs"):
        evaluation_indices(count, frames, rate, 1)
