"""Small random transformers vision models, saved with save_pretrained into a folder (no model hub)."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

transformers = pytest.importorskip("transformers")

SMALL = dict(hidden_size=32, num_hidden_layers=2, num_attention_heads=2, image_size=32, patch_size=8)
TEXT = dict(hidden_size=32, num_hidden_layers=1, num_attention_heads=2, intermediate_size=64)


def _clip(full: bool):
    vision = dict(SMALL, intermediate_size=64)
    if full:
        return transformers.CLIPModel(transformers.CLIPConfig(vision_config=vision, text_config=TEXT,
                                                              projection_dim=16))
    return transformers.CLIPVisionModel(transformers.CLIPVisionConfig(**vision))


def _siglip(full: bool, head: bool = True):
    vision = dict(SMALL, intermediate_size=64, vision_use_head=head)
    if full:
        return transformers.SiglipModel(transformers.SiglipConfig(vision_config=vision, text_config=TEXT))
    return transformers.SiglipVisionModel(transformers.SiglipVisionConfig(**vision))


# name -> builder of a small random transformers model of each kind tieta converts
BUILDERS = {
    "vit": lambda: transformers.ViTModel(transformers.ViTConfig(**SMALL, intermediate_size=64)),
    "vit_classifier": lambda: transformers.ViTForImageClassification(
        transformers.ViTConfig(**SMALL, intermediate_size=64, num_labels=4)),
    "dinov2": lambda: transformers.Dinov2Model(transformers.Dinov2Config(**SMALL, mlp_ratio=2)),
    "dinov2_registers": lambda: transformers.Dinov2WithRegistersModel(
        transformers.Dinov2WithRegistersConfig(**SMALL, mlp_ratio=2, num_register_tokens=2)),
    "clip_vision": lambda: _clip(full=False),
    "clip": lambda: _clip(full=True),
    "siglip_vision": lambda: _siglip(full=False),
    "siglip": lambda: _siglip(full=True),
    "siglip_no_head": lambda: _siglip(full=False, head=False),
}


def make_hf_model(kind: str, seed: int = 0):
    """A small random transformers model of ``kind`` in eval mode, every parameter moved off its
    initial value (norms at 1/0 and LayerScale at 1 would hide a swapped tensor)."""
    torch.manual_seed(seed)
    model = BUILDERS[kind]()
    with torch.no_grad():
        for param in model.parameters():
            param.add_(torch.randn_like(param) * 0.1)
    return model.eval()


def save_hf_model(kind: str, folder: Path, seed: int = 0):
    """``make_hf_model(kind)`` written to ``folder`` with save_pretrained; returns the model."""
    model = make_hf_model(kind, seed)
    model.save_pretrained(folder)
    return model


def vision_outputs(model, images: torch.Tensor):
    """(last_hidden_state, pooler_output) of a transformers model's image tower (a two-tower
    model's vision_model, a classifier's backbone)."""
    tower = image_tower(model)
    found = tower(pixel_values=images)
    return found.last_hidden_state, found.pooler_output



def image_tower(model):
    """The image model inside a two-tower model or a classifier (the model itself otherwise)."""
    for name in ("vision_model", "vit", "dinov2"):
        if isinstance(getattr(model, name, None), torch.nn.Module):
            return getattr(model, name)
    return model
