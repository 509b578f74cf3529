"""Throughput side by side, in one run: interleaved rounds, medians of per-round ratios.

A single timing on a shared CPU can be off by a quarter; timing the models in turn, round after
round (in a rotating order), and taking the median of each round's ratio to the baseline cancels
most of that drift. Efficiency compares the measured speedup with the FLOPs bound:
``efficiency = speedup / (baseline FLOPs / model FLOPs)``; 1.0 means the saved FLOPs turned
fully into time.

Each row keeps its per-round speedups (``round_speedups``) and their range (``speedup_spread``):
two rows whose ranges overlap are not told apart by this timing. A ``progress`` callback hears
after each round how many are done and about how long the rest will take.
"""

from __future__ import annotations

import statistics
import time
from typing import Callable, Optional

import torch
from torch import nn

from tieta.measure.flops import count_flops
from tieta.measure.throughput import synchronize
from tieta.methods.method import LossFn
from tieta.methods.schedules import token_counts, vit_shape

Step = Callable[[], None]
# (rounds done, rounds, estimated seconds left): called before the first round and after each
Progress = Callable[[int, int, float], None]


def _time_steps(step: Step, steps: int, device: torch.device) -> float:
    synchronize(device)
    start = time.perf_counter()
    for _ in range(steps):
        step()
    synchronize(device)
    return time.perf_counter() - start


def interleaved_rates(steps_by_name: dict[str, Step], device: torch.device, rounds: int = 7,
                      min_round_seconds: float = 0.5, progress: Optional[Progress] = None) -> dict[str, list[float]]:
    """Calls per second of each step function, one list entry per round, measured in turn.

    Each step is warmed up, then given a fixed number of calls per round, chosen so that the
    slowest takes about ``min_round_seconds``.

    Args:
        progress: told (rounds done, rounds, seconds left) before the first round and after each.
    """
    calls, round_seconds = {}, 0.0
    for name, step in steps_by_name.items():
        step()
        step()  # warm-up: allocator, first-call costs
        once = _time_steps(step, 1, device)
        calls[name] = max(1, int(min_round_seconds / max(once, 1e-6)))
        round_seconds += calls[name] * once
    rates: dict[str, list[float]] = {name: [] for name in steps_by_name}
    names = list(steps_by_name)
    if progress is not None:
        progress(0, rounds, rounds * round_seconds)
    started = time.perf_counter()
    for round_index in range(rounds):
        shift = round_index % len(names)
        for name in names[shift:] + names[:shift]:  # rotate who goes first
            elapsed = _time_steps(steps_by_name[name], calls[name], device)
            rates[name].append(calls[name] / elapsed)
        if progress is not None:
            done = round_index + 1
            progress(done, rounds, (time.perf_counter() - started) / done * (rounds - done))
    return rates


def benchmark(
    models: dict[str, nn.Module],
    batch_size: int = 32,
    dtype: Optional[torch.dtype] = None,
    device: str | torch.device = "cpu",
    image_size: Optional[int] = None,
    rounds: int = 7,
    train: bool = False,
    images: Optional[torch.Tensor] = None,
    progress: Optional[Progress] = None,
    losses: Optional[dict[str, LossFn]] = None,
) -> list[dict]:
    """Throughput of several models side by side; the first is the baseline.

    Args:
        models: name -> model (all taking the same input size).
        dtype: None for float32, else autocast dtype (e.g. torch.bfloat16).
        train: time a training step (forward, backward, optimizer step on trainable parameters)
            instead of evaluation.
        images: the batch to time (B, 3, H, W), e.g. real images where a model's path depends on
            them (DyT); default: random images of ``batch_size`` and ``image_size``.
        progress: told (rounds done, rounds, seconds left) as the rounds go (see :data:`Progress`).
        losses: name -> the training loss ``(model, images, labels) -> scalar`` of that model (a
            method's own objective, ``Method.objective``); cross-entropy of the logits for the
            others (training only).

    Returns:
        One dict per model: name, gmacs, flops_ratio (to the baseline), images_per_s (median),
        speedup (median of per-round ratios to the baseline), round_speedups (those ratios),
        speedup_spread (their minimum and maximum), efficiency (speedup * flops_ratio),
        round_rates (calls/s per round).
    """
    device = torch.device(device)
    first = next(iter(models.values()))
    if images is None:
        size = image_size or int(first.patch_embed.img_size[0])
        images = torch.randn(batch_size, 3, size, size, device=device)
    images = images.to(device)
    batch_size = images.shape[0]
    autocast = torch.autocast(device.type, dtype=dtype, enabled=dtype is not None)
    gmacs = {name: count_flops(model.to(device), images[:1])["gmacs"] for name, model in models.items()}

    def eval_step(model: nn.Module) -> Step:
        model.eval()

        def step() -> None:
            with torch.inference_mode(), autocast:
                model(images)

        return step

    def train_step(model: nn.Module, loss_fn: Optional[LossFn] = None) -> Step:
        model.train()
        params = [p for p in model.parameters() if p.requires_grad]
        optimizer = torch.optim.AdamW(params, lr=1e-6)
        labels = torch.zeros(batch_size, dtype=torch.long, device=device)

        def step() -> None:
            with autocast:
                if loss_fn is None:
                    loss = nn.functional.cross_entropy(model(images), labels)
                else:
                    loss = loss_fn(model, images, labels)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()

        return step

    steps = {name: train_step(model, (losses or {}).get(name)) if train else eval_step(model)
             for name, model in models.items()}
    rates = interleaved_rates(steps, device, rounds, progress=progress)
    baseline = next(iter(models))
    rows = []
    for name in models:
        ratios = [a / b for a, b in zip(rates[name], rates[baseline])]
        speedup = statistics.median(ratios)
        flops_ratio = gmacs[name] / gmacs[baseline]
        rows.append({
            "name": name,
            "gmacs": gmacs[name],
            "flops_ratio": flops_ratio,
            "images_per_s": statistics.median(rates[name]) * batch_size,
            "speedup": speedup,
            "round_speedups": ratios,  # one per round: their range is what this timing can tell apart
            "speedup_spread": (min(ratios), max(ratios)),
            "round_rates": rates[name],  # calls/s in each round, for paired comparisons between rows
            "efficiency": speedup * flops_ratio,
        })
    return rows


def _scaled(block: nn.Module, branch: int, out: torch.Tensor) -> torch.Tensor:
    """A branch's output under its LayerScale: a ViT block's ``ls1``/``ls2`` module, an Eva block's
    ``gamma_1``/``gamma_2`` (None when off). Eva's rotary embedding is not applied here: an elementwise
    step whose time is small beside the products it precedes."""
    scale = getattr(block, f"ls{branch}", None)
    if scale is not None:
        return scale(out)
    gamma = getattr(block, f"gamma_{branch}", None)
    return out if gamma is None else out * gamma


def shape_ceiling(
    model: nn.Module, schedule: list[int], batch_size: int, device: str | torch.device = "cpu",
    dtype: Optional[torch.dtype] = None, rounds: int = 7, progress: Optional[Progress] = None,
) -> float:
    """The speedup merging could reach if merging itself cost nothing.

    Times the model's own (unmerged) attention and MLP branches at the token counts the schedule
    leaves (attention at the tokens entering each block, MLP at those left after its merge), and
    at the full count, side by side; patch embedding and head are the same for both. Small token
    counts run matrix products at a lower rate, so this ceiling is usually below the FLOPs bound.

    Args:
        progress: told (rounds done, rounds, seconds left) as the rounds go (see :data:`Progress`).

    Returns:
        full-token time / merged-token time of a whole forward pass.
    """
    device = torch.device(device)
    counts = token_counts(vit_shape(model), schedule)
    width = model.embed_dim
    autocast = torch.autocast(device.type, dtype=dtype, enabled=dtype is not None)
    blocks = list(model.blocks)
    full = counts[0]
    inputs = {n: torch.randn(batch_size, n, width, device=device) for n in set(counts)}
    size = int(model.patch_embed.img_size[0])
    images = torch.randn(batch_size, 3, size, size, device=device)

    def run_blocks(entering: list[int], leaving: list[int]) -> Step:
        def step() -> None:
            with torch.inference_mode(), autocast:
                for block, n_in, n_out in zip(blocks, entering, leaving):
                    x = inputs[n_in]
                    x = x + _scaled(block, 1, block.attn(block.norm1(x)))
                    x = x[:, :n_out]
                    x = x + _scaled(block, 2, block.mlp(block.norm2(x)))

        return step

    def run_model() -> None:
        with torch.inference_mode(), autocast:
            model.forward_head(model.forward_features(images))

    was_training = model.training
    model.eval()
    try:
        depth = len(blocks)
        rates = interleaved_rates({
            "model": run_model,
            "full": run_blocks([full] * depth, [full] * depth),
            "merged": run_blocks(counts[:-1], counts[1:]),
        }, device, rounds, progress=progress)
    finally:
        model.train(was_training)
    ratios = []
    for model_rate, full_rate, merged_rate in zip(rates["model"], rates["full"], rates["merged"]):
        rest = max(0.0, 1 / model_rate - 1 / full_rate)  # patch embedding, head
        ratios.append((rest + 1 / full_rate) / (rest + 1 / merged_rate))
    return statistics.median(ratios)
