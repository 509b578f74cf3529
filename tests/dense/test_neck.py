"""DyT's multi-scale neck against a transcription of its reference code's forward pass
(``dense_tasks/Segmentation/backbone/segmentation_vision_transformer_IN21K.py``)."""

from __future__ import annotations

import pytest
import torch
from timm.models.vision_transformer import VisionTransformer
from torch import nn

import tieta
from tieta.dense.neck import MultiScaleNeck, block_grids, feature_indices
from tieta.errors import TietaError

WIDTH = 32


def tiny_vit(depth: int = 12, **kwargs) -> VisionTransformer:
    torch.manual_seed(0)
    return VisionTransformer(img_size=64, patch_size=16, embed_dim=WIDTH, depth=depth, num_heads=2, num_classes=4,
                             **kwargs).eval()


class ReferenceNeck(nn.Module):
    """VisionTransformer21K's fpn1 .. fpn4 and its forward_features, transcribed (the SyncBatchNorm
    commented out there, as in the code)."""

    def __init__(self, embed_dim: int, out_indices=(3, 5, 7, 11)) -> None:
        super().__init__()
        self.fpn1 = nn.Sequential(
            nn.ConvTranspose2d(embed_dim, embed_dim, kernel_size=2, stride=2),
            # nn.SyncBatchNorm(embed_dim),
            nn.GELU(),
            nn.ConvTranspose2d(embed_dim, embed_dim, kernel_size=2, stride=2),
        )
        self.fpn2 = nn.Sequential(
            nn.ConvTranspose2d(embed_dim, embed_dim, kernel_size=2, stride=2),
        )
        self.fpn3 = nn.Identity()
        self.fpn4 = nn.MaxPool2d(kernel_size=2, stride=2)
        self.out_indices = out_indices

    def forward_features(self, vit: VisionTransformer, x: torch.Tensor):
        B, C, H, W = x.shape
        Hp, Wp = int(H / vit.patch_embed.patch_size[0]), int(W / vit.patch_embed.patch_size[1])
        x = vit.patch_embed(x)
        if vit.cls_token is not None:
            x = torch.cat((vit.cls_token.expand(x.shape[0], -1, -1), x), dim=1)
        x = x + vit.pos_embed
        x = vit.pos_drop(x)
        x = vit.patch_drop(x)
        x = vit.norm_pre(x)
        features = []
        for i, blk in enumerate(vit.blocks):
            x = blk(x)
            if i in self.out_indices:
                xp = x[:, 1:, :].permute(0, 2, 1).reshape(B, -1, Hp, Wp)
                features.append(xp.contiguous())
        ops = [self.fpn1, self.fpn2, self.fpn3, self.fpn4]
        for i in range(len(features)):
            features[i] = ops[i](features[i])
        return tuple(features)


@pytest.mark.parametrize("method", ["plain", "lora", "dyt"])
def test_the_neck_on_block_grids_is_the_reference_forward(method):
    vit = tiny_vit()
    if method == "lora":
        tieta.add_lora(vit, rank=2)
    elif method == "dyt":
        tieta.add_dyt(vit, adapter_dim=2)
    with torch.no_grad():
        for name, param in vit.named_parameters():
            if "lora_B" in name or "adapter" in name:
                param.normal_(0, 0.3)
    vit.eval()
    neck = MultiScaleNeck(WIDTH)
    reference = ReferenceNeck(WIDTH)
    reference.load_state_dict(neck.state_dict())  # the same names, strictly
    images = torch.randn(2, 3, 64, 64, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        ours = neck(block_grids(vit, images, feature_indices(12)))
        theirs = reference.forward_features(vit, images)
    assert [tuple(out.shape) for out in ours] == [(2, WIDTH, 16, 16), (2, WIDTH, 8, 8), (2, WIDTH, 4, 4),
                                                  (2, WIDTH, 2, 2)]
    for got, expected in zip(ours, theirs):
        torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-5)


def test_the_reference_blocks_at_the_same_fractions_of_other_depths():
    assert feature_indices(12) == [3, 5, 7, 11]
    assert feature_indices(24) == [7, 11, 15, 23]
    assert feature_indices(4) == [0, 1, 2, 3]
    assert feature_indices(6) == [1, 2, 3, 5]
    assert feature_indices(2) == [0, 0, 0, 1]


def test_an_index_given_twice_gives_the_same_grid_twice():
    vit = tiny_vit(depth=2)
    grids = block_grids(vit, torch.randn(1, 3, 64, 64), feature_indices(2))
    assert len(grids) == 4 and grids[0] is grids[1] is grids[2] and grids[3] is not grids[0]


def test_beit_s_norm_goes_between_the_transposed_convolutions():
    neck = MultiScaleNeck(WIDTH, norm=True)
    assert [type(m) for m in neck.fpn1] == [nn.ConvTranspose2d, nn.BatchNorm2d, nn.GELU, nn.ConvTranspose2d]


@pytest.mark.parametrize("indices, message", [
    ([1, 2, 3], "the neck takes the outputs of 4 blocks"),
    ([0, 1, 2, 12], r"must be in 0 \.\. 11 \(the backbone has 12 blocks\)"),
    ([0, 1, 2, -1], r"must be in 0 \.\. 11"),
])
def test_bad_indices_are_one_sentence(indices, message):
    with pytest.raises(TietaError, match=message):
        feature_indices(12, indices)
