"""The segmentation model: shapes, mmseg's losses and evaluation (against transcriptions of
``EncoderDecoder.slide_inference`` and the decode head's loss), what trains, and FLOPs counted on
the executed path."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from timm.models.vision_transformer import VisionTransformer
from torch import nn

import tieta
from tieta.dense.model import (SegmentationModel, method_losses, pixel_cross_entropy, segmentation_loss,
                               segmentation_step, slide_inference, whole_inference)
from tieta.dense.neck import block_grids
from tieta.errors import TietaError
from tieta.train.optim import build_optimizer
from tests.conftest import make_vit

WIDTH, SIDE, CLASSES = 32, 64, 4


def tiny_vit(depth: int = 4) -> VisionTransformer:
    torch.manual_seed(0)
    return VisionTransformer(img_size=SIDE, patch_size=16, embed_dim=WIDTH, depth=depth, num_heads=2, num_classes=7)


def segmenter(method: str = "", **kwargs) -> SegmentationModel:
    vit = tiny_vit()
    if "lora" in method:
        tieta.add_lora(vit, rank=2)
    if "dyt" in method:
        tieta.add_dyt(vit, adapter_dim=2)
    tieta.freeze_backbone(vit)
    torch.manual_seed(1)
    return SegmentationModel(vit, CLASSES, channels=16, aux_channels=8, **kwargs)


def images(batch: int = 2, height: int = SIDE, width: int = SIDE) -> torch.Tensor:
    return torch.randn(batch, 3, height, width, generator=torch.Generator().manual_seed(2))


def labels(batch: int = 2) -> torch.Tensor:
    found = torch.randint(0, CLASSES, (batch, SIDE, SIDE), generator=torch.Generator().manual_seed(3))
    found[:, :8] = 255  # unscored pixels
    return found


def test_logits_at_a_quarter_upsampled_to_the_input_and_the_auxiliary_head_in_training():
    model = segmenter().eval()
    with torch.no_grad():
        assert model(images()).shape == (2, CLASSES, SIDE, SIDE)
        outputs = model.heads(images())
        assert outputs.logits.shape == (2, CLASSES, SIDE // 4, SIDE // 4) and outputs.aux_logits is None
        model.train()
        outputs = model.heads(images())
    assert outputs.aux_logits.shape == (2, CLASSES, SIDE // 16, SIDE // 16)
    assert model.indices == [0, 1, 2, 3]
    assert not any(name.startswith("backbone.head.") for name, _ in model.named_parameters())  # no classifier


def test_forward_is_encode_decode_transcribed():
    model = segmenter().eval()
    x = images()
    with torch.no_grad():
        # EncoderDecoder.encode_decode: backbone + neck, the decode head, resize to the image
        out = model.head.decode_head(model.scales(x))
        out = F.interpolate(out, x.shape[2:], None, "bilinear", False)
        torch.testing.assert_close(model(x), out)
        torch.testing.assert_close(whole_inference(model, x), out)
        torch.testing.assert_close(whole_inference(model, x, size=(50, 70)),
                                   F.interpolate(out, (50, 70), None, "bilinear", False))


def mmseg_cross_entropy(seg_logit, seg_label, ignore_index=255, loss_weight=1.0):
    """BaseDecodeHead.losses with CrossEntropyLoss (no sampler, no class weight), transcribed."""
    seg_logit = F.interpolate(seg_logit, seg_label.shape[1:], None, 'bilinear', False)
    loss = F.cross_entropy(seg_logit, seg_label, weight=None, reduction='none', ignore_index=ignore_index)
    return loss_weight * loss.mean()


def test_the_loss_is_mmseg_s_decode_and_auxiliary_losses():
    model = segmenter().train()
    torch.manual_seed(4)
    outputs = model.heads(images())
    expected = mmseg_cross_entropy(outputs.logits, labels()) + mmseg_cross_entropy(outputs.aux_logits, labels(),
                                                                                     loss_weight=0.4)
    torch.testing.assert_close(segmentation_loss(outputs, labels()), expected)
    # every pixel counts in the mean, the ignored ones as 0 (not torch's mean over scored pixels)
    scored = F.cross_entropy(F.interpolate(outputs.logits, (SIDE, SIDE), mode="bilinear"), labels(),
                             ignore_index=255)
    assert float(pixel_cross_entropy(outputs.logits, labels()).detach()) < float(scored.detach())


def test_dyt_s_token_loss_is_added_and_the_step_trains_the_heads_and_the_methods():
    model = segmenter("dyt").train()
    optimizer = build_optimizer(model, 1e-3, 0.05)
    assert {group["method"] for group in optimizer.param_groups} == {"head", "adapter", "dyt"}
    torch.manual_seed(5)
    loss = segmentation_step(model, images(), labels())
    masks = model.backbone.dispatch_state.masks
    rate = torch.cat([mask.reshape(-1) for mask in masks]).mean()
    torch.testing.assert_close(method_losses(model.backbone), 2.0 * (rate - 0.5) ** 2)
    torch.manual_seed(5)  # the same pass again: the step is the heads' losses plus DyT's token loss
    expected = segmentation_loss(model.heads(images()), labels()) + method_losses(model.backbone)
    torch.testing.assert_close(loss, expected)
    loss.backward()
    trained = {name for name, p in model.named_parameters() if p.grad is not None and p.grad.abs().sum() > 0}
    assert "head.neck.fpn1.0.weight" in trained and "head.auxiliary_head.conv_seg.weight" in trained
    assert "head.decode_head.conv_seg.weight" in trained and "backbone.blocks.0.dispatcher.weight" in trained
    assert not any(p.requires_grad for name, p in model.named_parameters() if name.endswith("attn.qkv.weight"))
    assert method_losses(segmenter().backbone) is None  # no DyT, no token loss


def mmseg_slide_inference(encode_decode, img, num_classes, crop_size, stride):
    """EncoderDecoder.slide_inference (rescale off), transcribed."""
    h_stride, w_stride = stride
    h_crop, w_crop = crop_size
    batch_size, _, h_img, w_img = img.size()
    h_grids = max(h_img - h_crop + h_stride - 1, 0) // h_stride + 1
    w_grids = max(w_img - w_crop + w_stride - 1, 0) // w_stride + 1
    preds = img.new_zeros((batch_size, num_classes, h_img, w_img))
    count_mat = img.new_zeros((batch_size, 1, h_img, w_img))
    for h_idx in range(h_grids):
        for w_idx in range(w_grids):
            y1 = h_idx * h_stride
            x1 = w_idx * w_stride
            y2 = min(y1 + h_crop, h_img)
            x2 = min(x1 + w_crop, w_img)
            y1 = max(y2 - h_crop, 0)
            x1 = max(x2 - w_crop, 0)
            crop_img = img[:, :, y1:y2, x1:x2]
            crop_seg_logit = encode_decode(crop_img)
            preds += F.pad(crop_seg_logit, (int(x1), int(preds.shape[3] - x2), int(y1), int(preds.shape[2] - y2)))
            count_mat[:, :, y1:y2, x1:x2] += 1
    assert (count_mat == 0).sum() == 0
    return preds / count_mat


@pytest.mark.parametrize("height, width, stride", [(64, 112, 32), (80, 120, 40), (64, 64, 64)])
def test_slide_inference_is_mmseg_s(height, width, stride):
    model = segmenter("lora").eval()
    x = images(1, height, width)
    got = slide_inference(model, x, crop=SIDE, stride=stride)
    with torch.no_grad():
        expected = mmseg_slide_inference(model, x, CLASSES, (SIDE, SIDE), (stride, stride))
    torch.testing.assert_close(got, expected)
    assert got.shape == (1, CLASSES, height, width)


@pytest.mark.parametrize("crop, stride, message", [
    (64, 65, "longer than the crop"),
    (0, 1, "crop is pixels"),
    (64, (32, 0), "stride is pixels"),
])
def test_bad_windows_are_one_sentence(crop, stride, message):
    with pytest.raises(TietaError, match=message):
        slide_inference(segmenter().eval(), images(1), crop, stride)


def test_a_model_that_is_not_a_vit_is_refused():
    with pytest.raises(TietaError, match="needs a timm ViT with forward_intermediates"):
        SegmentationModel(nn.Linear(2, 2), CLASSES)


def conv_macs(model: SegmentationModel, grid: int) -> int:
    """The neck's and UPerNet's multiply-accumulates on a grid of grid x grid patches, by hand."""
    c, ch, k = WIDTH, 16, CLASSES
    sides = [4 * grid, 2 * grid, grid, grid // 2]
    neck = c * c * 4 * (grid ** 2 + (2 * grid) ** 2) + c * c * 4 * grid ** 2
    lateral = sum(c * ch * side ** 2 for side in sides[:3])
    pyramid = sum(c * ch * scale ** 2 for scale in (1, 2, 3, 6)) + (c + 4 * ch) * ch * 9 * sides[3] ** 2
    fpn = sum(ch * ch * 9 * side ** 2 for side in sides[:3]) + 4 * ch * ch * 9 * sides[0] ** 2 + ch * k * sides[0] ** 2
    return neck + lateral + pyramid + fpn


def test_flops_show_the_neck_and_heads_and_dyt_s_skipped_tokens():
    x = images(2, 128, 128)  # an 8 x 8 grid: the pooling to 6 cells has something to pool
    vit = VisionTransformer(img_size=128, patch_size=16, embed_dim=WIDTH, depth=4, num_heads=2, num_classes=0)
    tieta.add_dyt(vit, adapter_dim=2)
    model = SegmentationModel(vit, CLASSES, channels=16, aux_channels=8)
    backbone_alone = tieta.count_flops(vit, x)["gmacs"]
    with torch.no_grad():
        for block in vit.blocks:
            block.dispatcher.bias.fill_(10.0)  # every token active
    every_token = tieta.count_flops(model, x)["gmacs"]
    assert round((every_token - tieta.count_flops(vit, x)["gmacs"]) * 1e9) == conv_macs(model, 8)
    with torch.no_grad():
        for block in vit.blocks:
            block.dispatcher.bias.fill_(-10.0)  # every patch token skips the MLP
    skipping = tieta.count_flops(model, x)["gmacs"]
    assert round((every_token - skipping) * 1e9) == 4 * 64 * 2 * 4 * WIDTH * WIDTH
    assert backbone_alone < every_token


def test_a_method_s_state_is_read_on_the_segmentation_model():
    model = segmenter("dyt").eval()
    rates = tieta.activation_rates(model, images())  # DyT's dispatchers, through the whole model
    assert len(rates) == 4 and all(0 <= rate <= 1 for rate in rates)


@pytest.mark.parametrize("variant", ["registers", "distilled", "avg_pool", "eva02", "rope_vit"])
def test_every_backbone_family_segments_from_its_patch_tokens(variant):
    vit = make_vit(variant)
    tieta.add_lora(vit, rank=2)
    model = SegmentationModel(vit, CLASSES, channels=8, aux_channels=4).eval()
    x = torch.randn(2, 3, 32, 32, generator=torch.Generator().manual_seed(6))
    with torch.no_grad():
        assert model(x).shape == (2, CLASSES, 32, 32)
        tokens = vit.forward_intermediates(x, indices=[0], output_fmt="NLC", intermediates_only=True)[0]
        grid = block_grids(vit, x, [0])[0]  # the prefix tokens (class, distillation, registers) left out
    assert tokens.shape[1] == 16
    torch.testing.assert_close(grid, tokens.reshape(2, 4, 4, -1).permute(0, 3, 1, 2))
