"""AdamW with per-method parameter groups and a warm-up + cosine (or poly) learning-rate schedule."""

from __future__ import annotations

import math

import torch
from torch import nn

from tieta.methods.params import parameter_group


def _no_decay_names(model: nn.Module) -> set[str]:
    skip = getattr(model, "no_weight_decay", None)
    return set(skip()) if callable(skip) else set()


def build_optimizer(
    model: nn.Module, lr: float, weight_decay: float, lr_groups: dict[str, float] | None = None
) -> torch.optim.AdamW:
    """AdamW over the trainable parameters, one group per (method, decay) pair.

    Norm weights, biases and other 1-d parameters (and timm's ``no_weight_decay`` names such as
    ``pos_embed``) get no weight decay. ``lr_groups`` gives a method its own base lr, e.g.
    ``{"pyra": 1e-4}``; every group follows the same schedule shape. Each group records its
    method in ``group["method"]`` and its base lr in ``group["base_lr"]``.
    """
    lr_groups = lr_groups or {}
    skip = _no_decay_names(model)
    groups: dict[tuple[str, bool], list[nn.Parameter]] = {}
    for name, param in model.named_parameters():
        if not param.requires_grad:
            continue
        method = parameter_group(name) or "backbone"
        decay = param.ndim > 1 and name not in skip
        groups.setdefault((method, decay), []).append(param)
    param_groups = [
        {
            "params": params,
            "method": method,
            "base_lr": lr_groups.get(method, lr),
            "lr": lr_groups.get(method, lr),
            "weight_decay": weight_decay if decay else 0.0,
        }
        for (method, decay), params in sorted(groups.items())
    ]
    return torch.optim.AdamW(param_groups, lr=lr, weight_decay=weight_decay)


SCHEDULES = ("cosine", "poly")


def lr_multiplier(step: int, total_steps: int, warmup_steps: int, min_ratio: float, schedule: str = "cosine"
                  ) -> float:
    """The learning rate at ``step`` as a share of the base.

    "cosine": linear warm-up from ~0 to 1 over ``warmup_steps``, then cosine from 1 down to
    ``min_ratio``. "poly": mmcv's ``PolyLrUpdaterHook`` with power 1 (mmseg's segmentation
    schedules), ``min_ratio + (1 - min_ratio) (1 - step / total_steps)``, counted from the first
    step, and during the warm-up that value times the linear ramp (as mmcv's linear warm-up scales
    the regular rate).
    """
    if schedule == "poly":
        decayed = min_ratio + (1 - min_ratio) * (1 - min(step, total_steps) / max(1, total_steps))
        return decayed * (step + 1) / warmup_steps if step < warmup_steps else decayed
    if step < warmup_steps:
        return (step + 1) / warmup_steps
    progress = (step - warmup_steps) / max(1, total_steps - warmup_steps)
    return min_ratio + (1 - min_ratio) * 0.5 * (1 + math.cos(math.pi * min(1.0, progress)))


def set_lr(optimizer: torch.optim.Optimizer, multiplier: float) -> None:
    """Scale every group's base lr by ``multiplier`` (the schedule is stepped per iteration)."""
    for group in optimizer.param_groups:
        group["lr"] = group["base_lr"] * multiplier
