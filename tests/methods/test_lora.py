import pytest
import torch

import tieta
from tieta.methods.lora import LoRALinear
from tests.conftest import make_vit


def _train_steps(model, steps=3, seed=0):
    torch.manual_seed(seed)
    tieta.freeze_backbone(model)
    optimizer = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=0.5)
    model.train()
    for _ in range(steps):
        x = torch.randn(4, 3, 32, 32)
        loss = model(x).square().mean()
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    return model.eval()


@pytest.mark.parametrize("targets,alpha", [("qkv", None), ("qv", 16), ("k", None), (("q", "k", "v"), 4)])
def test_fresh_lora_is_identity(vit_variant, targets, alpha):
    model = make_vit(vit_variant)
    x = torch.randn(2, 3, 32, 32)
    expected = model(x)
    tieta.add_lora(model, rank=4, targets=targets, alpha=alpha)
    torch.testing.assert_close(model(x), expected, rtol=0, atol=0)


@pytest.mark.parametrize("targets,alpha", [("qkv", None), ("qv", 16), ("v", 2)])
def test_merged_equals_unmerged_after_training(vit_variant, targets, alpha):
    model = _train_steps(tieta.add_lora(make_vit(vit_variant), rank=4, targets=targets, alpha=alpha))
    assert model.blocks[0].attn.qkv.lora_B.abs().sum() > 0, "training should move B away from zero"
    x = torch.randn(3, 3, 32, 32)
    with torch.no_grad():
        unmerged = model(x)
        tieta.merge_lora(model)
        merged = model(x)
    assert all(type(block.attn.qkv) is torch.nn.Linear for block in model.blocks)
    assert not any("lora" in name for name in model.state_dict())
    torch.testing.assert_close(merged, unmerged, rtol=1e-5, atol=1e-5)


def test_lora_update_formula():
    """qkv(x) + scale * B A x, with the per-target B written only to its third of the output."""
    torch.manual_seed(0)
    linear = torch.nn.Linear(6, 18)
    model = make_vit("plain")
    model.blocks[0].attn.qkv = linear
    tieta.add_lora(model, rank=2, targets="qv", alpha=4, dropout=0.0)
    layer = model.blocks[0].attn.qkv
    with torch.no_grad():
        layer.lora_B.normal_()
    x = torch.randn(5, 6)
    a_q, a_v = layer.lora_A[:2], layer.lora_A[2:]
    b_q, b_v = layer.lora_B[0], layer.lora_B[1]
    expected = x @ linear.weight.T + linear.bias
    expected[:, 0:6] += 2 * (x @ a_q.T @ b_q.T)
    expected[:, 12:18] += 2 * (x @ a_v.T @ b_v.T)
    torch.testing.assert_close(layer(x), expected)



@pytest.mark.parametrize("targets,alpha", [("qkv", None), ("qv", 4)])
def test_output_rows_are_those_rows_of_the_whole_output(targets, alpha):
    """What MCTF asks of a fused qkv: q and k alone, or v alone, as the whole layer gives them."""
    torch.manual_seed(0)
    model = make_vit("plain")
    tieta.add_lora(model, rank=2, targets=targets, alpha=alpha, dropout=0.0)
    layer = model.blocks[0].attn.qkv
    with torch.no_grad():
        layer.lora_B.normal_()
    x = torch.randn(2, 5, layer.in_features)
    third = layer.out_features // 3
    for start, stop in ((0, 2 * third), (2 * third, 3 * third), (third, third + 1)):
        torch.testing.assert_close(layer.output_rows(x, start, stop), layer(x)[..., start:stop])


def test_noah_parameter_count_on_vit_b_shape():
    """Rank 8 on the fused qkv of ViT-B: 0.29M LoRA parameters (PYRA/NOAH budget)."""
    model = tieta.load_backbone("vit_base_patch16_224", weights="random", num_classes=10)
    tieta.freeze_backbone(tieta.add_lora(model, rank=8))
    trainable, total = tieta.trainable_parameters(model)
    head = 768 * 10 + 10
    assert trainable - head == 12 * (8 * 768 + 3 * 768 * 8) == 294_912
    assert isinstance(model.blocks[0].attn.qkv, LoRALinear)


def test_lora_keeps_backbone_keys_and_adds_lora_keys():
    model = make_vit("plain")
    keys = set(model.state_dict())
    tieta.add_lora(model, rank=2)
    added = set(model.state_dict()) - keys
    assert keys <= set(model.state_dict())
    assert added == {f"blocks.{i}.attn.qkv.lora_{m}" for i in range(3) for m in "AB"}


@pytest.mark.parametrize("targets", ["qq", "x", "", ("q", "z")])
def test_bad_targets(targets):
    with pytest.raises(tieta.TietaError, match="targets"):
        tieta.add_lora(make_vit("plain"), targets=targets)


def test_twice_is_refused():
    model = tieta.add_lora(make_vit("plain"))
    with pytest.raises(tieta.TietaError, match="already"):
        tieta.add_lora(model)


def test_merge_refuses_non_finite():
    model = tieta.add_lora(make_vit("plain"), rank=2)
    with torch.no_grad():
        model.blocks[1].attn.qkv.lora_B.fill_(float("nan"))
    with pytest.raises(tieta.TietaError, match="NaN"):
        tieta.merge_lora(model)
