"""One training epoch and one evaluation pass, in plain PyTorch."""

from __future__ import annotations

import contextlib
import time
from typing import Callable, Optional

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.data import DataLoader
from tqdm.auto import tqdm

from tieta.methods.method import LossFn
from tieta.train.optim import set_lr


def cross_entropy_step(model: nn.Module, images: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """The plain objective: cross-entropy of the model's logits."""
    return F.cross_entropy(model(images), labels)


def autocast(device: torch.device, bf16: bool) -> contextlib.AbstractContextManager:
    return torch.autocast(device.type, dtype=torch.bfloat16) if bf16 else contextlib.nullcontext()


def train_one_epoch(
    model: nn.Module,
    loader: DataLoader,
    normalize: nn.Module,
    optimizer: torch.optim.Optimizer,
    lr_at: Callable[[int], float],
    first_step: int,
    device: torch.device,
    bf16: bool = False,
    clip_grad: Optional[float] = None,
    loss_fn: LossFn = cross_entropy_step,
    description: str = "train",
) -> dict[str, float]:
    """Train over ``loader`` once, setting the lr per step from ``lr_at(global step)``.

    Returns:
        {"loss": mean loss, "train_acc": None (not computed), "lr": last lr, "train_images_per_s": ...}
    """
    model.train()
    total_loss, count, step = 0.0, 0, first_step
    start = time.perf_counter()
    for images, labels in tqdm(loader, desc=description, leave=False, disable=None):
        images, labels = normalize(images.to(device)), labels.to(device)
        set_lr(optimizer, lr_at(step))
        with autocast(device, bf16):
            loss = loss_fn(model, images, labels)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        if clip_grad is not None:
            nn.utils.clip_grad_norm_([p for g in optimizer.param_groups for p in g["params"]], clip_grad)
        optimizer.step()
        total_loss += loss.item() * len(labels)
        count += len(labels)
        step += 1
    elapsed = time.perf_counter() - start
    lr = optimizer.param_groups[0]["lr"]
    return {"loss": total_loss / count, "lr": lr, "train_images_per_s": count / elapsed}


@torch.inference_mode()
def evaluate(
    model: nn.Module,
    loader: DataLoader,
    normalize: nn.Module,
    device: torch.device,
    bf16: bool = False,
    description: str = "eval",
) -> dict[str, float]:
    """Top-1 accuracy (in %) of ``model`` over ``loader``, and the loss."""
    was_training = model.training
    model.eval()
    correct, total, total_loss = 0, 0, 0.0
    for images, labels in tqdm(loader, desc=description, leave=False, disable=None):
        images, labels = normalize(images.to(device)), labels.to(device)
        with autocast(device, bf16):
            logits = model(images)
        total_loss += F.cross_entropy(logits.float(), labels, reduction="sum").item()
        correct += (logits.argmax(dim=-1) == labels).sum().item()
        total += len(labels)
    model.train(was_training)
    return {"acc": 100.0 * correct / total, "eval_loss": total_loss / total}
