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
from pathlib import Path
from typing import Any, Optional

import torch
from safetensors import SafetensorError
from safetensors.torch import load, save
from torch import nn

from tieta.errors import TietaError
from tieta.files import parse_json, read_regular, write_file

# a checkpoint holds what was trained, an export the whole model: both far below this
MAX_FILE_BYTES = 64 << 30
MAX_HEADER_BYTES = 100 << 20  # a safetensors header: tensor names, shapes and the run's settings

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
    the new one, never a part (a full disk leaves the old one and raises a TietaError).

    The file is serialised in memory and written by :func:`tieta.files.write_file`, so any write
    error is the file system's, never safetensors' own.
    """
    tensors = {name: tensor.detach().cpu().contiguous() for name, tensor in tensors.items()}
    metadata = {**metadata, "format": "pt"}
    metadata[CHECKSUM_KEY] = checksum(tensors, metadata)
    write_file(path, save(tensors, metadata=metadata))


def _header_metadata(data: bytes, path: Path) -> dict[str, str]:
    """The metadata of a safetensors file (its bytes, or their start), read from its header within
    tieta's JSON limits."""
    if len(data) < 8:
        raise TietaError(f"{path} is not a readable safetensors checkpoint (too short)")
    size = int.from_bytes(data[:8], "little")
    if size > len(data) - 8:
        raise TietaError(f"{path} is not a readable safetensors checkpoint (its header is cut)")
    header = parse_json(data[8:8 + size], f"the header of {path}")
    metadata = header.get("__metadata__", {}) if isinstance(header, dict) else None
    if not isinstance(metadata, dict) or not all(isinstance(v, str) for v in metadata.values()):
        raise TietaError(f"{path} is not a readable safetensors checkpoint (its metadata is not text)")
    return metadata
def read_metadata(path: Path) -> dict[str, str]:
    """The metadata of a safetensors file from its header alone, for a fact of it (no tensor is
    read and the checksum is not checked: use :func:`read_tensors` to trust the file)."""
    size = int.from_bytes(read_regular(path, "checkpoint", 8, head=True), "little")
    if size > MAX_HEADER_BYTES:
        raise TietaError(f"{path} is not a readable safetensors checkpoint (a header of {size:,} bytes)")
    return _header_metadata(read_regular(path, "checkpoint", 8 + size, head=True), path)


def read_tensors(path: Path, require_checksum: bool = True) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    """(tensors, metadata) of a safetensors file that tieta wrote, its checksum verified.

    Args:
        require_checksum: refuse a file without one (every file tieta writes has one; an older or
            foreign file the user trusts gets one with ``tieta checksum --write FILE``).
    """
    path = Path(path)
    if not path.exists():
        raise TietaError(f"checkpoint {path} does not exist")
    data = read_regular(path, "checkpoint", MAX_FILE_BYTES)
    metadata = _header_metadata(data, path)
    try:
        tensors = load(data)
    except (SafetensorError, ValueError, RuntimeError, OverflowError) as error:
        raise TietaError(f"{path} is not a readable safetensors checkpoint ({str(error).splitlines()[0]})") from None
    stored = metadata.get(CHECKSUM_KEY)
    if stored is None and require_checksum:
        raise TietaError(f"{path} has no checksum, so an edited file could not be told from tieta's; if you trust "
                         f"it, add one with: tieta checksum --write {path}")
    if stored is not None and stored != checksum(tensors, metadata):
        raise TietaError(f"{path} does not match its checksum: the file is corrupted or was edited")
    return tensors, metadata


def add_checksum(path: Path) -> bool:
    """Verify ``path``'s checksum, or store one where it has none (for a file the user trusts).
    Returns whether one was added."""
    tensors, metadata = read_tensors(path, require_checksum=False)
    if CHECKSUM_KEY in metadata:
        return False
    write_tensors(tensors, path, {key: value for key, value in metadata.items() if key != "format"})
    return True


def metadata_count(text: str) -> Optional[int]:
    """A whole number written into metadata as text, or None where the text is not one tieta writes
    (ASCII digits only, below a billion: ``str.isdigit`` also takes "²", which ``int`` refuses)."""
    return int(text) if text.isascii() and text.isdigit() and len(text) < 10 else None


def running_statistics(model: nn.Module) -> dict[str, torch.Tensor]:
    """The running statistics of the batch norms whose weights train (a segmentation head's): the
    forward passes of training update them and evaluation uses them, so they belong to what trained."""
    found = {}
    for prefix, module in model.named_modules():
        weight = getattr(module, "weight", None)
        if isinstance(module, nn.modules.batchnorm._BatchNorm) and weight is not None and weight.requires_grad:
            for name, buffer in module.named_buffers(recurse=False):
                found[f"{prefix}.{name}" if prefix else name] = buffer
    return found


def trained_state(model: nn.Module) -> dict[str, torch.Tensor]:
    """What a checkpoint holds of ``model``: its trainable parameters and :func:`running_statistics`."""
    return {**{name: p for name, p in model.named_parameters() if p.requires_grad}, **running_statistics(model)}


def save_checkpoint(model: nn.Module, path: Path, config: dict[str, Any], num_classes: int,
                    extra: Optional[dict[str, str]] = None, tensors: Optional[dict[str, torch.Tensor]] = None) -> None:
    """Write the trainable parameters of ``model`` (:func:`trained_state`) and ``config`` to ``path``, atomically.

    Args:
        extra: more metadata, e.g. the epoch of a best checkpoint.
        tensors: these trained tensors instead of the model's own now (an earlier epoch's).
    """
    if tensors is None:
        tensors = trained_state(model)
    write_tensors(tensors, path, {CONFIG_KEY: json.dumps(config), NUM_CLASSES_KEY: str(num_classes), **(extra or {})})


def read_checkpoint(path: Path) -> tuple[dict[str, torch.Tensor], dict[str, Any], int]:
    """Return (tensors, config dict, num_classes) from a tieta checkpoint."""
    tensors, metadata = read_tensors(path)
    if CONFIG_KEY not in metadata or NUM_CLASSES_KEY not in metadata:
        raise TietaError(f"{path} is a safetensors file but not a tieta checkpoint (no run config inside)")
    config = parse_json(metadata[CONFIG_KEY], f"the run settings in {path}")
    num_classes = metadata_count(metadata[NUM_CLASSES_KEY])
    if not isinstance(config, dict) or not num_classes:
        raise TietaError(f"{path} holds unreadable run settings (its metadata is not what tieta writes)")
    return tensors, config, num_classes


def load_trained(model: nn.Module, tensors: dict[str, torch.Tensor]) -> None:
    """Copy checkpoint tensors into ``model``; every tensor must match a parameter (or a trained
    norm's running statistic) by name and shape."""
    params = {**dict(model.named_parameters()), **running_statistics(model)}
    for name, tensor in tensors.items():
        if name not in params:
            raise TietaError(f"the checkpoint has {name}, which this model lacks (built with other methods?)")
        if params[name].shape != tensor.shape:
            raise TietaError(f"{name} is {tuple(tensor.shape)} in the checkpoint but {tuple(params[name].shape)} here")
        if params[name].dtype != tensor.dtype:
            raise TietaError(f"{name} is {tensor.dtype} in the checkpoint but {params[name].dtype} here (tieta "
                             "writes every tensor in its parameter's type)")
    with torch.no_grad():
        for name, tensor in tensors.items():
            params[name].copy_(tensor)
