"""The ``segmentation:`` section of a run's settings: what turns a backbone into a segmentation
model (:class:`tieta.dense.model.SegmentationModel`).

Readable without torch (``tieta --help`` and argument errors are answered without it).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

from tieta.errors import TietaError

HEADS = ("upernet",)
EVAL_MODES = ("slide", "whole")
# a head's width: UPerNet's convolutions are width^2 x 9 weights each (4,096: 150 M per convolution)
MAX_CHANNELS = 4096
# a sliding window's side or stride (tieta.backbone.MAX_IMG_SIZE, the largest input)
MAX_EVAL_SIDE = 4096


@dataclass
class SegmentationConfig:
    """How a segmentation run's model is built (defaults: DyT's ADE20K config).

    Attributes:
        head: "upernet": DyT's neck, UPerNet and the auxiliary FCN head; None: no segmentation
            model (an image classifier).
        channels: UPerNet's width (DyT: 768).
        aux_channels: the auxiliary FCN head's width (256); 0: none.
        indices: the four blocks the neck reads; None: 3, 5, 7, 11 of 12 at the same fractions of
            the backbone's depth.
        neck_norm: BEiT's BatchNorm between the neck's transposed convolutions (DyT's code has none).
        aux_weight: the auxiliary loss's weight (0.4).
        ignore_index: the label of unscored pixels (255).
        eval_mode: how a run evaluates an image: "slide" (crops of ``eval_crop`` every
            ``eval_stride`` pixels, their logits averaged, as DyT's ADE20K config) or "whole" (the
            image resized to the model's input at once).
        eval_crop: the sliding window's side; None: the model's input size (DyT: 512). A crop is
            one pass of the backbone, so it must be the model's input size.
        eval_stride: pixels between windows; None: two thirds of the crop, rounded down (DyT's
            341 at 512).
    """

    head: Optional[str] = None
    channels: int = 768
    aux_channels: int = 256
    indices: Optional[list[int]] = None
    neck_norm: bool = False
    aux_weight: float = 0.4
    ignore_index: int = 255
    eval_mode: str = "slide"
    eval_crop: Optional[int] = None
    eval_stride: Optional[int] = None

    def check(self, prefix: str = "segmentation.") -> None:
        """Raise a TietaError, in one sentence, for settings that cannot work."""
        if self.head is not None and self.head not in HEADS:
            raise TietaError(f"{prefix}head must be one of {', '.join(HEADS)} (or null for an image classifier), "
                             f"got {self.head!r}")
        if not 1 <= self.channels <= MAX_CHANNELS or not 0 <= self.aux_channels <= MAX_CHANNELS:
            raise TietaError(f"{prefix}channels must be in 1 .. {MAX_CHANNELS} and {prefix}aux_channels in "
                             f"0 .. {MAX_CHANNELS}, got {self.channels} and {self.aux_channels}")
        if self.indices is not None and (len(self.indices) != 4 or min(self.indices) < 0):
            raise TietaError(f"{prefix}indices names the 4 blocks the neck reads (from 0), got {self.indices}")
        if self.aux_weight < 0:
            raise TietaError(f"{prefix}aux_weight cannot be negative, got {self.aux_weight}")
        if self.eval_mode not in EVAL_MODES:
            raise TietaError(f"{prefix}eval_mode must be one of {', '.join(EVAL_MODES)}, got {self.eval_mode!r}")
        for name in ("eval_crop", "eval_stride"):
            value = getattr(self, name)
            if value is not None and not 1 <= value <= MAX_EVAL_SIDE:
                raise TietaError(f"{prefix}{name} must be in 1 .. {MAX_EVAL_SIDE} pixels (null: the default), "
                                 f"got {value}")
        if self.eval_crop is not None and self.eval_stride is not None and self.eval_stride > self.eval_crop:
            raise TietaError(f"{prefix}eval_stride ({self.eval_stride}) is longer than {prefix}eval_crop "
                             f"({self.eval_crop}): pixels between the windows would have no prediction")

    def window(self, image_size: int) -> tuple[int, int]:
        """(crop, stride) of the sliding window for a model taking ``image_size`` pixels.

        Raises:
            TietaError: ``eval_crop`` is not the model's input size, or the stride is longer than it.
        """
        crop = self.eval_crop if self.eval_crop is not None else image_size
        if crop != image_size:
            raise TietaError(f"segmentation.eval_crop is {crop} but the model takes {image_size} px images: each "
                             "window is one pass of the backbone; set eval_crop to the input size (or leave it out)")
        stride = self.eval_stride if self.eval_stride is not None else max(1, crop * 2 // 3)
        if stride > crop:
            raise TietaError(f"segmentation.eval_stride ({stride}) is longer than the {crop} px crop: pixels between "
                             "the windows would have no prediction")
        return crop, stride

def is_segmentation(config) -> bool:
    """Whether a run's settings describe a segmentation model (``segmentation.head`` given)."""
    section = getattr(config, "segmentation", None)
    return section is not None and section.head is not None
