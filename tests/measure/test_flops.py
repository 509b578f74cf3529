import timm
import torch
from timm.models.vision_transformer import VisionTransformer

import tieta
from tieta.measure.flops import count_flops
from tests.conftest import make_vit


def _vit_macs(tokens, width, depth, patch_macs, mlp_ratio=4):
    per_block = tokens * width * 3 * width + 2 * tokens * tokens * width + tokens * width * width
    per_block += 2 * tokens * width * mlp_ratio * width
    return depth * per_block + patch_macs


def test_vit_b16_matches_the_field_and_pyra_units():
    model = timm.create_model("vit_base_patch16_224", num_classes=0)
    result = tieta.count_flops(model, torch.randn(1, 3, 224, 224))
    expected = _vit_macs(197, 768, 12, 196 * 768 * 768)
    assert abs(result["gmacs"] * 1e9 - expected) / expected < 1e-6
    assert abs(result["gmacs"] - 17.58) / 17.58 < 0.01
    assert abs(result["pyra_gflops"] - 16.37) / 16.37 < 0.01


def test_attention_is_counted_on_cpu_fused_path():
    model = make_vit("plain")
    assert all(block.attn.fused_attn for block in model.blocks)
    result = tieta.count_flops(model, torch.randn(2, 3, 32, 32))
    tokens, width = 17, 48
    expected = _vit_macs(tokens, width, 3, 16 * 48 * 3 * 64) + width * 5
    assert round(result["gmacs"] * 1e9) == expected


def test_lora_unmerged_costs_and_merged_does_not():
    model = make_vit("plain")
    x = torch.randn(1, 3, 32, 32)
    base = tieta.count_flops(model, x)["gmacs"]
    tieta.add_lora(model, rank=2)
    extra = 3 * 17 * (48 * 2 + 2 * 144)
    assert round((tieta.count_flops(model, x)["gmacs"] - base) * 1e9) == extra
    tieta.merge_lora(model)
    assert tieta.count_flops(model, x)["gmacs"] == base


def test_an_attention_pool_head_is_counted_and_its_parameters_still_train():
    model = VisionTransformer(img_size=32, patch_size=8, embed_dim=32, depth=1, num_heads=2, global_pool="map",
                              class_token=False)  # SigLIP's head
    model.blocks[0].attn.qkv.weight.requires_grad_(False)  # a frozen weight stays frozen
    assert count_flops(model, torch.randn(2, 3, 32, 32))["gmacs"] > 0
    frozen = [name for name, parameter in model.named_parameters() if not parameter.requires_grad]
    assert frozen == ["blocks.0.attn.qkv.weight"]
