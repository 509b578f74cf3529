"""fit: a whole fine-tuning run from a RunConfig to a run folder, and evaluate_checkpoint."""

from __future__ import annotations

import random
import time
from pathlib import Path
from typing import Any, Optional

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
from tieta.methods.method import LossFn
from tieta.methods.params import trainable_parameters
from tieta.train.checkpoint import load_trained, read_checkpoint, save_checkpoint
from tieta.train.config import RunConfig, from_dict, group_learning_rates, validate
from tieta.train.loop import cross_entropy_step, evaluate, train_one_epoch
from tieta.train.model import build_model
from tieta.train.optim import build_optimizer, lr_multiplier
from tieta.train.rundir import CHECKPOINT, RunDir


def resolve_device(name: str) -> torch.device:
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


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


def image_size_of(model: nn.Module) -> int:
    return int(model.patch_embed.img_size[0])


def make_loader(dataset: ImageDataset, batch_size: int, shuffle: bool, seed: int, num_workers: int) -> DataLoader:
    generator = torch.Generator().manual_seed(seed)
    return DataLoader(dataset, batch_size=batch_size, shuffle=shuffle, generator=generator, num_workers=num_workers)


def measure_cost(model: nn.Module, config: RunConfig, dataset: ImageDataset, normalize: nn.Module,
                 device: torch.device, batch_size: int, flops_images: int = 64) -> dict[str, Any]:
    """GFLOPs per image, averaged over real evaluation images (the executed path can depend on
    them), evaluation throughput, and what each method measures on those images."""
    step = max(1, len(dataset) // flops_images)
    indices = list(range(0, len(dataset), step))[:flops_images]
    sample = normalize(torch.stack([dataset[i][0] for i in indices]).to(device))
    flops = count_flops(model, sample)
    size = image_size_of(model)
    # real images: where a method's path depends on them (DyT), so does the speed
    throughput = measure_throughput(model, size, batch_size, device, torch.bfloat16 if config.bf16 else None,
                                    images=sample[:batch_size])
    cost = {"gmacs": flops["gmacs"], "pyra_gflops": flops["pyra_gflops"], "eval_images_per_s": throughput,
            "throughput_batch_size": batch_size}
    for method in config.method_list:
        if method.measure is not None:
            cost.update(method.measure(model, sample))
    return cost


def training_objective(config: RunConfig) -> LossFn:
    """Cross-entropy, or the loss of the method that brings its own (validate allows one)."""
    for method in config.method_list:
        if method.objective is not None:
            return method.objective(config)
    return cross_entropy_step


def epoch_updates(model: nn.Module, config: RunConfig, epoch: int) -> dict[str, Any]:
    """Apply every method's per-epoch schedule (a temperature, a keep rate); returns what to log."""
    values: dict[str, Any] = {}
    for method in config.method_list:
        if method.epoch_update is not None:
            values.update(method.epoch_update(model, config, epoch, config.optim.epochs))
    return values


def describe_methods(model: nn.Module, config: RunConfig) -> dict[str, Any]:
    """What each method says about the built model (a merge schedule, tokens per block)."""
    facts: dict[str, Any] = {}
    for method in config.method_list:
        if method.describe is not None:
            facts.update(method.describe(model))
    return facts


def fit(config: RunConfig, output: str | Path, overwrite: bool = False, label: Optional[str] = None) -> dict[str, Any]:
    """Fine-tune as configured, evaluate, and write the run folder. Returns the summary.

    ``label`` (e.g. a sweep's "task · run · seed") prefixes the progress lines.

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
    prefix = f"{label}: " if label else ""
    training_started = time.perf_counter()
    for epoch in tqdm(range(optim.epochs), desc=label or "epochs", disable=None):
        record = {"epoch": epoch + 1, **epoch_updates(model, config, epoch)}
        record.update(train_one_epoch(model, train_loader, normalize, optimizer, lr_at, epoch * steps_per_epoch,
                                      device, config.bf16, optim.clip_grad, objective, f"epoch {epoch + 1}"))
        if (epoch + 1) % config.eval_every == 0 or epoch + 1 == optim.epochs:
            last_eval = evaluate(model, eval_loader, normalize, device, config.bf16)
            record.update(last_eval)
            if best is None or last_eval["acc"] > best["acc"]:
                best = {"acc": last_eval["acc"], "epoch": epoch + 1}
        run.log(record)
        shown = f"{prefix}epoch {epoch + 1}/{optim.epochs}: loss {record['loss']:.4f}, {record['train_images_per_s']:.1f} img/s"
        shown += f", {config.data.eval_split} acc {record['acc']:.2f}%" if "acc" in record else ""
        left = (time.perf_counter() - training_started) / (epoch + 1) * (optim.epochs - epoch - 1)
        tqdm.write(shown + (f", about {left:.0f} s left" if left else ""))
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
        **describe_methods(model, config),
        **measure_cost(model, config, eval_set, normalize, device, min(config.eval_batch_size, 32)),
        "train_images_per_s": record["train_images_per_s"],
        "device": str(device),
        "wall_time_s": time.perf_counter() - started,
    }
    run.write_summary(summary)
    return summary


def load_run_model(checkpoint: str | Path) -> tuple[nn.Module, RunConfig, int]:
    """Rebuild a trained model from a checkpoint file (or a run folder holding one): the backbone
    from the weights its config names, the methods, then the trained tensors."""
    path = Path(checkpoint)
    if path.is_dir():
        path = path / CHECKPOINT
    tensors, config_dict, num_classes = read_checkpoint(path)
    config = from_dict(RunConfig, config_dict)
    seed_everything(config.seed)  # as in fit, so that a "random" backbone comes back the same
    model = build_model(config, num_classes)
    load_trained(model, tensors)
    return model, config, num_classes


def evaluate_checkpoint(checkpoint: str | Path, data: Optional[str] = None, split: Optional[str] = None,
                        batch_size: Optional[int] = None) -> dict[str, Any]:
    """Accuracy and cost of a trained checkpoint on a split of a task (by default the run's own)."""
    model, config, num_classes = load_run_model(checkpoint)
    device = resolve_device(config.device)
    model.to(device)
    task: Task = open_task(data or config.data.path)
    split = split or config.data.eval_split
    dataset = ImageDataset(task.split(split), image_size_of(model), num_classes, config.data.cache)
    normalize = Normalize(config.data.normalization).to(device)
    loader = make_loader(dataset, batch_size or config.eval_batch_size, False, config.seed, config.data.num_workers)
    result = evaluate(model, loader, normalize, device, config.bf16)
    trainable, total = trainable_parameters(model)
    return {"method": config.method, "split": split, "acc": result["acc"], "eval_loss": result["eval_loss"],
            "images": len(dataset), "trainable_percent": 100.0 * trainable / total,
            **measure_cost(model, config, dataset, normalize, device, min(batch_size or config.eval_batch_size, 32))}
