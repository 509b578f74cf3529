"""Checkpoints that hold only what was trained, plus the config that rebuilds the rest.

A tieta checkpoint is a ``.safetensors`` file (no pickled code can run on load) whose tensors are
the trainable parameters (LoRA, adapters, head, ...) and whose metadata carries the run config as
JSON. The frozen backbone is rebuilt from the config's model name and weights.

safetensors itself has no checksum, so tieta stores one: the SHA-256 of every tensor (name, dtype,
shape, bytes) and metadata entry, checked on every read. It finds a corrupted or edited file; it is
not a signature, so it does not stop someone who rewrites the file and its checksum together.
"""

from __future__ import annotations

import hashlib
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


CHECKSUM_KEY = "tieta_sha256"


def checksum(tensors: dict[str, torch.Tensor], metadata: dict[str, str]) -> str:
    """SHA-256 over the tensors (in name order: name, dtype, shape, bytes) and the metadata entries
    (in key order, the checksum's own left out)."""
    digest = hashlib.sha256()
    for name in sorted(tensors):
        tensor = tensors[name].detach().cpu().contiguous()
        digest.update(f"{name}|{tensor.dtype}|{tuple(tensor.shape)}|".encode())
        digest.update(tensor.reshape(-1).view(torch.uint8).numpy().tobytes())
    for key in sorted(k for k in metadata if k != CHECKSUM_KEY):
        digest.update(f"{key}={metadata[key]}|".encode())
    return digest.hexdigest()


def write_tensors(tensors: dict[str, torch.Tensor], path: Path, metadata: dict[str, str]) -> None:
    """Write a safetensors file with its checksum, atomically: the file at ``path`` is the old one or
    the new one, never a part (a full disk leaves the old one and raises a TietaError)."""
    tensors = {name: tensor.detach().cpu().contiguous() for name, tensor in tensors.items()}
    metadata = {**metadata, "format": "pt"}
    metadata[CHECKSUM_KEY] = checksum(tensors, metadata)
    path = Path(path)
    partial = path.with_name(path.name + ".partial")
    try:
        save_file(tensors, str(partial), metadata=metadata)
        with open(partial, "rb+") as handle:
            os.fsync(handle.fileno())
        os.replace(partial, path)
    except OSError as error:
        partial.unlink(missing_ok=True)
        kept = "the previous one is intact" if path.exists() else "there was none before"
        raise TietaError(f"could not write {path} ({error.strerror or error}); {kept}") from None
    finally:
        partial.unlink(missing_ok=True)


def read_tensors(path: Path) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    """(tensors, metadata) of a safetensors file, its checksum verified where it has one."""
    path = Path(path)
    if not path.is_file():
        raise TietaError(f"checkpoint {path} does not exist")
    try:
        with safe_open(str(path), framework="pt") as handle:
            metadata = handle.metadata() or {}
        tensors = load_file(str(path))
    except (SafetensorError, OSError, ValueError, RuntimeError) as error:
        raise TietaError(f"{path} is not a readable safetensors checkpoint ({str(error).splitlines()[0]})") from None
    stored = metadata.get(CHECKSUM_KEY)
    if stored is not None and stored != checksum(tensors, metadata):
        raise TietaError(f"{path} does not match its checksum: the file is corrupted or was edited")
    return tensors, metadata


def save_checkpoint(model: nn.Module, path: Path, config: dict[str, Any], num_classes: int) -> None:
    """Write the trainable parameters of ``model`` and ``config`` to ``path``, atomically."""
    tensors = {name: p for name, p in model.named_parameters() if p.requires_grad}
    write_tensors(tensors, path, {CONFIG_KEY: json.dumps(config), NUM_CLASSES_KEY: str(num_classes)})


def read_checkpoint(path: Path) -> tuple[dict[str, torch.Tensor], dict[str, Any], int]:
    """Return (tensors, config dict, num_classes) from a tieta checkpoint."""
    tensors, metadata = read_tensors(path)
    if CONFIG_KEY not in metadata or NUM_CLASSES_KEY not in metadata:
        raise TietaError(f"{path} is a safetensors file but not a tieta checkpoint (no run config inside)")
    try:
        config = json.loads(metadata[CONFIG_KEY])
        num_classes = int(metadata[NUM_CLASSES_KEY])
    except ValueError:
        raise TietaError(f"{path} holds unreadable run settings (its metadata is not what tieta writes)") from None
    if not isinstance(config, dict) or num_classes < 1:
        raise TietaError(f"{path} holds unreadable run settings (its metadata is not what tieta writes)")
    return tensors, config, num_classes


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
