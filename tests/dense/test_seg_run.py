"""The pieces of a segmentation run: evaluation by sliding windows or the whole image, the scores,
the poly schedule against a transcription of mmcv's, and the head resolved from the data as
data.kind is."""

from types import SimpleNamespace

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from tieta.dense.config import SegmentationConfig
from tieta.errors import TietaError
from tieta.train.config import comparable, load_config
from tieta.train.optim import lr_multiplier
from tieta.train.segmentation_run import evaluate_segmentation, segment


class Pixelwise(nn.Module):
    """A model whose logits at a pixel depend on that pixel alone (a 1x1 convolution), taking
    ``side`` x ``side`` inputs as a ViT would: sliding windows over it give its whole-image logits."""

    def __init__(self, side: int, classes: int = 3) -> None:
        super().__init__()
        self.conv = nn.Conv2d(3, classes, 1)
        self.patch_embed = SimpleNamespace(img_size=(side, side))
        self.classes, self.ignore_index = classes, 255
        self.calls: list[tuple[int, int]] = []

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        assert images.shape[-2:] == self.patch_embed.img_size, images.shape  # a fixed input size, as a ViT's
        self.calls.append(tuple(images.shape[-2:]))
        return self.conv(images)


def test_slide_segmentation_averages_windows_pads_small_images_and_resizes_to_the_mask():
    torch.manual_seed(0)
    model = Pixelwise(8).eval()
    settings = SegmentationConfig(head="upernet")  # slide; crop: the input; stride: 2/3 of it (5)
    images = torch.randn(1, 3, 12, 19)
    expected = model.conv(images)
    torch.testing.assert_close(segment(model, images, settings, (12, 19)), expected)
    assert len(model.calls) == 2 * 4  # rows at 0, 4 (moved back to the edge); columns at 0, 5, 10, 11
    small = torch.randn(1, 3, 5, 6)  # smaller than a window: padded with the mean (0), the padding cut off
    torch.testing.assert_close(segment(model, small, settings, (5, 6)), model.conv(small))
    resized = segment(model, images, settings, (24, 38))  # to the mask's size, bilinear
    torch.testing.assert_close(resized, F.interpolate(expected, size=(24, 38), mode="bilinear", align_corners=False))


def test_whole_segmentation_resizes_the_image_to_the_input_and_back():
    model = Pixelwise(8).eval()
    images = torch.randn(1, 3, 12, 20)
    got = segment(model, images, SegmentationConfig(head="upernet", eval_mode="whole"), (12, 20))
    inner = model.conv(F.interpolate(images, size=(8, 8), mode="bilinear", align_corners=False))
    torch.testing.assert_close(got, F.interpolate(inner, size=(12, 20), mode="bilinear", align_corners=False))
    assert model.calls == [(8, 8)]


def test_a_window_the_model_cannot_take_is_refused_and_the_stride_defaults_to_two_thirds():
    assert SegmentationConfig().window(512) == (512, 341)
    assert SegmentationConfig(eval_stride=40).window(64) == (64, 40)
    with pytest.raises(TietaError, match="eval_crop is 512 but the model takes 64 px"):
        SegmentationConfig(eval_crop=512).window(64)
    with pytest.raises(TietaError, match=r"eval_stride \(100\) is longer than the 64 px crop"):
        SegmentationConfig(eval_stride=100).window(64)


def test_evaluation_scores_pixels_as_mmseg_and_names_the_headline():
    class Oracle(Pixelwise):
        """Class 0 where the red channel is positive, else 1."""

        def forward(self, images):
            positive = (images[:, :1] > 0).float()
            return torch.cat([positive, 1 - positive, torch.zeros_like(positive)], dim=1)

    model = Oracle(4, classes=3)
    images = torch.tensor([1.0, -1.0]).repeat_interleave(2).view(1, 1, 1, 4).expand(1, 3, 4, 4).clone()
    labels = torch.tensor([[0, 0, 1, 255]]).expand(4, 4)[None].clone()  # the last column unscored
    result = evaluate_segmentation(model, [(images, labels)], nn.Identity(), torch.device("cpu"), None,
                                   SegmentationConfig(head="upernet"))
    # classes 0 and 1 right where labelled (class 1 predicted on the unscored column too, which does not count)
    assert result == {"acc": 100.0, "mIoU": 100.0, "mAcc": 100.0, "aAcc": 100.0}


def _mmcv_poly(iteration, max_iters, base_lr, min_lr, warmup_iters, warmup_ratio=1e-6, power=1.0):
    """mmcv's PolyLrUpdaterHook (by_epoch False) with its linear warm-up, transcribed."""
    coeff = (1 - iteration / max_iters) ** power
    regular = (base_lr - min_lr) * coeff + min_lr
    if iteration < warmup_iters:
        k = (1 - iteration / warmup_iters) * (1 - warmup_ratio)
        return regular * (1 - k), regular
    return regular, regular


@pytest.mark.parametrize("min_lr", [0.0, 1e-5])
def test_the_poly_schedule_is_mmcv_s_after_the_warm_up_and_scales_it_during(min_lr):
    total, warmup, lr = 200, 15, 1e-3
    for step in range(total):
        ours = lr * lr_multiplier(step, total, warmup, min_lr / lr, "poly")
        theirs, regular = _mmcv_poly(step, total, lr, min_lr, warmup)
        if step >= warmup:
            assert ours == pytest.approx(theirs, rel=1e-12, abs=1e-15)
        else:  # tieta's ramp reaches the full rate at the warm-up's last step, mmcv's one step later
            assert ours == pytest.approx(regular * (step + 1) / warmup, rel=1e-12)
    assert lr_multiplier(total, total, warmup, 0.0, "poly") == 0.0
    assert lr_multiplier(50, total, 0, 0.0, "poly") == pytest.approx(0.75)


def test_the_head_is_resolved_from_the_data_as_the_kind_is():
    left_out = load_config(overrides={"data.path": "/tasks/ade"}).to_dict()
    resolved = load_config(overrides={"data.path": "/tasks/ade", "segmentation.head": "upernet",
                                      "data.kind": "segmentation"}).to_dict()
    assert comparable(left_out) == comparable(resolved)  # a sweep skips the run it finished
    other = load_config(overrides={"data.path": "/tasks/ade", "segmentation.channels": 512}).to_dict()
    assert comparable(other) != comparable(left_out)
