"""fit: a whole fine-tuning run from a RunConfig to a run folder, and evaluate_checkpoint."""

from __future__ import annotations

import random
import time
from pathlib import Path
from typing import Any, Callable, Optional

import numpy as np
import torch
from torch import nn
from torch.utils.data import DataLoader
from tqdm.auto import tqdm

from tieta.data.transforms import Normalize
from tieta.data.vtab import ImageDataset, Task, open_task
from tieta.errors import TietaError
from tieta.measure.flops import count_flops
from tieta.measure.throughput import measure_throughput
from tieta.methods.dyt import activation_rates, dyt_forward, dyt_loss
from tieta.methods.params import trainable_parameters
from tieta.methods.schedules import token_counts, vit_shape
from tieta.train.checkpoint import load_trained, read_checkpoint, save_checkpoint
from tieta.train.config import RunConfig, from_dict, group_learning_rates, validate
from tieta.train.loop import cross_entropy_step, evaluate, train_one_epoch
from tieta.train.model import build_model
from tieta.train.optim import build_optimizer, lr_multiplier
from tieta.train.rundir import CHECKPOINT, RunDir


def resolve_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name.startswith("cuda") and not torch.cuda.is_available():
        raise TietaError(f"device {name} was asked for but torch sees no CUDA device here")
    return torch.device(name)


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


def image_size_of(model: nn.Module) -> int:
    return int(model.patch_embed.img_size[0])


def make_loader(dataset: ImageDataset, batch_size: int, shuffle: bool, seed: int, num_workers: int) -> DataLoader:
    generator = torch.Generator().manual_seed(seed)
    return DataLoader(dataset, batch_size=batch_size, shuffle=shuffle, generator=generator, num_workers=num_workers)


def measure_cost(model: nn.Module, dataset: ImageDataset, normalize: nn.Module, device: torch.device,
                 batch_size: int, bf16: bool, flops_images: int = 64) -> dict[str, Any]:
    """GFLOPs per image, averaged over real evaluation images (the executed path can depend on
    them), evaluation throughput, and DyT's activation rates where it dispatches."""
    step = max(1, len(dataset) // flops_images)
    indices = list(range(0, len(dataset), step))[:flops_images]
    sample = normalize(torch.stack([dataset[i][0] for i in indices]).to(device))
    flops = count_flops(model, sample)
    size = image_size_of(model)
    # real images: where DyT dispatches, what it skips (and so the speed) depends on them
    throughput = measure_throughput(model, size, batch_size, device, torch.bfloat16 if bf16 else None,
                                    images=sample[:batch_size])
    cost = {"gmacs": flops["gmacs"], "pyra_gflops": flops["pyra_gflops"], "eval_images_per_s": throughput,
            "throughput_batch_size": batch_size}
    if getattr(model, "dispatch_state", None) is not None:
        rates = activation_rates(model, sample)
        cost.update(activation_rates=rates, activation_rate=sum(rates) / len(rates))
    return cost


def training_objective(config: RunConfig) -> Callable:
    """Cross-entropy, or DyT's loss (dynamic and full passes) when DyT is among the methods."""
    if "dyt" not in config.methods:
        return cross_entropy_step
    weights = config.dyt

    def dyt_step(model: nn.Module, images: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        return dyt_loss(dyt_forward(model, images), labels, weights.rho, weights.rate_weight,
                        weights.full_weight, weights.distill_weight)

    return dyt_step


def dispatch_temperature(config: RunConfig, epoch: int) -> float:
    """DyT's tau for an epoch: fixed, or annealed linearly from tau to tau_end."""
    start, end = config.dyt.tau, config.dyt.tau_end
    if end is None or config.optim.epochs == 1:
        return start
    return start + (end - start) * epoch / (config.optim.epochs - 1)


def merge_summary(model: nn.Module) -> dict[str, Any]:
    """The merge schedule and the tokens entering each block (then leaving the last), if merging."""
    schedule = getattr(model, "token_schedule", None)
    if schedule is None:
        return {}
    return {"schedule": list(schedule), "token_counts": token_counts(vit_shape(model), schedule)}


def fit(config: RunConfig, output: str | Path, overwrite: bool = False) -> dict[str, Any]:
    """Fine-tune as configured, evaluate, and write the run folder. Returns the summary.

    The run folder gets config.yaml (resolved), metrics.jsonl (one line per epoch), summary.json and
    checkpoint.safetensors (trained parameters only).
    """
    validate(config)
    run = RunDir(output, overwrite)  # refuse an occupied folder before any work
    if config.data.path is None:
        raise TietaError("no data given: set data.path (or --data) to a task folder")
    started = time.perf_counter()
    device = resolve_device(config.device)
    task = open_task(config.data.path)
    seed_everything(config.seed)
    model = build_model(config, task.num_classes).to(device)
    size = image_size_of(model)
    train_set = ImageDataset(task.split(config.data.train_split), size, task.num_classes, config.data.cache,
                             "decoding train images")
    eval_set = ImageDataset(task.split(config.data.eval_split), size, task.num_classes, config.data.cache,
                            "decoding eval images")
    normalize = Normalize(config.data.normalization).to(device)
    optim = config.optim
    train_loader = make_loader(train_set, optim.batch_size, True, config.seed, config.data.num_workers)
    eval_loader = make_loader(eval_set, config.eval_batch_size, False, config.seed, config.data.num_workers)
    optimizer = build_optimizer(model, optim.lr, optim.weight_decay, group_learning_rates(config))
    steps_per_epoch = len(train_loader)
    total_steps, warmup_steps = optim.epochs * steps_per_epoch, optim.warmup_epochs * steps_per_epoch
    min_ratio = optim.min_lr / optim.lr

    def lr_at(step: int) -> float:
        return lr_multiplier(step, total_steps, warmup_steps, min_ratio)

    resolved = config.to_dict()
    resolved["data"]["path"] = str(task.root)
    run.start(resolved)
    best, last_eval = None, None
    objective = training_objective(config)
    for epoch in tqdm(range(optim.epochs), desc="epochs", disable=None):
        record = {"epoch": epoch + 1}
        if getattr(model, "dispatch_state", None) is not None:
            model.dispatch_state.tau = record["tau"] = dispatch_temperature(config, epoch)
        record.update(train_one_epoch(model, train_loader, normalize, optimizer, lr_at, epoch * steps_per_epoch,
                                      device, config.bf16, optim.clip_grad, objective, f"epoch {epoch + 1}"))
        if (epoch + 1) % config.eval_every == 0 or epoch + 1 == optim.epochs:
            last_eval = evaluate(model, eval_loader, normalize, device, config.bf16)
            record.update(last_eval)
            if best is None or last_eval["acc"] > best["acc"]:
                best = {"acc": last_eval["acc"], "epoch": epoch + 1}
        run.log(record)
        shown = f"epoch {epoch + 1}/{optim.epochs}: loss {record['loss']:.4f}, {record['train_images_per_s']:.1f} img/s"
        tqdm.write(shown + (f", {config.data.eval_split} acc {record['acc']:.2f}%" if "acc" in record else ""))
    save_checkpoint(model, run.checkpoint, resolved, task.num_classes)
    trainable, total = trainable_parameters(model)
    summary = {
        "model": config.model,
        "weights": config.weights,
        "method": config.method,
        "data": str(task.root),
        "num_classes": task.num_classes,
        "img_size": size,
        "acc": last_eval["acc"],
        "best_acc": best["acc"],
        "best_epoch": best["epoch"],
        "trainable_params": trainable,
        "total_params": total,
        "trainable_percent": 100.0 * trainable / total,
        **merge_summary(model),
        **measure_cost(model, eval_set, normalize, device, min(config.eval_batch_size, 32), config.bf16),
        "train_images_per_s": record["train_images_per_s"],
        "device": str(device),
        "wall_time_s": time.perf_counter() - started,
    }
    run.write_summary(summary)
    return summary


def load_run_model(checkpoint: str | Path, weights: Optional[str] = "config") -> tuple[nn.Module, RunConfig, int]:
    """Rebuild a trained model from a checkpoint file (or a run folder holding one).

    Args:
        weights: "config" to rebuild the backbone from the weights named in the run config, or
            another value for ``load_backbone`` (a file, "random", ...).
    """
    path = Path(checkpoint)
    if path.is_dir():
        path = path / CHECKPOINT
    tensors, config_dict, num_classes = read_checkpoint(path)
    config = from_dict(RunConfig, config_dict)
    seed_everything(config.seed)  # as in fit, so that a "random" backbone comes back the same
    model = build_model(config, num_classes, True if weights == "config" else weights)
    load_trained(model, tensors)
    return model, config, num_classes


def evaluate_checkpoint(checkpoint: str | Path, data: Optional[str] = None, split: Optional[str] = None,
                        batch_size: Optional[int] = None) -> dict[str, Any]:
    """Accuracy and cost of a trained checkpoint on a split of a task (by default the run's own)."""
    model, config, num_classes = load_run_model(checkpoint)
    device = resolve_device(config.device)
    model.to(device)
    task: Task = open_task(data or config.data.path)
    dataset = ImageDataset(task.split(split or config.data.eval_split), image_size_of(model), num_classes,
                           config.data.cache)
    normalize = Normalize(config.data.normalization).to(device)
    loader = make_loader(dataset, batch_size or config.eval_batch_size, False, config.seed, config.data.num_workers)
    result = evaluate(model, loader, normalize, device, config.bf16)
    return {"acc": result["acc"], "eval_loss": result["eval_loss"], "images": len(dataset),
            **measure_cost(model, dataset, normalize, device, min(batch_size or config.eval_batch_size, 32),
                           config.bf16)}
