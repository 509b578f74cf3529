"""The ``segmentation:`` section of a run's settings: what turns a backbone into a segmentation
model (:class:`tieta.dense.model.SegmentationModel`).

Readable without torch (``tieta --help`` and argument errors are answered without it).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

from tieta.errors import TietaError

HEADS = ("upernet",)
# a head's width: UPerNet's convolutions are width^2 x 9 weights each (4,096: 150 M per convolution)
MAX_CHANNELS = 4096


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
    """

    head: Optional[str] = None
    channels: int = 768
    aux_channels: int = 256
    indices: Optional[list[int]] = None
    neck_norm: bool = False
    aux_weight: float = 0.4
    ignore_index: int = 255

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


def is_segmentation(config) -> bool:
    """Whether a run's settings describe a segmentation model (``segmentation.head`` given)."""
    section = getattr(config, "segmentation", None)
    return section is not None and section.head is not None
