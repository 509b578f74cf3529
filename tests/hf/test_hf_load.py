"""transformers checkpoints as timm ViTs: the converted model computes transformers' own forward."""

from __future__ import annotations

import hashlib
import json
import sys

import pytest
import torch
from timm.layers import resample_abs_pos_embed

import tieta
from tieta.hf import describe

from tests.hf.hf_models import BUILDERS, image_tower, save_hf_model, vision_outputs

IMAGES = torch.randn(2, 3, 32, 32, generator=torch.Generator().manual_seed(0))


@pytest.mark.parametrize("hf_kind", list(BUILDERS))
def test_features_and_pooled_output_equal_transformers(hf_kind, tmp_path):
    hf_model = save_hf_model(hf_kind, tmp_path)
    model = tieta.load_backbone(weights=tmp_path, num_classes=3).eval()
    with torch.no_grad():
        last, pooled = vision_outputs(hf_model, IMAGES)
        features = model.forward_features(IMAGES)
        if hf_kind.startswith("clip"):  # timm's final norm is CLIP's post_layernorm, on every token
            last = image_tower(hf_model).post_layernorm(last)
        torch.testing.assert_close(features, last, rtol=0, atol=1e-5)
        if hf_kind.startswith(("dinov2", "clip", "siglip")) and pooled is not None:
            torch.testing.assert_close(model.forward_head(features, pre_logits=True), pooled, rtol=0, atol=1e-5)
        if hf_kind == "siglip_no_head":  # no attention pooling: the mean of the normed tokens
            torch.testing.assert_close(model.forward_head(features, pre_logits=True), last.mean(1), rtol=0,
                                       atol=1e-5)
    assert model(IMAGES).shape == (2, 3)  # a fresh head for the task's classes


def test_the_model_can_be_left_out_or_named_by_the_checkpoint(tmp_path):
    save_hf_model("dinov2", tmp_path)
    left_out = tieta.load_backbone(weights=tmp_path, num_classes=3)
    named = tieta.load_backbone(str(tmp_path), weights=str(tmp_path), num_classes=3)
    for a, b in zip(left_out.state_dict().values(), named.state_dict().values()):
        if a.shape[0] != 3:  # the heads are fresh
            torch.testing.assert_close(a, b)
    random = tieta.load_backbone(str(tmp_path), weights="random", num_classes=3)  # config.json only
    assert random.state_dict().keys() == named.state_dict().keys()
    assert not torch.equal(random.cls_token, named.cls_token)


def test_position_embeddings_are_resampled_to_the_input_size(tmp_path):
    hf_model = save_hf_model("vit", tmp_path)
    model = tieta.load_backbone(weights=tmp_path, num_classes=3, img_size=48)
    saved = hf_model.state_dict()
    positions = next(value for key, value in saved.items() if key.endswith("position_embeddings"))
    expected = resample_abs_pos_embed(positions, new_size=[6, 6], old_size=[4, 4], num_prefix_tokens=1)
    torch.testing.assert_close(model.pos_embed, expected)
    assert model(torch.randn(1, 3, 48, 48)).shape == (1, 3)
    with pytest.raises(tieta.TietaError, match="not a multiple of the patch size 8"):
        tieta.load_backbone(weights=tmp_path, num_classes=3, img_size=50)


@pytest.mark.parametrize("kind, mean, interpolation, crop", [
    ("vit", (0.5, 0.5, 0.5), "bilinear", 1.0),
    ("dinov2", (0.485, 0.456, 0.406), "bicubic", 0.875),
    ("clip_vision", (0.48145466, 0.4578275, 0.40821073), "bicubic", 1.0),
    ("siglip_vision", (0.5, 0.5, 0.5), "bicubic", 1.0),
])
def test_without_a_processor_config_the_family_defaults_apply(tmp_path, kind, mean, interpolation, crop):
    save_hf_model(kind, tmp_path)
    cfg = tieta.load_backbone(weights=tmp_path, num_classes=3).pretrained_cfg
    assert cfg["mean"] == pytest.approx(mean) and cfg["interpolation"] == interpolation
    assert cfg["crop_pct"] == pytest.approx(crop)


def test_the_processor_config_sets_mean_std_interpolation_and_crop(tmp_path):
    from transformers import CLIPImageProcessor

    save_hf_model("clip_vision", tmp_path)
    CLIPImageProcessor(image_mean=[0.1, 0.2, 0.3], image_std=[0.4, 0.5, 0.6], resample=2,
                       size={"shortest_edge": 40}, crop_size={"height": 32, "width": 32}).save_pretrained(tmp_path)
    cfg = tieta.load_backbone(weights=tmp_path, num_classes=3).pretrained_cfg
    assert cfg["mean"] == pytest.approx((0.1, 0.2, 0.3)) and cfg["std"] == pytest.approx((0.4, 0.5, 0.6))
    assert cfg["interpolation"] == "bilinear" and cfg["crop_pct"] == pytest.approx(0.8)
    assert cfg["input_size"] == (3, 32, 32) and cfg["num_classes"] == 3


def test_describe_records_the_source_and_the_weights_checksum(tmp_path):
    save_hf_model("siglip_vision", tmp_path)
    found = describe(tmp_path)
    digest = hashlib.sha256((tmp_path / "model.safetensors").read_bytes()).hexdigest()
    assert found == {"kind": "transformers", "model_type": "siglip_vision_model", "source": str(tmp_path.resolve()),
                     "folder": str(tmp_path.resolve()), "weights": [{"file": "model.safetensors", "sha256": digest}]}


def test_a_hub_name_is_fetched_with_snapshot_download(tmp_path, monkeypatch):
    hf_model = save_hf_model("vit", tmp_path)
    asked = []

    def snapshot_download(repo_id, **kwargs):
        asked.append((repo_id, kwargs))
        return str(tmp_path)

    monkeypatch.setattr("huggingface_hub.snapshot_download", snapshot_download)
    model = tieta.load_backbone(weights="hf:google/tiny-vit", num_classes=3).eval()
    assert asked[0][0] == "google/tiny-vit"
    assert {"*.json", "*.safetensors"} <= set(asked[0][1]["allow_patterns"])
    with torch.no_grad():
        torch.testing.assert_close(model.forward_features(IMAGES), vision_outputs(hf_model, IMAGES)[0], rtol=0,
                                   atol=1e-5)
    assert describe("hf:google/tiny-vit")["source"] == "hf:google/tiny-vit"


def test_an_unreachable_hub_is_one_sentence(monkeypatch):
    def offline(repo_id, **kwargs):
        raise OSError("We couldn't connect to 'https://huggingface.co'\nmore lines")

    monkeypatch.setattr("huggingface_hub.snapshot_download", offline)
    with pytest.raises(tieta.TietaError, match=r"could not get hf:org/name from the model hub \(We couldn't"):
        tieta.load_backbone(weights="hf:org/name", num_classes=3)
    with pytest.raises(tieta.TietaError, match="hf:ORG/NAME"):
        tieta.load_backbone(weights="hf:no-slash", num_classes=3)


def test_pytorch_bin_weights_are_read_without_unpickling_code(tmp_path, monkeypatch):
    from safetensors.torch import load_file

    hf_model = save_hf_model("clip_vision", tmp_path)
    tensors = load_file(tmp_path / "model.safetensors")
    (tmp_path / "model.safetensors").unlink()
    torch.save(tensors, tmp_path / "pytorch_model.bin")
    loads = []
    real_load = torch.load
    monkeypatch.setattr(torch, "load", lambda *a, **k: loads.append(k) or real_load(*a, **k))
    model = tieta.load_backbone(weights=tmp_path, num_classes=3).eval()
    assert loads and all(k.get("weights_only") is True for k in loads)
    with torch.no_grad():
        torch.testing.assert_close(model.forward_head(model.forward_features(IMAGES), pre_logits=True),
                                   vision_outputs(hf_model, IMAGES)[1], rtol=0, atol=1e-5)


def test_reading_a_checkpoint_needs_no_transformers(tmp_path, monkeypatch):
    hf_model = save_hf_model("dinov2_registers", tmp_path)
    monkeypatch.setitem(sys.modules, "transformers", None)  # import transformers now fails
    model = tieta.load_backbone(weights=tmp_path, num_classes=3).eval()
    with torch.no_grad():
        torch.testing.assert_close(model.forward_features(IMAGES), vision_outputs(hf_model, IMAGES)[0], rtol=0,
                                   atol=1e-5)


def test_what_cannot_be_converted_is_one_sentence(tmp_path):
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(tieta.TietaError, match="give a timm model name .*a folder with the config.json"):
        tieta.load_backbone(weights=empty, num_classes=3)
    with pytest.raises(tieta.TietaError, match="is not a file"):  # a folder is no timm weights file either
        tieta.load_backbone("test_vit", weights=empty, num_classes=3)
    bert = tmp_path / "bert"
    bert.mkdir()
    (bert / "config.json").write_text(json.dumps({"model_type": "bert"}))
    with pytest.raises(tieta.TietaError, match="is a 'bert' model; tieta converts .*dinov2.*vit"):
        tieta.load_backbone(weights=bert, num_classes=3)
    save_hf_model("vit", tmp_path / "vit")
    with pytest.raises(tieta.TietaError, match="leave out the model name"):
        tieta.load_backbone("vit_small_patch16_224", weights=tmp_path / "vit", num_classes=3)
    with pytest.raises(tieta.TietaError, match="give a timm model name"):
        tieta.load_backbone(weights=None, num_classes=3)

