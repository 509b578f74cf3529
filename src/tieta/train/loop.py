"""One training epoch and one evaluation pass, in plain PyTorch."""

from __future__ import annotations

import contextlib
import math
import time
from typing import Callable, Optional, Sequence

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.data import DataLoader
from tqdm.auto import tqdm

from tieta import shard
from tieta.errors import TietaError
from tieta.methods.method import LossFn
from tieta.train import distributed
from tieta.train.distributed import SINGLE, Processes
from tieta.train.optim import set_lr


def cross_entropy_step(model: nn.Module, images: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """The plain objective: cross-entropy of the model's logits."""
    return shard.cross_entropy(model(images), labels)


def autocast(device: torch.device, bf16: bool) -> contextlib.AbstractContextManager:
    return torch.autocast(device.type, dtype=torch.bfloat16) if bf16 else contextlib.nullcontext()


class Diverged(TietaError):
    """The loss (or a trained tensor) became non-finite: the run stops rather than go on with NaNs."""


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
    processes: Processes = SINGLE,
    global_sizes: Optional[Sequence[int]] = None,
) -> dict[str, float]:
    """Train over ``loader`` once, setting the lr per step from ``lr_at(global step)``.

    With several processes, ``loader`` gives this process's shard of each global batch, whose sizes
    ``global_sizes`` lists; the loss is the global batch's and the gradients are summed over the
    processes before the step (``tieta.train.distributed``).

    Returns:
        {"loss": mean loss over the epoch's images, "lr": last lr, "train_images_per_s": ...}

    Raises:
        Diverged: the loss is not finite (nothing is stepped with it).
    """
    model.train()
    parameters = [p for group in optimizer.param_groups for p in group["params"]]
    total_loss, count, step = 0.0, 0, first_step
    start = time.perf_counter()
    quiet = None if processes.main else True
    for index, (images, labels) in enumerate(tqdm(loader, desc=description, leave=False, disable=quiet)):
        images, labels = normalize(images.to(device)), labels.to(device)
        images_in_step = global_sizes[index] if global_sizes is not None else len(labels)
        set_lr(optimizer, lr_at(step))
        with shard.sharded(processes.shard(images_in_step)), autocast(device, bf16):
            loss = loss_fn(model, images, labels)
        value = loss.item()  # the global batch's loss, the same in every process
        if not math.isfinite(value):
            raise Diverged(f"training diverged: the loss became {value} at step {step - first_step + 1} of "
                           f"{description} (lr {optimizer.param_groups[0]['lr']:.3g}); lower the learning rate "
                           "or set optim.clip_grad")
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        distributed.sum_gradients(parameters, processes)
        if clip_grad is not None:
            nn.utils.clip_grad_norm_(parameters, clip_grad)
        optimizer.step()
        total_loss += value * images_in_step
        count += images_in_step
        step += 1
    elapsed = time.perf_counter() - start
    lr = optimizer.param_groups[0]["lr"]
    return {"loss": total_loss / count, "lr": lr, "train_images_per_s": count / elapsed}


def check_finite(model: nn.Module, when: str) -> None:
    """Refuse to keep a model whose trained tensors hold NaN or inf."""
    for name, param in model.named_parameters():
        if param.requires_grad and not bool(torch.isfinite(param).all()):
            raise Diverged(f"training diverged: {name} holds non-finite values {when}; lower the learning rate "
                           "or set optim.clip_grad")


@torch.inference_mode()
def evaluate(
    model: nn.Module,
    loader: DataLoader,
    normalize: nn.Module,
    device: torch.device,
    bf16: bool = False,
    description: str = "eval",
    processes: Processes = SINGLE,
) -> dict[str, float]:
    """Top-1 accuracy (in %) of ``model`` over ``loader``, and the loss; with several processes,
    ``loader`` holds this process's share of the images and the counts are summed over all."""
    was_training = model.training
    model.eval()
    correct, total, total_loss = 0, 0, 0.0
    quiet = None if processes.main else True
    for images, labels in tqdm(loader, desc=description, leave=False, disable=quiet):
        images, labels = normalize(images.to(device)), labels.to(device)
        with autocast(device, bf16):
            logits = model(images)
        total_loss += F.cross_entropy(logits.float(), labels, reduction="sum").item()
        correct += (logits.argmax(dim=-1) == labels).sum().item()
        total += len(labels)
    model.train(was_training)
    correct, total, total_loss = distributed.sum_over_processes([correct, total, total_loss], processes)
    return {"acc": 100.0 * correct / total, "eval_loss": total_loss / total}
