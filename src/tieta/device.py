"""The device a command runs on, from what the user wrote (auto, cpu, cuda, cuda:N)."""

from __future__ import annotations

import torch

from tieta.errors import TietaError


def resolve_device(name: str) -> torch.device:
    """``name`` as a torch device; "auto" is the first CUDA device where torch sees one, else the CPU.

    Raises:
        TietaError: for a name that is no device, or a CUDA device this machine does not have.
    """
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        device = torch.device(name)
    except RuntimeError:
        raise TietaError(f"{name!r} is not a device: use auto, cpu or cuda[:N]") from None
    if device.type == "cuda" and not torch.cuda.is_available():
        raise TietaError(f"device {name} was asked for but torch sees no CUDA device here")
    if device.type == "cuda" and device.index is not None and device.index >= torch.cuda.device_count():
        raise TietaError(f"device {name} was asked for but torch sees {torch.cuda.device_count()} CUDA devices")
    return device
