"""Evaluation throughput: images per second of the forward pass alone, no data loading."""

from __future__ import annotations

import time
from typing import Optional

import torch
from torch import nn


def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


@torch.inference_mode()
def measure_throughput(
    model: nn.Module,
    image_size: int,
    batch_size: int = 32,
    device: str | torch.device = "cpu",
    dtype: Optional[torch.dtype] = None,
    warmup: int = 2,
    min_seconds: float = 2.0,
    max_steps: int = 50,
    images: Optional[torch.Tensor] = None,
) -> float:
    """Images per second of ``model`` in eval mode on (batch_size, 3, S, S) inputs.

    Args:
        dtype: None for float32, or e.g. torch.bfloat16 for autocast.
        warmup: untimed passes first (allocator, kernels' first-call costs).
        min_seconds / max_steps: time at least this long (and at least 3 steps) but no more steps.
        images: the inputs (repeated up to batch_size), for models whose cost depends on them;
            random ones by default.
    """
    device = torch.device(device)
    was_training = model.training
    model.eval()
    if images is None:
        images = torch.randn(batch_size, 3, image_size, image_size, device=device)
    else:
        repeats = (batch_size + len(images) - 1) // len(images)  # images (n, 3, S, S) or clips (n, T, 3, S, S)
        images = images.to(device).repeat(repeats, *[1] * (images.ndim - 1))[:batch_size]
    autocast = torch.autocast(device.type, dtype=dtype, enabled=dtype is not None)
    try:
        with autocast:
            for _ in range(warmup):
                model(images)
            synchronize(device)
            steps, start = 0, time.perf_counter()
            while steps < 3 or (time.perf_counter() - start < min_seconds and steps < max_steps):
                model(images)
                steps += 1
            synchronize(device)
            elapsed = time.perf_counter() - start
    finally:
        model.train(was_training)
    return steps * batch_size / elapsed
