"""DyT's multi-scale neck: four blocks' patch grids turned into four scales (BEiT's, as DyT's
segmentation backbone builds it, ``dense_tasks/Segmentation/backbone/segmentation_vision_transformer_IN21K.py``).

    block outputs after blocks 3, 5, 7, 11 of 12     (B, C, H/16, W/16) each, the patch tokens as a grid
      fpn1: ConvTranspose2d(2, 2) -> GELU -> ConvTranspose2d(2, 2)   (B, C, H/4, W/4)
      fpn2: ConvTranspose2d(2, 2)                                   (B, C, H/8, W/8)
      fpn3: identity                                                 (B, C, H/16, W/16)
      fpn4: MaxPool2d(2)                                             (B, C, H/32, W/32)

The grids are the raw block outputs (no final norm), the prefix tokens left out, as the reference
takes them. On another depth the blocks are those at the same fractions of the depth
(:func:`feature_indices`). BEiT's own neck has a SyncBatchNorm between the two transposed
convolutions of ``fpn1``; DyT's code comments it out, and so does the default here
(``norm=True`` puts it back, as a BatchNorm2d: one process needs no synchronised statistics).
"""

from __future__ import annotations

from typing import Optional, Sequence

import torch
from torch import nn

from tieta.errors import TietaError

# the blocks DyT's segmentation backbone takes its features after, on ViT-B's 12 blocks
REFERENCE_INDICES = (3, 5, 7, 11)
REFERENCE_DEPTH = 12


def feature_indices(depth: int, indices: Optional[Sequence[int]] = None) -> list[int]:
    """The four blocks whose outputs feed the neck.

    Args:
        depth: the backbone's blocks.
        indices: four block indices as given (checked against ``depth``); None: the reference's
            3, 5, 7, 11 of 12 at the same fractions of ``depth`` (block i+1 of 12 -> the block at
            (i+1)/12 of the depth, rounded; 4 blocks: 0, 1, 2, 3).

    Raises:
        TietaError: not four indices, or one outside the backbone's blocks.
    """
    if indices is None:
        return [max(0, int((index + 1) * depth / REFERENCE_DEPTH + 0.5) - 1) for index in REFERENCE_INDICES]
    indices = list(indices)
    if len(indices) != len(REFERENCE_INDICES) or not all(type(index) is int for index in indices):
        raise TietaError(f"the neck takes the outputs of 4 blocks (whole numbers), got {indices!r}")
    if not all(0 <= index < depth for index in indices):
        raise TietaError(f"the neck's block indices must be in 0 .. {depth - 1} (the backbone has {depth} blocks), "
                         f"got {indices}")
    return indices


def block_grids(backbone: nn.Module, images: torch.Tensor, indices: Sequence[int]) -> list[torch.Tensor]:
    """The patch tokens after each of the blocks ``indices``, as grids: timm's
    ``forward_intermediates(..., output_fmt="NCHW", intermediates_only=True)``, the blocks after the
    last one not run.

    Args: images: (B, 3, H, W). Returns: one (B, C, H/P, W/P) grid per index, in the order given
    (an index given twice gives the same grid twice).
    """
    wanted = sorted(set(indices))
    grids = backbone.forward_intermediates(images, indices=wanted, output_fmt="NCHW", intermediates_only=True,
                                           stop_early=True)
    by_index = dict(zip(wanted, grids))
    return [by_index[index] for index in indices]


class MultiScaleNeck(nn.Module):
    """Four grids of one scale -> four scales, 4x, 2x, 1x and 0.5x (the reference's fpn1 .. fpn4).

    Args:
        dim: the grids' channels (the backbone's width).
        norm: a BatchNorm2d between fpn1's transposed convolutions (BEiT's neck, with BatchNorm in
            place of its SyncBatchNorm); False: DyT's, without it.
    """

    def __init__(self, dim: int, norm: bool = False) -> None:
        super().__init__()
        between = [nn.BatchNorm2d(dim), nn.GELU()] if norm else [nn.GELU()]
        self.fpn1 = nn.Sequential(nn.ConvTranspose2d(dim, dim, kernel_size=2, stride=2), *between,
                                  nn.ConvTranspose2d(dim, dim, kernel_size=2, stride=2))
        self.fpn2 = nn.Sequential(nn.ConvTranspose2d(dim, dim, kernel_size=2, stride=2))
        self.fpn3 = nn.Identity()
        self.fpn4 = nn.MaxPool2d(kernel_size=2, stride=2)

    def forward(self, grids: Sequence[torch.Tensor]) -> list[torch.Tensor]:
        """Args: grids: four (B, C, h, w). Returns: (B, C, 4h, 4w), (B, C, 2h, 2w), (B, C, h, w),
        (B, C, h/2, w/2)."""
        return [scale(grid) for scale, grid in zip((self.fpn1, self.fpn2, self.fpn3, self.fpn4), grids)]
