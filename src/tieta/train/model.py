"""From a RunConfig to a ready model: backbone, then each method in the order named, then freezing."""

from __future__ import annotations

import random
from typing import Optional

import numpy as np
import torch
from torch import nn

from tieta.backbone import load_backbone
from tieta.dense.model import segmentation_model_for
from tieta.methods.params import freeze_backbone
from tieta.train.config import RunConfig
from tieta.train.record import check_backbone
from tieta.video.model import frame_backbone, video_model_for


def apply_methods(model: nn.Module, config: RunConfig) -> nn.Module:
    """Attach the configured methods in order and freeze everything else."""
    for method in config.method_list:
        method.attach(model, config)
    return freeze_backbone(model)


def build_backbone(config: RunConfig, num_classes: int, random_weights: bool = False) -> nn.Module:
    """The configured timm ViT alone, without any method (the baseline a method's cost is compared
    with).

    Args:
        num_classes: the task's classes.
        random_weights: start from random weights instead of the configured ones (where they are
            about to be replaced or do not matter, as for FLOPs).

    Raises:
        TietaError: the configured weights are not those the run's record names (tieta.train.record).
    """
    if not random_weights:
        check_backbone(config)
    return load_backbone(
        config.model,
        weights="random" if random_weights else config.weights,
        num_classes=num_classes,
        img_size=config.img_size,
        drop_path_rate=config.drop_path,
    )


def build_model(config: RunConfig, num_classes: int, random_weights: bool = False) -> nn.Module:
    """The configured backbone with its methods attached, backbone frozen (arguments as
    :func:`build_backbone`); for a video run (``video.frames``), the video model around it; for a
    segmentation run (``segmentation.head``), the segmentation model around it."""
    model = apply_methods(build_backbone(config, num_classes, random_weights), config)
    return segmentation_model_for(video_model_for(model, config), config, num_classes)


def build_plain_model(config: RunConfig, num_classes: int, random_weights: bool = False) -> nn.Module:
    """The configured model without any method (the baseline a run's cost is compared with): the
    backbone alone, or the video or segmentation model around it as the run's settings say."""
    model = freeze_backbone(build_backbone(config, num_classes, random_weights))
    return segmentation_model_for(video_model_for(model, config), config, num_classes)


def example_input(model: nn.Module, generator: Optional[torch.Generator] = None) -> torch.Tensor:
    """One random input of ``model``'s kind on its device: an image (1, 3, S, S), or for a video
    model a clip (1, T, 3, S, S)."""
    side = image_size_of(model)
    frames = getattr(model, "frames", None)
    shape = (1, 3, side, side) if frames is None else (1, frames, 3, side, side)
    return torch.randn(shape, generator=generator).to(next(model.parameters()).device)


def seed_everything(seed: int) -> None:
    """Seed Python's, NumPy's and torch's generators (before a model is built: a random backbone
    and fresh method weights come back the same)."""
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


def image_size_of(model: nn.Module) -> int:
    """The image side, in pixels, the model's patch embedding takes."""
    return int(frame_backbone(model).patch_embed.img_size[0])  # a video model's: its frames'
