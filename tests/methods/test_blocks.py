import pytest
import torch
import timm

import tieta
from tieta.methods.blocks import TietaBlock, patch_blocks
from tests.conftest import make_vit


def test_patched_blocks_equal_unpatched_timm(vit_variant):
    model = make_vit(vit_variant)
    x = torch.randn(2, 3, 32, 32)
    expected = model(x)
    patch_blocks(model)
    assert all(type(block) is TietaBlock for block in model.blocks)
    torch.testing.assert_close(model(x), expected, rtol=0, atol=0)


def test_patching_keeps_state_dict_keys(vit_variant):
    model = make_vit(vit_variant)
    keys = list(model.state_dict())
    patch_blocks(model)
    patch_blocks(model)  # idempotent
    assert list(model.state_dict()) == keys


def test_non_vit_is_refused():
    with pytest.raises(tieta.TietaError, match="VisionTransformer"):
        tieta.add_lora(torch.nn.Linear(3, 3))


def test_other_block_types_are_refused():
    model = timm.create_model("vit_base_patch16_224", depth=2, block_fn=timm.models.vision_transformer.ResPostBlock,
                              pretrained=False)
    with pytest.raises(tieta.TietaError, match="ResPostBlock"):
        tieta.add_adapter(model)
