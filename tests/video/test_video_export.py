"""A video run's settings rebuild its model: ``video:`` in the config, checkpoints of what trained,
``tieta export`` -> ``tieta.load`` with the same logits."""

from __future__ import annotations

import pytest
import torch

import tieta
from tieta.deploy.export import export_run, load_export
from tieta.errors import TietaError
from tieta.train.checkpoint import save_checkpoint
from tieta.train.config import load_config
from tieta.train.model import build_model, image_size_of
from tieta.video.model import VideoModel

FRAMES, SIDE, CLASSES = 2, 64, 3
TINY = {"model": "test_vit", "weights": "random", "img_size": SIDE, "video.frames": FRAMES, "adapter.dim": 2,
        "lora.rank": 2}


def clips(batch: int = 2) -> torch.Tensor:
    return torch.randn(batch, FRAMES, 3, SIDE, SIDE, generator=torch.Generator().manual_seed(0))


def trained(config):
    """The configured video model with every trainable tensor given trained-looking values."""
    torch.manual_seed(0)
    model = build_model(config, CLASSES)
    with torch.no_grad():
        for param in model.parameters():
            if param.requires_grad:
                param.normal_(0, 0.2)
    return model.eval()


def test_a_config_with_video_frames_builds_the_video_model_and_an_image_config_does_not():
    config = load_config(overrides={**TINY, "method": "dyt", "video.pool_heads": 4})
    model = build_model(config, CLASSES, random_weights=True)
    assert isinstance(model, VideoModel) and model.frames == FRAMES and model.head.pool.num_heads == 4
    assert image_size_of(model) == SIDE
    trainable = {name for name, param in model.named_parameters() if param.requires_grad}
    assert "head.pool.query" in trainable and "backbone.blocks.0.dispatcher.weight" in trainable
    assert "backbone.blocks.0.attn.qkv.weight" not in trainable
    image = build_model(load_config(overrides={k: v for k, v in TINY.items() if k != "video.frames"}), CLASSES)
    assert not isinstance(image, VideoModel)


@pytest.mark.parametrize("method", ["dyt", "tome+lora"])
def test_export_then_load_gives_the_video_model_s_logits(tmp_path, method):
    config = load_config(overrides={**TINY, "method": method, **({"merge.schedule": 2} if "tome" in method else {})})
    model = trained(config)
    checkpoint = tmp_path / "checkpoint.safetensors"
    save_checkpoint(model, checkpoint, config.to_dict(), CLASSES)
    export_run(checkpoint, tmp_path / "export")
    loaded, info = load_export(tmp_path / "export")
    assert isinstance(loaded, VideoModel) and info.img_size == SIDE and info.config["video"]["frames"] == FRAMES
    # every tensor of the model (the pooling's too), LoRA folded into the frames' backbone
    assert set(loaded.state_dict()) == {key for key in model.state_dict() if "lora" not in key}
    assert "head.pool.query" in loaded.state_dict()
    with torch.no_grad():
        expected, got = model(clips()), tieta.load(tmp_path / "export")(clips())
    torch.testing.assert_close(got, expected, rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("setting, message", [
    ({"video.frames": 0}, "video.frames, the frames of a clip, must be in 1 .. 256"),
    ({"video.frames": 10**6}, "video.frames, the frames of a clip, must be in 1 .. 256"),
    ({"video.pool_heads": 0}, "video.pool_heads must be in 1 .. 4096"),
])
def test_bad_video_settings_are_one_sentence(setting, message):
    with pytest.raises(TietaError, match=message):
        load_config(overrides={**TINY, **setting})


def test_pooling_heads_that_do_not_divide_the_width_are_refused_by_name():
    config = load_config(overrides={**TINY, "video.pool_heads": 3})  # test_vit is 64 wide
    with pytest.raises(TietaError, match="3 heads must divide the backbone's width 64"):
        build_model(config, CLASSES, random_weights=True)
