"""UPerNet's decode head and the auxiliary FCN head, as mmseg's ``UPerHead`` and ``FCNHead``, in
plain PyTorch (no mmcv).

    scales (B, C_i, h_i, w_i), finest first
      laterals: a 1x1 ConvModule on each scale but the last; on the last, the pyramid pooling module
        (average pools to 1, 2, 3, 6 cells, a 1x1 ConvModule each, upsampled back, concatenated with
        the scale) and a 3x3 ConvModule
      top-down: each coarser lateral upsampled (bilinear) and added to the next finer one
      a 3x3 ConvModule on each lateral but the last; all upsampled to the finest and concatenated
      fusion 3x3 ConvModule -> Dropout2d -> 1x1 classifier      (B, classes, h_0, w_0)

A ConvModule is mmcv's with BatchNorm: a convolution without bias, BatchNorm2d, ReLU, its
convolution initialised as mmcv does (Kaiming normal, fan-out). The modules carry mmseg's names
(``psp_modules``, ``bottleneck``, ``lateral_convs``, ``fpn_convs``, ``fpn_bottleneck``,
``conv_seg``; ``convs``, ``conv_cat``; ``conv``, ``bn`` inside a ConvModule), so an mmseg head's
tensors load by name. What mmseg's heads do besides the forward pass (the loss, the resize to the
labels) is in :mod:`tieta.dense.model`. The classifier keeps PyTorch's default initialisation, as
in DyT's training script, which never calls mmseg's ``init_weights`` (its normal(0, 0.01) init).
"""

from __future__ import annotations

from typing import Sequence

import torch
import torch.nn.functional as F
from torch import nn

# the pyramid pooling module's grid sizes (PSPNet's, mmseg's default, DyT's config)
POOL_SCALES = (1, 2, 3, 6)


class ConvModule(nn.Module):
    """mmcv's ConvModule with BatchNorm and ReLU: conv (no bias) -> bn -> ReLU.

    Args: in_channels, channels, kernel_size: the convolution's; padding: kernel_size // 2 keeps
    the size.
    """

    def __init__(self, in_channels: int, channels: int, kernel_size: int, padding: int = 0) -> None:
        super().__init__()
        self.conv = nn.Conv2d(in_channels, channels, kernel_size, padding=padding, bias=False)
        self.bn = nn.BatchNorm2d(channels)
        self.activate = nn.ReLU(inplace=True)
        nn.init.kaiming_normal_(self.conv.weight, mode="fan_out", nonlinearity="relu")  # mmcv's init

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.activate(self.bn(self.conv(x)))


def resize(x: torch.Tensor, size: Sequence[int], align_corners: bool = False) -> torch.Tensor:
    """Bilinear resize of (B, C, h, w) to ``size`` (mmseg's ``resize`` as its heads call it)."""
    return F.interpolate(x, size=tuple(size), mode="bilinear", align_corners=align_corners)


class UPerHead(nn.Module):
    """UPerNet's decode head (Xiao et al., ECCV 2018) as mmseg's ``UPerHead``.

    Args:
        in_channels: channels of each input scale, finest first (DyT: the backbone's width, 4 times).
        channels: the head's width (DyT's config: 768; mmseg's UPerNet configs: 512).
        classes: output classes.
        pool_scales: the pyramid pooling module's grid sizes.
        dropout: Dropout2d before the classifier.
        align_corners: of every bilinear resize.
    """

    def __init__(self, in_channels: Sequence[int], channels: int, classes: int,
                 pool_scales: Sequence[int] = POOL_SCALES, dropout: float = 0.1, align_corners: bool = False) -> None:
        super().__init__()
        in_channels = list(in_channels)
        self.align_corners = align_corners
        self.psp_modules = nn.ModuleList(
            nn.Sequential(nn.AdaptiveAvgPool2d(scale), ConvModule(in_channels[-1], channels, 1))
            for scale in pool_scales)
        self.bottleneck = ConvModule(in_channels[-1] + len(pool_scales) * channels, channels, 3, padding=1)
        self.lateral_convs = nn.ModuleList(ConvModule(width, channels, 1) for width in in_channels[:-1])
        self.fpn_convs = nn.ModuleList(ConvModule(channels, channels, 3, padding=1) for _ in in_channels[:-1])
        self.fpn_bottleneck = ConvModule(len(in_channels) * channels, channels, 3, padding=1)
        self.dropout = nn.Dropout2d(dropout) if dropout > 0 else nn.Identity()
        self.conv_seg = nn.Conv2d(channels, classes, kernel_size=1)

    def pyramid(self, x: torch.Tensor) -> torch.Tensor:
        """The pyramid pooling module on the coarsest scale. Args: x: (B, C, h, w). Returns: (B, channels, h, w)."""
        pooled = [resize(pool(x), x.shape[2:], self.align_corners) for pool in self.psp_modules]
        return self.bottleneck(torch.cat([x, *pooled], dim=1))

    def forward(self, scales: Sequence[torch.Tensor]) -> torch.Tensor:
        """Args: scales: (B, C_i, h_i, w_i), finest first. Returns: (B, classes, h_0, w_0) logits."""
        laterals = [conv(scale) for conv, scale in zip(self.lateral_convs, scales)]
        laterals.append(self.pyramid(scales[-1]))
        for i in range(len(laterals) - 1, 0, -1):  # top-down: coarse into fine
            laterals[i - 1] = laterals[i - 1] + resize(laterals[i], laterals[i - 1].shape[2:], self.align_corners)
        outs = [conv(lateral) for conv, lateral in zip(self.fpn_convs, laterals)]
        outs.append(laterals[-1])
        outs = [outs[0]] + [resize(out, outs[0].shape[2:], self.align_corners) for out in outs[1:]]
        return self.conv_seg(self.dropout(self.fpn_bottleneck(torch.cat(outs, dim=1))))


class FCNHead(nn.Module):
    """The auxiliary head: mmseg's ``FCNHead`` on one scale.

    Args:
        in_channels: the scale's channels.
        channels: the head's width (DyT's config: 256).
        classes: output classes.
        index: which scale it reads (DyT's config: 2, the 1/16 scale).
        num_convs: 3x3 ConvModules before the classifier (DyT's config: 1).
        concat_input: a ConvModule on the input and the convolutions' output concatenated (DyT's: no).
        dropout: Dropout2d before the classifier.
    """

    def __init__(self, in_channels: int, channels: int, classes: int, index: int = 2, num_convs: int = 1,
                 concat_input: bool = False, dropout: float = 0.1) -> None:
        super().__init__()
        self.index = index
        widths = [in_channels] + [channels] * num_convs
        self.convs = nn.Sequential(*(ConvModule(a, b, 3, padding=1) for a, b in zip(widths, widths[1:])))
        self.conv_cat = ConvModule(in_channels + channels, channels, 3, padding=1) if concat_input else None
        self.dropout = nn.Dropout2d(dropout) if dropout > 0 else nn.Identity()
        self.conv_seg = nn.Conv2d(channels if num_convs else in_channels, classes, kernel_size=1)

    def forward(self, scales: Sequence[torch.Tensor]) -> torch.Tensor:
        """Args: scales: the neck's outputs. Returns: (B, classes, h, w) logits at scale ``index``."""
        x = scales[self.index]
        out = self.convs(x)
        if self.conv_cat is not None:
            out = self.conv_cat(torch.cat([x, out], dim=1))
        return self.conv_seg(self.dropout(out))
