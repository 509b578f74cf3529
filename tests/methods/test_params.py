import torch

import tieta
from tieta.methods.params import parameter_group
from tests.conftest import make_vit


def test_freeze_leaves_exactly_methods_and_head(vit_variant):
    model = tieta.add_adapter(tieta.add_lora(make_vit(vit_variant), rank=2), dim=2)
    tieta.freeze_backbone(model)
    trainable = {name for name, p in model.named_parameters() if p.requires_grad}
    expected = {name for name, _ in model.named_parameters()
                if "lora_" in name or ".adapter." in name or name.split(".")[0] in ("head", "head_dist")}
    assert trainable == expected
    heads = {"head.weight", "head.bias"} | ({"head_dist.weight", "head_dist.bias"} if vit_variant == "distilled" else set())
    assert heads <= trainable
    assert not any(name.startswith(("pos_embed", "cls_token", "patch_embed", "norm")) for name in trainable)


def test_freeze_without_head():
    model = tieta.freeze_backbone(tieta.add_lora(make_vit("plain")), train_head=False)
    assert not any(p.requires_grad for n, p in model.named_parameters() if n.startswith("head"))


def test_trainable_parameters_counts():
    model = tieta.freeze_backbone(make_vit("plain"))
    trainable, total = tieta.trainable_parameters(model)
    assert trainable == 48 * 5 + 5
    assert total == sum(p.numel() for p in model.parameters())


def test_parameter_groups():
    assert parameter_group("blocks.0.attn.qkv.lora_A") == "lora"
    assert parameter_group("blocks.0.adapter.down.weight") == "adapter"
    assert parameter_group("head.bias") == "head"
    assert parameter_group("blocks.0.attn.qkv.weight") is None
    assert parameter_group("pos_embed") is None
