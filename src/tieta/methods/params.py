"""Which parameters belong to which method: freezing, counting and optimizer groups.

Every method names the submodules that hold its parameters (``Method.modules``: ``lora_A`` /
``lora_B``, ``adapter``, ``pyra``, ``dispatcher``...); the classifier is ``head`` (``head_dist``
for distilled ViTs). Everything else is the pretrained backbone.
"""

from __future__ import annotations

from typing import Optional

from torch import nn

from tieta.methods import registry

_HEAD_MODULES = ("head", "head_dist")


def parameter_group(name: str) -> Optional[str]:
    """The group of a parameter: a method's name, "head", or None for the backbone.

    Args:
        name: a name from ``model.named_parameters()``, e.g. "blocks.3.attn.qkv.lora_A".
    """
    if name.split(".", 1)[0] in _HEAD_MODULES:
        return "head"
    return registry.parameter_group(name)


def freeze_backbone(model: nn.Module, train_head: bool = True) -> nn.Module:
    """Freeze everything but tieta's modules (and the classifier head, unless ``train_head`` is False).

    Returns:
        The same model.
    """
    for name, param in model.named_parameters():
        group = parameter_group(name)
        param.requires_grad_(group is not None and (train_head or group != "head"))
    return model


def trainable_parameters(model: nn.Module) -> tuple[int, int]:
    """Return (trainable, total) parameter counts; trainable means ``requires_grad``."""
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    total = sum(p.numel() for p in model.parameters())
    return trainable, total
