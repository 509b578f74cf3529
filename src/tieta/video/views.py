"""Evaluating a clip by its views: the reference scores every view of a clip with the model and
averages the logits (DyT's ``evaluate_video``: ``output.view(B, V, -1).mean(dim=1)``)."""

from __future__ import annotations

from typing import Callable

import torch


def mean_over_views(model: Callable[[torch.Tensor], torch.Tensor], views: torch.Tensor) -> torch.Tensor:
    """The logits of each clip, averaged over its views.

    Args:
        model: maps clips (N, T, 3, S, S) to logits (N, classes).
        views: (B, V, T, 3, S, S), as an evaluation VideoDataset batches them.
    Returns:
        (B, classes).
    """
    batch, count = views.shape[:2]
    return model(views.flatten(0, 1)).view(batch, count, -1).mean(dim=1)
