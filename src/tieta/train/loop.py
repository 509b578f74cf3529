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
from tieta.video.views import mean_over_views


def cross_entropy_step(model: nn.Module, images: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """The plain objective: cross-entropy of the model's logits."""
    return shard.cross_entropy(model(images), labels)


def smoothed_cross_entropy_step(smoothing: float) -> LossFn:
    """Cross-entropy against targets smoothed by ``smoothing`` (timm's ``--smoothing``): the true
    class gets 1 - smoothing + smoothing / C, every class smoothing / C."""
    def step(model: nn.Module, images: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        logits = model(images)
        return shard.batch_mean(F.cross_entropy(logits, labels, reduction="none", label_smoothing=smoothing))

    return step


AMP_DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16}


def autocast_dtype(precision: Optional[str | bool]) -> Optional[torch.dtype]:
    """The autocast type of a precision setting ("bf16", "fp16", None; True is an older "bf16")."""
    return AMP_DTYPES["bf16"] if precision is True else AMP_DTYPES.get(precision or "")


def autocast(device: torch.device, precision: Optional[str | bool]) -> contextlib.AbstractContextManager:
    """Autocast to ``precision`` ("bf16", "fp16"; True is "bf16"), or nothing for fp32."""
    dtype = autocast_dtype(precision)
    return torch.autocast(device.type, dtype=dtype) if dtype is not None else contextlib.nullcontext()


def accumulation_groups(sizes: Sequence[int], accum_steps: int) -> list[int]:
    """Images in each optimizer step of an epoch whose micro-batches have ``sizes``: consecutive
    groups of ``accum_steps`` micro-batches (the last group may have fewer)."""
    return [sum(sizes[start:start + accum_steps]) for start in range(0, len(sizes), accum_steps)]


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
    bf16: Optional[str | bool] = False,
    clip_grad: Optional[float] = None,
    loss_fn: LossFn = cross_entropy_step,
    description: str = "train",
    processes: Processes = SINGLE,
    global_sizes: Optional[Sequence[int]] = None,
    accum_steps: int = 1,
    scaler: Optional[torch.amp.GradScaler] = None,
) -> dict[str, float]:
    """Train over ``loader`` once, setting the lr per optimizer step from ``lr_at(global step)``.

    With several processes, ``loader`` gives this process's shard of each global batch, whose sizes
    ``global_sizes`` lists; the loss is the global batch's and the gradients are summed over the
    processes before the step (``tieta.train.distributed``).

    Args:
        bf16: the autocast precision: "bf16", "fp16", or None/False for fp32 (True: "bf16").
        accum_steps: micro-batches per optimizer step. Each micro-batch's mean loss is weighted by
            its share of the step's images, so a step of N micro-batches of B images is the step of
            one batch of N x B (where nothing is drawn per batch); the gradients are summed over
            the processes once per step. ``first_step`` and ``lr_at`` count optimizer steps.
        scaler: fp16's gradient scaler (the loss is scaled before backward, the gradients unscaled
            before clipping; a step with inf or NaN gradients is skipped and the scale lowered).

    Returns:
        {"loss": mean loss over the epoch's images, "lr": last lr, "train_images_per_s": ...}

    Raises:
        Diverged: the loss is not finite (nothing is stepped with it).
    """
    model.train()
    parameters = [p for group in optimizer.param_groups for p in group["params"]]
    total_loss, count, step = 0.0, 0, first_step
    sizes = list(global_sizes) if global_sizes is not None else None
    group_images = accumulation_groups(sizes, accum_steps) if sizes is not None else None
    start = time.perf_counter()
    quiet = None if processes.main else True
    batches = len(loader)
    for index, (images, labels) in enumerate(tqdm(loader, desc=description, leave=False, disable=quiet)):
        images, labels = normalize(images.to(device)), labels.to(device)
        images_in_step = sizes[index] if sizes is not None else len(labels)
        position = index % accum_steps  # of this micro-batch in its optimizer step
        last_in_group = position == accum_steps - 1 or index == batches - 1
        if position == 0:
            set_lr(optimizer, lr_at(step))
        with shard.sharded(processes.shard(images_in_step)), autocast(device, bf16):
            loss = loss_fn(model, images, labels)
        value = loss.item()  # the global batch's loss, the same in every process
        if not math.isfinite(value):
            raise Diverged(f"training diverged: the loss became {value} at step {step - first_step + 1} of "
                           f"{description} (lr {optimizer.param_groups[0]['lr']:.3g}); lower the learning rate "
                           "or set optim.clip_grad")
        if position == 0:  # after the forward pass: an objective may leave gradients of its own (DiffRate)
            optimizer.zero_grad(set_to_none=True)
        if accum_steps > 1:  # the step's loss is the mean over all its images
            in_group = group_images[index // accum_steps] if group_images is not None else None
            loss = loss * (images_in_step / in_group if in_group else 1.0 / accum_steps)
        (scaler.scale(loss) if scaler is not None else loss).backward()
        total_loss += value * images_in_step
        count += images_in_step
        if not last_in_group:
            continue
        distributed.sum_gradients(parameters, processes)  # once per step: the micro-batches need no sync
        if scaler is not None:
            scaler.unscale_(optimizer)
        if clip_grad is not None:
            nn.utils.clip_grad_norm_(parameters, clip_grad)
        if scaler is not None:
            scaler.step(optimizer)
            scaler.update()
        else:
            optimizer.step()
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
    bf16: Optional[str | bool] = False,
    description: str = "eval",
    processes: Processes = SINGLE,
) -> dict[str, Optional[float]]:
    """Top-1 accuracy (in %) of ``model`` over ``loader``, and the loss; with several processes,
    ``loader`` holds this process's share of the images and the counts are summed over all.

    Returns:
        {"acc": top-1 %, "top5": top-5 % (None with fewer than 5 classes), "balanced_acc": the mean
        over the classes present of each class's recall (%), "eval_loss": mean cross-entropy}
    """
    was_training = model.training
    model.eval()
    correct, correct5, total, total_loss = 0, 0, 0, 0.0
    per_class: Optional[torch.Tensor] = None  # (2, C): images and top-1 hits of each true class
    quiet = None if processes.main else True
    for images, labels in tqdm(loader, desc=description, leave=False, disable=quiet):
        images, labels = normalize(images.to(device)), labels.to(device)
        with autocast(device, bf16):  # a clip's views (B, V, T, 3, S, S): their mean logits, as the reference
            logits = mean_over_views(model, images) if images.ndim == 6 else model(images)
        classes = logits.shape[-1]
        total_loss += F.cross_entropy(logits.float(), labels, reduction="sum").item()
        hits = logits.argmax(dim=-1) == labels
        correct += hits.sum().item()
        if classes >= 5:
            correct5 += (logits.topk(5, dim=-1).indices == labels[:, None]).any(dim=-1).sum().item()
        if per_class is None:
            per_class = torch.zeros(2, classes, dtype=torch.float64)
        per_class[0] += torch.bincount(labels.cpu(), minlength=classes)[:classes].double()
        per_class[1] += torch.bincount(labels[hits].cpu(), minlength=classes)[:classes].double()
        total += len(labels)
    model.train(was_training)
    correct, correct5, total, total_loss = distributed.sum_over_processes([correct, correct5, total, total_loss],
                                                                          processes)
    if per_class is None:  # this process scored no image (more processes than images)
        per_class = torch.zeros(2, 0, dtype=torch.float64)
    per_class = _sum_per_class(per_class, processes)
    seen = per_class[0] > 0
    balanced = float((per_class[1][seen] / per_class[0][seen]).mean()) * 100.0 if bool(seen.any()) else None
    top5 = 100.0 * correct5 / total if per_class.shape[1] >= 5 else None
    return {"acc": 100.0 * correct / total, "top5": top5, "balanced_acc": balanced, "eval_loss": total_loss / total}


def _sum_per_class(per_class: torch.Tensor, processes: Processes) -> torch.Tensor:
    """The (2, C) per-class counts summed over the processes (a process without images has C = 0)."""
    if not processes.parallel:
        return per_class
    shapes = distributed.gather_tensors(torch.tensor([per_class.shape[1]], dtype=torch.int64), processes)
    classes = max(int(shape) for shape in shapes)
    full = torch.zeros(2, classes, dtype=torch.float64)
    full[:, :per_class.shape[1]] = per_class
    return torch.tensor(distributed.sum_over_processes(full.reshape(-1).tolist(), processes),
                        dtype=torch.float64).reshape(2, classes)
