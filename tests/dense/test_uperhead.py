"""UPerNet and the FCN head against a literal transcription of mmseg's forward passes (mmseg's
``decode_heads/uper_head.py``, ``psp_head.py``, ``fcn_head.py``, ``decode_head.py`` and mmcv's
ConvModule with BN and ReLU)."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from tieta.dense.uperhead import FCNHead, UPerHead


def resize(input, size=None, scale_factor=None, mode='nearest', align_corners=None):
    return F.interpolate(input, size, scale_factor, mode, align_corners)


class ConvModule(nn.Module):
    """mmcv's ConvModule with norm_cfg BN and act_cfg ReLU: conv (bias 'auto': none with a norm), norm, activation."""

    def __init__(self, in_channels, out_channels, kernel_size, padding=0, dilation=1, inplace=True):
        super().__init__()
        self.conv = nn.Conv2d(in_channels, out_channels, kernel_size, padding=padding, dilation=dilation, bias=False)
        self.bn = nn.BatchNorm2d(out_channels)
        self.activate = nn.ReLU(inplace=inplace)

    def forward(self, x):
        return self.activate(self.bn(self.conv(x)))


class PPM(nn.ModuleList):
    def __init__(self, pool_scales, in_channels, channels, align_corners):
        super(PPM, self).__init__()
        self.align_corners = align_corners
        for pool_scale in pool_scales:
            self.append(nn.Sequential(nn.AdaptiveAvgPool2d(pool_scale), ConvModule(in_channels, channels, 1)))

    def forward(self, x):
        ppm_outs = []
        for ppm in self:
            ppm_out = ppm(x)
            upsampled_ppm_out = resize(ppm_out, size=x.size()[2:], mode='bilinear', align_corners=self.align_corners)
            ppm_outs.append(upsampled_ppm_out)
        return ppm_outs


class MmsegUPerHead(nn.Module):
    def __init__(self, in_channels, channels, num_classes, pool_scales=(1, 2, 3, 6), dropout_ratio=0.1,
                 align_corners=False):
        super().__init__()
        self.in_channels, self.channels, self.align_corners = in_channels, channels, align_corners
        self.psp_modules = PPM(pool_scales, self.in_channels[-1], self.channels, align_corners=self.align_corners)
        self.bottleneck = ConvModule(self.in_channels[-1] + len(pool_scales) * self.channels, self.channels, 3,
                                     padding=1)
        self.lateral_convs = nn.ModuleList()
        self.fpn_convs = nn.ModuleList()
        for in_channels in self.in_channels[:-1]:  # skip the top layer
            l_conv = ConvModule(in_channels, self.channels, 1, inplace=False)
            fpn_conv = ConvModule(self.channels, self.channels, 3, padding=1, inplace=False)
            self.lateral_convs.append(l_conv)
            self.fpn_convs.append(fpn_conv)
        self.fpn_bottleneck = ConvModule(len(self.in_channels) * self.channels, self.channels, 3, padding=1)
        self.conv_seg = nn.Conv2d(channels, num_classes, kernel_size=1)
        self.dropout = nn.Dropout2d(dropout_ratio) if dropout_ratio > 0 else None

    def cls_seg(self, feat):
        if self.dropout is not None:
            feat = self.dropout(feat)
        output = self.conv_seg(feat)
        return output

    def psp_forward(self, inputs):
        x = inputs[-1]
        psp_outs = [x]
        psp_outs.extend(self.psp_modules(x))
        psp_outs = torch.cat(psp_outs, dim=1)
        output = self.bottleneck(psp_outs)
        return output

    def forward(self, inputs):
        # build laterals
        laterals = [lateral_conv(inputs[i]) for i, lateral_conv in enumerate(self.lateral_convs)]
        laterals.append(self.psp_forward(inputs))
        # build top-down path
        used_backbone_levels = len(laterals)
        for i in range(used_backbone_levels - 1, 0, -1):
            prev_shape = laterals[i - 1].shape[2:]
            laterals[i - 1] = laterals[i - 1] + resize(laterals[i], size=prev_shape, mode='bilinear',
                                                       align_corners=self.align_corners)
        # build outputs
        fpn_outs = [self.fpn_convs[i](laterals[i]) for i in range(used_backbone_levels - 1)]
        # append psp feature
        fpn_outs.append(laterals[-1])
        for i in range(used_backbone_levels - 1, 0, -1):
            fpn_outs[i] = resize(fpn_outs[i], size=fpn_outs[0].shape[2:], mode='bilinear',
                                 align_corners=self.align_corners)
        fpn_outs = torch.cat(fpn_outs, dim=1)
        output = self.fpn_bottleneck(fpn_outs)
        output = self.cls_seg(output)
        return output


class MmsegFCNHead(nn.Module):
    def __init__(self, in_channels, channels, num_classes, in_index=2, num_convs=2, kernel_size=3,
                 concat_input=True, dilation=1, dropout_ratio=0.1):
        super().__init__()
        self.in_channels, self.channels, self.in_index = in_channels, channels, in_index
        self.concat_input = concat_input
        conv_padding = (kernel_size // 2) * dilation
        convs = []
        convs.append(ConvModule(self.in_channels, self.channels, kernel_size=kernel_size, padding=conv_padding,
                                dilation=dilation))
        for i in range(num_convs - 1):
            convs.append(ConvModule(self.channels, self.channels, kernel_size=kernel_size, padding=conv_padding,
                                    dilation=dilation))
        if num_convs == 0:
            self.convs = nn.Identity()
        else:
            self.convs = nn.Sequential(*convs)
        if self.concat_input:
            self.conv_cat = ConvModule(self.in_channels + self.channels, self.channels, kernel_size=kernel_size,
                                       padding=kernel_size // 2)
        self.conv_seg = nn.Conv2d(channels, num_classes, kernel_size=1)
        self.dropout = nn.Dropout2d(dropout_ratio) if dropout_ratio > 0 else None

    def forward(self, inputs):
        x = inputs[self.in_index]
        output = self.convs(x)
        if self.concat_input:
            output = self.conv_cat(torch.cat([x, output], dim=1))
        if self.dropout is not None:
            output = self.dropout(output)
        output = self.conv_seg(output)
        return output


def scales(width: int = 8, side: int = 24, batch: int = 2) -> list[torch.Tensor]:
    generator = torch.Generator().manual_seed(0)
    return [torch.randn(batch, width, side // 2**k, side // 2**k, generator=generator) for k in range(4)]


def with_statistics(module: nn.Module) -> nn.Module:
    """Random BatchNorm weights and running statistics (fresh ones are 1 and 0)."""
    torch.manual_seed(3)
    for m in module.modules():
        if isinstance(m, nn.BatchNorm2d):
            m.weight.data.uniform_(0.5, 1.5)
            m.bias.data.normal_(0, 0.1)
            m.running_mean.normal_(0, 0.1)
            m.running_var.uniform_(0.5, 1.5)
    return module


@pytest.mark.parametrize("align_corners", [False, True])
def test_uperhead_is_mmseg_s_in_evaluation_and_training(align_corners):
    ours = with_statistics(UPerHead([8] * 4, 12, 5, align_corners=align_corners))
    theirs = MmsegUPerHead([8] * 4, 12, 5, align_corners=align_corners)
    theirs.load_state_dict(ours.state_dict())  # mmseg's names, strictly
    inputs = scales()
    with torch.no_grad():
        torch.testing.assert_close(ours.eval()(inputs), theirs.eval()(inputs), rtol=1e-5, atol=1e-5)
        # training: batch statistics, the same running statistics after; dropout's draw the same
        torch.manual_seed(7)
        got = ours.train()(inputs)
        torch.manual_seed(7)
        expected = theirs.train()(inputs)
    torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-5)
    expected_state = theirs.state_dict()
    for key, value in ours.state_dict().items():
        torch.testing.assert_close(value, expected_state[key])
    assert got.shape == (2, 5, 24, 24)


@pytest.mark.parametrize("num_convs, concat_input", [(1, False), (2, True)])
def test_fcn_head_is_mmseg_s(num_convs, concat_input):
    ours = with_statistics(FCNHead(8, 6, 5, index=2, num_convs=num_convs, concat_input=concat_input))
    theirs = MmsegFCNHead(8, 6, 5, in_index=2, num_convs=num_convs, concat_input=concat_input)
    theirs.load_state_dict(ours.state_dict())
    inputs = scales()
    with torch.no_grad():
        got, expected = ours.eval()(inputs), theirs.eval()(inputs)
    torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-5)
    assert got.shape == (2, 5, 6, 6)


def test_convolutions_start_as_mmcv_s_and_have_no_bias():
    head = UPerHead([8] * 4, 64, 5)
    conv = head.fpn_bottleneck.conv
    assert conv.bias is None
    fan_out = conv.out_channels * conv.kernel_size[0] * conv.kernel_size[1]
    assert abs(float(conv.weight.detach().std()) - (2 / fan_out) ** 0.5) < 0.1 * (2 / fan_out) ** 0.5
    assert head.conv_seg.bias is not None
