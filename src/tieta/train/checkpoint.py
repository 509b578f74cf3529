"""Checkpoints that hold only what was trained, plus the config that rebuilds the rest.

A tieta checkpoint is a ``.safetensors`` file (no pickled code can run on load) whose tensors are
the trainable parameters (LoRA, adapters, head, ...) and whose metadata carries the run config as
JSON. The frozen backbone is rebuilt from the config's model name and weights.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file
from safetensors import safe_open
from torch import nn

from tieta.errors import TietaError

CONFIG_KEY = "tieta_config"
NUM_CLASSES_KEY = "num_classes"


def save_checkpoint(model: nn.Module, path: Path, config: dict[str, Any], num_classes: int) -> None:
    """Write the trainable parameters of ``model`` and ``config`` to ``path``, atomically."""
    tensors = {name: p.detach().cpu().contiguous() for name, p in model.named_parameters() if p.requires_grad}
    metadata = {CONFIG_KEY: json.dumps(config), NUM_CLASSES_KEY: str(num_classes), "format": "pt"}
    path = Path(path)
    partial = path.with_name(path.name + ".partial")
    save_file(tensors, str(partial), metadata=metadata)
    os.replace(partial, path)


def read_checkpoint(path: Path) -> tuple[dict[str, torch.Tensor], dict[str, Any], int]:
    """Return (tensors, config dict, num_classes) from a tieta checkpoint."""
    path = Path(path)
    if not path.is_file():
        raise TietaError(f"checkpoint {path} does not exist")
    try:
        with safe_open(str(path), framework="pt") as handle:
            metadata = handle.metadata() or {}
        tensors = load_file(str(path))
    except (SafetensorError, OSError, ValueError) as error:
        raise TietaError(f"{path} is not a readable safetensors checkpoint ({error})") from error
    if CONFIG_KEY not in metadata or NUM_CLASSES_KEY not in metadata:
        raise TietaError(f"{path} is a safetensors file but not a tieta checkpoint (no run config inside)")
    return tensors, json.loads(metadata[CONFIG_KEY]), int(metadata[NUM_CLASSES_KEY])


def load_trained(model: nn.Module, tensors: dict[str, torch.Tensor]) -> None:
    """Copy checkpoint tensors into ``model``; every tensor must match a parameter by name and shape."""
    params = dict(model.named_parameters())
    for name, tensor in tensors.items():
        if name not in params:
            raise TietaError(f"the checkpoint has {name}, which this model lacks (built with other methods?)")
        if params[name].shape != tensor.shape:
            raise TietaError(f"{name} is {tuple(tensor.shape)} in the checkpoint but {tuple(params[name].shape)} here")
    with torch.no_grad():
        for name, tensor in tensors.items():
            params[name].copy_(tensor)
