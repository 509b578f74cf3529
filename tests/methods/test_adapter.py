import torch

import tieta
from tieta.methods.adapter import Adapter
from tests.conftest import make_vit


def test_fresh_adapter_is_identity(vit_variant):
    model = make_vit(vit_variant)
    x = torch.randn(2, 3, 32, 32)
    expected = model(x)
    tieta.add_adapter(model, dim=4)
    torch.testing.assert_close(model(x), expected, rtol=0, atol=0)


def test_adapter_is_parallel_to_mlp_on_the_block_stream():
    """x = x + attn(norm1(x)); x = x + ls2(mlp(norm2(x))) + s * up(relu(down(x)))."""
    model = make_vit("layerscale")
    tieta.add_adapter(model, dim=4, scale=0.5, dropout=0.0)
    block = model.blocks[0]
    with torch.no_grad():
        block.adapter.up.weight.normal_()
        block.adapter.up.bias.normal_()
    x = torch.randn(2, 17, 48)
    h = x + block.ls1(block.attn(block.norm1(x)))
    adapter = block.adapter
    expected = h + block.ls2(block.mlp(block.norm2(h))) + 0.5 * adapter.up(torch.relu(adapter.down(h)))
    torch.testing.assert_close(block(x), expected)


def test_adapter_budget_on_vit_b_shape():
    """d = 8 on ViT-B: about 0.16M parameters (the DyT tables' budget)."""
    model = tieta.load_backbone("vit_base_patch16_224", weights="random", num_classes=10)
    tieta.freeze_backbone(tieta.add_adapter(model, dim=8))
    trainable, _ = tieta.trainable_parameters(model)
    assert trainable - (768 * 10 + 10) == 12 * (768 * 8 + 8 + 8 * 768 + 768) == 156_768


def test_adapter_init():
    adapter = Adapter(16, 4)
    assert torch.all(adapter.up.weight == 0) and torch.all(adapter.up.bias == 0)
    assert torch.all(adapter.down.bias == 0) and adapter.down.weight.abs().sum() > 0
