"""Which parameters belong to which method: freezing, counting and optimizer groups.

Every method names its parameters recognisably (a contract that checkpoints and tools rely on):
``lora_A`` / ``lora_B`` for LoRA, submodules called ``adapter``, ``pyra``, ``dispatcher`` and ``mlp_dispatcher`` for adapters,
PYRA and DyT, and the classifier
``head`` (``head_dist`` for distilled ViTs). Everything else is the pretrained backbone.
"""

from __future__ import annotations

from typing import Iterator, Optional

from torch import nn

# submodule name -> group, for methods that live in a submodule of their own
_MODULE_GROUPS = {"adapter": "adapter", "pyra": "pyra", "dispatcher": "dyt", "mlp_dispatcher": "dyt"}
_HEAD_MODULES = ("head", "head_dist")


def parameter_group(name: str) -> Optional[str]:
    """The method a parameter belongs to ("lora", "adapter", "pyra", "dyt", "head"), or None for the backbone.

    Args:
        name: a name from ``model.named_parameters()``, e.g. "blocks.3.attn.qkv.lora_A".
    """
    parts = name.split(".")
    if parts[0] in _HEAD_MODULES:
        return "head"
    if any(part.startswith("lora_") for part in parts):
        return "lora"
    for part in parts:
        if part in _MODULE_GROUPS:
            return _MODULE_GROUPS[part]
    return None


def method_parameters(model: nn.Module) -> Iterator[tuple[str, str, nn.Parameter]]:
    """Yield (group, name, parameter) for every parameter that is not the frozen backbone."""
    for name, param in model.named_parameters():
        group = parameter_group(name)
        if group is not None:
            yield group, name, param


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
