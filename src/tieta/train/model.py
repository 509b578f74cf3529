"""From a RunConfig to a ready model: backbone, then each method in the order named, then freezing."""

from __future__ import annotations

import dataclasses
from typing import Callable

from torch import nn

from tieta.backbone import load_backbone
from tieta.errors import TietaError
from tieta.methods.adapter import add_adapter
from tieta.methods.dyt import add_dyt
from tieta.methods.lora import add_lora
from tieta.methods.pyra import add_pyra
from tieta.methods.tome import add_tome
from tieta.methods.params import freeze_backbone
from tieta.train.config import RunConfig

# method name -> how to attach it to a model from its config section
METHODS: dict[str, Callable[[nn.Module, RunConfig], nn.Module]] = {
    "lora": lambda model, config: add_lora(model, **dataclasses.asdict(config.lora)),
    "adapter": lambda model, config: add_adapter(model, **dataclasses.asdict(config.adapter)),
    "tome": lambda model, config: add_tome(model, merge_schedule(config), config.merge.prop_attn),
    "pyra": lambda model, config: add_pyra(model, merge_schedule(config), config.merge.prop_attn),
    "dyt": lambda model, config: add_dyt(model, config.dyt.rho, config.dyt.variant, config.dyt.adapter_dim,
                                         config.dyt.experts, config.dyt.tau, config.adapter.scale,
                                         config.adapter.dropout),
}


def merge_schedule(config: RunConfig):
    """The configured schedule in the form add_tome takes ({r, inflection} becomes a tuple)."""
    schedule = config.merge.schedule
    if isinstance(schedule, dict):
        if set(schedule) != {"r", "inflection"}:
            raise TietaError("a schedule mapping takes exactly the keys r and inflection")
        return (schedule["r"], schedule["inflection"])
    return schedule


def apply_methods(model: nn.Module, config: RunConfig) -> nn.Module:
    """Attach the configured methods in order and freeze everything else."""
    for name in config.methods:
        METHODS[name](model, config)
    return freeze_backbone(model)


def build_model(config: RunConfig, num_classes: int, weights: str | None | bool = True) -> nn.Module:
    """The configured backbone with its methods attached, backbone frozen.

    Args:
        num_classes: the task's classes.
        weights: True for the configured weights; otherwise the value to use instead (e.g. "random"
            when the backbone's weights are about to be replaced or do not matter, as for FLOPs).
    """
    model = load_backbone(
        config.model,
        weights=config.weights if weights is True else weights,
        num_classes=num_classes,
        img_size=config.img_size,
        drop_path_rate=config.drop_path,
    )
    return apply_methods(model, config)
