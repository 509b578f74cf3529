"""A segmentation run's settings rebuild its model: ``segmentation:`` in the config, checkpoints
of what trained (the heads' norm statistics too), ``tieta export`` -> ``tieta.load`` with the same
logits."""

from __future__ import annotations

import pytest
import torch
from torch import nn

import tieta
from tieta.dense.model import SegmentationModel
from tieta.deploy.export import export_run, load_export
from tieta.errors import TietaError
from tieta.train.checkpoint import read_checkpoint, save_checkpoint
from tieta.train.config import load_config
from tieta.train.model import build_model, image_size_of
from tieta.train.run_model import load_run_model

SIDE, CLASSES = 64, 3
TINY = {"model": "test_vit", "weights": "random", "img_size": SIDE, "segmentation.head": "upernet",
        "segmentation.channels": 16, "segmentation.aux_channels": 8, "adapter.dim": 2, "lora.rank": 2}


def trained(config):
    """The configured model with every trained tensor given trained-looking values (the norms'
    running statistics too)."""
    torch.manual_seed(0)
    model = build_model(config, CLASSES)
    with torch.no_grad():
        for param in model.parameters():
            if param.requires_grad:
                param.normal_(0, 0.2)
        for module in model.modules():
            if isinstance(module, nn.BatchNorm2d):
                module.running_mean.normal_(0, 0.1)
                module.running_var.uniform_(0.5, 1.5)
    return model.eval()


def test_a_config_with_a_segmentation_head_builds_the_segmentation_model():
    config = load_config(overrides={**TINY, "method": "dyt", "segmentation.indices": [1, 2, 3, 5],
                                    "segmentation.aux_weight": 0.2, "segmentation.ignore_index": 0})
    model = build_model(config, CLASSES, random_weights=True)
    assert isinstance(model, SegmentationModel) and model.indices == [1, 2, 3, 5] and model.classes == CLASSES
    assert (model.aux_weight, model.ignore_index) == (0.2, 0)
    assert "backbone.pos_embed" in model.no_weight_decay()
    assert image_size_of(model) == SIDE
    trainable = {name for name, param in model.named_parameters() if param.requires_grad}
    assert {"head.neck.fpn1.0.weight", "head.decode_head.conv_seg.weight",
            "backbone.blocks.0.dispatcher.weight"} <= trainable
    assert "backbone.blocks.0.attn.qkv.weight" not in trainable
    image = build_model(load_config(overrides={k: v for k, v in TINY.items() if not k.startswith("segm")}), CLASSES)
    assert not isinstance(image, SegmentationModel)


@pytest.mark.parametrize("method", ["dyt", "lora"])
def test_export_then_load_gives_the_segmentation_model_s_logits(tmp_path, method):
    config = load_config(overrides={**TINY, "method": method})
    model = trained(config)
    checkpoint = tmp_path / "checkpoint.safetensors"
    save_checkpoint(model, checkpoint, config.to_dict(), CLASSES)
    tensors, _, _ = read_checkpoint(checkpoint)
    assert "head.decode_head.bottleneck.bn.running_var" in tensors  # the heads' statistics are trained too
    rebuilt, _, _ = load_run_model(checkpoint)
    images = torch.randn(2, 3, SIDE, SIDE, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        expected = model(images)
        torch.testing.assert_close(rebuilt.eval()(images), expected)
    export_run(checkpoint, tmp_path / "export")
    loaded, info = load_export(tmp_path / "export")
    assert isinstance(loaded, SegmentationModel) and info.config["segmentation"]["head"] == "upernet"
    assert set(loaded.state_dict()) == {key for key in model.state_dict() if "lora" not in key}
    with torch.no_grad():
        got = tieta.load(tmp_path / "export")(images)
    assert got.shape == (2, CLASSES, SIDE, SIDE)
    torch.testing.assert_close(got, expected, rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("setting, message", [
    ({"segmentation.head": "fcn"}, "segmentation.head must be one of upernet"),
    ({"segmentation.channels": 0}, "segmentation.channels must be in 1 .. 4096"),
    ({"segmentation.aux_channels": -1}, "segmentation.aux_channels in 0 .. 4096"),
    ({"segmentation.indices": [1, 2]}, "segmentation.indices names the 4 blocks"),
    ({"segmentation.aux_weight": -0.4}, "segmentation.aux_weight cannot be negative"),
])
def test_bad_segmentation_settings_are_one_sentence(setting, message):
    with pytest.raises(TietaError, match=message):
        load_config(overrides={**TINY, **setting})


def test_indices_beyond_the_backbone_are_refused_by_name():
    config = load_config(overrides={**TINY, "segmentation.indices": [0, 1, 2, 6]})  # test_vit has 6 blocks
    with pytest.raises(TietaError, match=r"must be in 0 \.\. 5 \(the backbone has 6 blocks\)"):
        build_model(config, CLASSES, random_weights=True)
