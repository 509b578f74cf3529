"""DiffRate's search: train the rate logits alone on ``CE + flops_weight * (GMACs - target)^2``,
then fix the kept numbers.

A :class:`RateSearch` owns the search's optimizer (AdamW over the rate logits, no weight decay)
and its loss settings; :func:`search_rates` runs one over a few epochs of batches, and a training
run's DiffRate objective steps one per batch during its search epochs.
"""

from __future__ import annotations

import math
from typing import Iterable, Optional

import torch
import torch.nn.functional as F
from torch import nn
from tqdm.auto import tqdm

from tieta.errors import TietaError
from tieta.methods.diffrate_counts import fix_rates, rate_parameters, start_search
from tieta.methods.diffrate_step import diffrate_steps
from tieta.methods.schedules import vit_shape
from tieta.methods.state import method_setting
from tieta.ops.diffrate import search_flops


def search_gmacs(model: nn.Module) -> torch.Tensor:
    """GMACs per image of the DiffRate model, differentiable in the rate logits while they are searched.

    Blocks as ``search_flops`` counts them (attention on the tokens entering, MLP on the tokens
    kept), plus the patch embedding and the head(s).

    Returns:
        a 0-dim float64 tensor.
    """
    shape = vit_shape(model)
    prune, merge = [], []
    for step in diffrate_steps(model):
        if step.kept_prune is None:
            prune.append(step.prune_rate.expected_kept())
            merge.append(step.merge_rate.expected_kept())
        else:
            prune.append(step.kept_prune)
            merge.append(step.kept_merge)
    blocks = search_flops(shape.depth, shape.width, shape.hidden, shape.patches, shape.prefix, prune, merge)
    return (blocks + shape.patch_macs + shape.head_macs) / 1e9


def search_step(model: nn.Module, images: torch.Tensor, labels: torch.Tensor, optimizer: torch.optim.Optimizer,
                target_gmacs: float, flops_weight: float = 5.0) -> tuple[torch.Tensor, torch.Tensor]:
    """One step of DiffRate's search: ``CE + flops_weight * (GMACs - target)^2``, rate logits only.

    Gradients are taken for the rate logits alone (``torch.autograd.grad``), so no other parameter
    receives one, whatever it requires; ``optimizer`` must hold the rate logits only.

    Args:
        model: a searchable DiffRate model in ``train()`` mode.
        images: (B, 3, H, W), normalised, on the model's device.
        labels: (B,) class indices.
        optimizer: over ``rate_parameters(model)``.
        target_gmacs: GMACs per image the search aims at.
        flops_weight: lambda of the FLOPs term (the reference's 5).

    Returns:
        (loss, gmacs), both detached 0-dim tensors.
    """
    params = rate_parameters(model)
    gmacs = search_gmacs(model)
    loss = F.cross_entropy(model(images), labels) + (flops_weight * (gmacs - target_gmacs) ** 2).float()
    grads = torch.autograd.grad(loss, params, allow_unused=True)
    for param, grad in zip(params, grads):
        param.grad = grad
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)
    return loss.detach(), gmacs.detach()


def search_lr_at(epoch: int, epochs: int, lr: float, min_lr: float) -> float:
    """The search's per-epoch cosine learning rate, from ``lr`` at epoch 0 towards ``min_lr``."""
    return min_lr + (lr - min_lr) * 0.5 * (1 + math.cos(math.pi * epoch / epochs))


class RateSearch:
    """One search over a model's rate logits: puts the model in search mode and owns the AdamW
    that steps the logits.

    Args:
        model: a model from ``add_diffrate(model)`` without kept numbers (fixed ones are reopened).
        target_gmacs: GMACs per image to aim at.
        flops_weight: lambda of the FLOPs term.
        lr: the optimizer's first learning rate (:meth:`set_lr` changes it per epoch).
    """

    def __init__(self, model: nn.Module, target_gmacs: float, flops_weight: float, lr: float) -> None:
        self.target_gmacs, self.flops_weight = target_gmacs, flops_weight
        self.optimizer = torch.optim.AdamW(start_search(model), lr=lr, weight_decay=0.0)

    def set_lr(self, lr: float) -> None:
        for group in self.optimizer.param_groups:
            group["lr"] = lr

    def step(self, model: nn.Module, images: torch.Tensor, labels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """One :func:`search_step` on a batch. Returns: (loss, gmacs), detached."""
        return search_step(model, images, labels, self.optimizer, self.target_gmacs, self.flops_weight)


def search_rates(
    model: nn.Module,
    loader_or_batches: Iterable[tuple[torch.Tensor, torch.Tensor]],
    target_gmacs: Optional[float] = None,
    epochs: int = 3,
    lr: float = 0.01,
    min_lr: float = 0.001,
    flops_weight: float = 5.0,
) -> tuple[list[int], list[int]]:
    """DiffRate's search with everything but the rate logits frozen, then the kept numbers fixed.

    AdamW over the rate logits (no weight decay), lr cosine from ``lr`` to ``min_lr`` per epoch, loss
    ``CE + flops_weight * (GMACs - target)^2``; the model runs in ``train()`` mode (drop-path on,
    as in the reference) and is left in the mode it had.

    Args:
        model: a model from ``add_diffrate(model)`` without kept numbers.
        loader_or_batches: (images, labels) batches, normalised images; iterated once per epoch, so a
            DataLoader or a list.
        target_gmacs: GMACs per image to aim at; None: the one given to add_diffrate.
        epochs: passes over the batches (the reference: 3 ImageNet epochs).
        lr, min_lr: the cosine's ends (the reference's 0.01 and 0.001).
        flops_weight: lambda of the FLOPs term (the reference's 5).

    Returns:
        (kept_prune, kept_merge) per block, prefix included, now fixed in the model.
    """
    target = method_setting(model, "diffrate", "diffrate_target_gmacs") if target_gmacs is None else target_gmacs
    if target is None or target <= 0:
        raise TietaError("search_rates needs a positive target_gmacs (or one given to add_diffrate)")
    if epochs < 1:
        raise TietaError(f"epochs must be at least 1, got {epochs}")
    search = RateSearch(model, target, flops_weight, lr)
    device = search.optimizer.param_groups[0]["params"][0].device
    was_training = model.training
    model.train()
    try:
        for epoch in range(epochs):
            search.set_lr(search_lr_at(epoch, epochs, lr, min_lr))
            progress = tqdm(loader_or_batches, desc=f"DiffRate search {epoch + 1}/{epochs}", leave=False, disable=None)
            for images, labels in progress:
                loss, gmacs = search.step(model, images.to(device), labels.to(device))
                progress.set_postfix(loss=f"{float(loss):.4f}", gmacs=f"{float(gmacs):.4g}")
    finally:
        model.train(was_training)
    return fix_rates(model)
