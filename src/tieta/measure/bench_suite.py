"""The standard comparisons behind ``tieta bench``: unpatched timm, ToMe and PYRA at the paper's
schedules (evaluation), or LoRA with and without merging (training), built from random weights
(throughput does not depend on them). Sizes that could not fit are refused from an estimate before
anything is allocated (:func:`check_sizes`)."""

from __future__ import annotations

import statistics
from pathlib import Path
from typing import Callable, Optional

import torch
from torch import nn

from tieta.backbone import load_backbone
from tieta.errors import TietaError
from tieta.measure.benchmark import Progress, benchmark, shape_ceiling
from tieta.measure.free_merge import free_merge
from tieta.methods.adapter import add_adapter
from tieta.methods.blocks import check_vit
from tieta.methods.diffrate import add_diffrate
from tieta.methods.dynamicvit import add_dynamicvit
from tieta.methods.dyt import add_dyt
from tieta.methods.evit import add_evit
from tieta.methods.lora import add_lora
from tieta.methods.params import freeze_backbone
from tieta.methods.pyra import add_pyra
from tieta.methods.schedules import resolve_schedule
from tieta.methods.tome import add_tome
from tieta.measure.suites import SUITES
from tieta.native import tensor_code
from tieta.train.config import MAX_BATCH_SIZE, MAX_IMG_SIZE
from tieta.video.config import MAX_FRAMES
from tieta.video.model import VideoModel

DTYPES = {"fp32": None, "bf16": torch.bfloat16}
CALIBRATION_IMAGES = 64  # images DyT's dispatchers are set on (their quantile), at most
BYTES_PER_VALUE = {"fp32": 4, "bf16": 2}
MEMINFO = Path("/proc/meminfo")


def _vit(name: str, img_size: Optional[int], seed: int = 0) -> nn.Module:
    torch.manual_seed(seed)
    kwargs = {} if img_size is None else {"img_size": img_size}
    return load_backbone(name, weights="random", num_classes=1000, **kwargs).eval()


def activation_values(model: nn.Module, batch_size: int, train: bool) -> int:
    """A low estimate of the activation values a forward pass of ``model`` holds at its peak, from
    its shape: per image and block, the tokens times the widths of qkv, the attention output and
    the MLP's hidden layer, plus the attention scores (heads x tokens x tokens) where attention is
    not fused; evaluation holds one block's at a time, training keeps every block's for the
    backward pass. The input images count too. The true peak is higher (norms, residuals, the
    optimizer), so a batch refused on this estimate could never have fit."""
    size = int(model.patch_embed.img_size[0])
    tokens = int(model.patch_embed.num_patches) + int(getattr(model, "num_prefix_tokens", 1))
    width, block = int(model.embed_dim), model.blocks[0]
    fc1 = getattr(getattr(block, "mlp", None), "fc1", None)
    hidden = int(fc1.out_features) if isinstance(fc1, nn.Linear) else 4 * width
    scores = 0 if getattr(block.attn, "fused_attn", False) else int(block.attn.num_heads) * tokens * tokens
    per_block = tokens * (3 * width + width + hidden) + scores
    return batch_size * (3 * size * size + per_block * (len(model.blocks) if train else 1))


def free_bytes(device: str) -> Optional[int]:
    """Memory free for new tensors on ``device``: CUDA's free memory, or the system's MemAvailable
    (/proc/meminfo) for the CPU; None where it cannot be told."""
    place = torch.device(device)
    if place.type == "cuda":
        return int(torch.cuda.mem_get_info(place)[0])
    try:
        lines = MEMINFO.read_text().splitlines()
    except OSError:
        return None
    for line in lines:
        if line.startswith("MemAvailable:"):
            return int(line.split()[1]) * 1024  # in kB
    return None


def check_sizes(model: str, img_size: Optional[int], batch_size: int, dtype: str, train: bool, device: str,
                frames: Optional[int] = None) -> None:
    """Refuse, before any model is timed, an image or batch size beyond the run config's limits
    (MAX_IMG_SIZE, MAX_BATCH_SIZE), and a batch whose activations (:func:`activation_values`, a low
    estimate) need more memory than ``device`` has free (a batch of clips: ``frames`` images each).

    Raises:
        TietaError: one sentence naming the size and its limit.
    """
    if img_size is not None and img_size > MAX_IMG_SIZE:
        raise TietaError(f"the image size must be at most {MAX_IMG_SIZE} px, got {img_size:,}")
    if batch_size > MAX_BATCH_SIZE:
        raise TietaError(f"the batch size must be at most {MAX_BATCH_SIZE:,}, got {batch_size:,}")
    if frames is not None and not 1 <= frames <= MAX_FRAMES:
        raise TietaError(f"the frames of a clip must be in 1 .. {MAX_FRAMES}, got {frames:,}")
    probe = _vit(model, img_size)
    check_vit(probe)  # the estimate reads a ViT's shape
    need = activation_values(probe, batch_size * (frames or 1), train) * BYTES_PER_VALUE[dtype]
    free = free_bytes(device)
    if free is not None and need > free:
        size = int(probe.patch_embed.img_size[0])
        what = f"clips of {frames} frames" if frames else "images"
        raise TietaError(f"a batch of {batch_size:,} {what} of {size} px needs at least {need / 2**30:,.1f} GiB for "
                         f"{model}'s activations (an estimate from its tokens, width and depth), more than the "
                         f"{free / 2**30:,.1f} GiB free on {device}; use a smaller batch size or image size")


class TensorMerge(nn.Module):
    """A model run with the tensor implementation of the merge instead of the native one, to show
    what the native merge saves."""

    def __init__(self, model: nn.Module) -> None:
        super().__init__()
        self.model = model

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        with tensor_code():
            return self.model(images)


def eval_models(name: str, img_size: Optional[int], schedules: list[str],
                merge_variants: bool = False) -> dict[str, nn.Module]:
    """timm, ToMe at r=0, then ToMe and PYRA at each schedule; with ``merge_variants`` also ToMe
    with the tensor merge and with a free merge."""
    models = {"timm": _vit(name, img_size), "tome r=0": add_tome(_vit(name, img_size), 0)}
    for schedule in schedules:
        models[f"tome {schedule}"] = add_tome(_vit(name, img_size), schedule)
        models[f"pyra {schedule}"] = add_pyra(_vit(name, img_size), schedule)
        if merge_variants:
            models[f"tome {schedule}, tensor merge"] = TensorMerge(add_tome(_vit(name, img_size), schedule))
            models[f"tome {schedule}, free merge"] = free_merge(add_tome(_vit(name, img_size), schedule))
    return models


def train_models(name: str, img_size: Optional[int], schedules: list[str], rank: int = 8) -> dict[str, nn.Module]:
    def lora(model: nn.Module) -> nn.Module:
        return freeze_backbone(add_lora(model, rank=rank))

    models = {"lora": lora(_vit(name, img_size))}
    for schedule in schedules:
        models[f"tome+lora {schedule}"] = lora(add_tome(_vit(name, img_size), schedule))
        models[f"pyra+lora {schedule}"] = lora(add_pyra(_vit(name, img_size), schedule))
    return models


@torch.inference_mode()
def calibrate_dispatchers(model: nn.Module, images: torch.Tensor, rho: float) -> nn.Module:
    """Set each DyT dispatcher's bias so that a share ``rho`` of the patch tokens of ``images`` is
    active in every layer: random weights then dispatch like a trained model that met its target."""
    model.eval()
    for block in model.blocks:
        inputs = []
        handle = block.dispatcher.register_forward_hook(lambda module, args, out: inputs.append(out))
        model(images)
        handle.remove()
        logits = inputs[0].flatten() - block.dispatcher.bias
        block.dispatcher.bias.fill_(-float(torch.quantile(logits, 1 - rho)))
    return model


def dyt_models(name: str, img_size: Optional[int], rho: float = 0.5, adapter_dim: int = 8,
               batch_size: int = 32) -> dict[str, nn.Module]:
    """The dense adapter model (the baseline), DyT (MLP dispatch) and DyT + ToMe ("low")."""
    probe = _vit(name, img_size)
    size = int(probe.patch_embed.img_size[0])
    images = torch.randn(batch_size, 3, size, size, generator=torch.Generator().manual_seed(1))
    dyt = calibrate_dispatchers(add_dyt(_vit(name, img_size), rho=rho, adapter_dim=adapter_dim), images, rho)
    both = calibrate_dispatchers(add_tome(add_dyt(_vit(name, img_size), rho=rho, adapter_dim=adapter_dim), "low"),
                                 images, rho)
    return {"adapter": add_adapter(_vit(name, img_size), dim=adapter_dim), "dyt": dyt, "dyt+tome low": both,
            "adapter+tome low": add_tome(add_adapter(_vit(name, img_size), dim=adapter_dim), "low")}


def _paired_ratios(rows: list[dict]) -> None:
    """Paired ratios (medians over rounds of one row's throughput / another's, steadier than a ratio
    of two medians on a noisy machine): each PYRA row's ``vs_tome`` (ToMe at the same schedule),
    and each ToMe row's ``vs_free_merge`` (the same schedule with a free merge)."""
    by_name = {row["name"]: row for row in rows}

    def paired(row: dict, other: Optional[dict]) -> Optional[float]:
        if other is None:
            return None
        return statistics.median(a / b for a, b in zip(row["round_rates"], other["round_rates"]))

    for row in rows:
        name = row["name"]
        if name.startswith("pyra") and (ratio := paired(row, by_name.get(name.replace("pyra", "tome", 1)))):
            row["vs_tome"] = ratio
        if name.startswith("tome ") and (ratio := paired(row, by_name.get(f"{name}, free merge"))):
            row["vs_free_merge"] = ratio


def stage_progress(log: Callable[[str], None], step: int, steps: int, what: str) -> Progress:
    """A :data:`~tieta.measure.benchmark.Progress` that logs one line per round: the step, what it
    times, the round and the time left in the step."""
    def progress(done: int, rounds: int, left: float) -> None:
        where = f"round {done + 1} of {rounds}" if done < rounds else f"{rounds} rounds done"
        about = f", about {left:.0f} s left in this step" if done < rounds else ""
        log(f"[{step}/{steps}] {what}: {where}{about}")

    return progress


def as_clip_models(models: dict[str, nn.Module], frames: int) -> dict[str, nn.Module]:
    """Each model as a video model: its backbone on every frame of a clip, the attentive pooling
    and its classifier after (:class:`tieta.video.model.VideoModel`)."""
    return {name: VideoModel(model, frames).eval() for name, model in models.items()}


def run_suite(model: str, img_size: Optional[int], batch_size: int, dtype: str, schedules: list[str],
              rounds: int, train: bool, device: str = "cpu", merge_variants: bool = False,
              log: Optional[Callable[[str], None]] = None, frames: Optional[int] = None,
              suite: str = "merging") -> list[dict]:
    """Rows of the benchmark table, with each merged schedule's shape-limited ceiling (evaluation
    of images); ``merge_variants`` adds ToMe with the tensor merge and with a free merge (evaluation).

    Args:
        frames: time clips of this many frames (batches of ``batch_size`` clips, (B, T, 3, S, S)),
            each model as a video model; None: images.
        suite: "merging" (timm, ToMe and PYRA at ``schedules``) or "dyt" (the adapter, DyT, DyT + ToMe
            and the adapter + ToMe at "low"; evaluation only).
        log: told what is built and timed, round by round with the time left (None: silent).
    """
    if suite not in SUITES:
        raise TietaError(f"the suite must be one of {', '.join(SUITES)}, got {suite!r}")
    if suite == "dyt" and train:
        raise TietaError("the dyt suite times evaluation (its skipping is the evaluation path); leave out --train")
    say = log or (lambda text: None)
    ceilings_timed = not train and suite == "merging" and frames is None
    steps = 1 + (len(schedules) if ceilings_timed else 0)
    on_clips = f" on clips of {frames} frames" if frames else ""
    if suite == "dyt":
        say(f"building the {model} models to time (random weights, DyT's dispatchers set to keep half the tokens) "
            "and counting their FLOPs")
        models = dyt_models(model, img_size, batch_size=min(CALIBRATION_IMAGES, batch_size * (frames or 1)))
    else:
        say(f"building the {model} models to time (random weights; schedules {', '.join(schedules)}) and counting "
            "their FLOPs")
        models = train_models(model, img_size, schedules) if train else \
            eval_models(model, img_size, schedules, merge_variants)
    clips = None
    if frames is not None:
        models = as_clip_models(models, frames)
        side = int(next(iter(models.values())).backbone.patch_embed.img_size[0])
        clips = torch.randn(batch_size, frames, 3, side, side, generator=torch.Generator().manual_seed(0))
    kind = "training steps" if train else "evaluation"
    timing = stage_progress(say, 1, steps, f"timing {kind} of {', '.join(models)}{on_clips} side by side")
    rows = benchmark(models, batch_size, DTYPES[dtype], device, rounds=rounds, train=train, images=clips,
                     progress=timing if log else None)
    _paired_ratios(rows)
    if ceilings_timed:
        plain = models["timm"]
        ceilings = {}
        for index, s in enumerate(schedules):
            timing = stage_progress(say, 2 + index, steps, f"the ceiling at {s} (timm's layers at its token counts)")
            ceilings[s] = shape_ceiling(plain, resolve_schedule(plain, s), batch_size, device, DTYPES[dtype], rounds,
                                        progress=timing if log else None)
        for row in rows:
            schedule = row["name"].split(" ")[-1]
            if schedule in ceilings:
                row["ceiling_speedup"] = ceilings[schedule]
                row["ceiling_efficiency"] = ceilings[schedule] * row["flops_ratio"]
    return rows


# settings that reach PYRA's "low" cost on ViT-B/16 (8.77 GMACs) and the same token counts on any
# depth-12, 196-patch ViT: EViT's keep rate and DynamicViT's geometric ratios (rho 0.517)
MATCHED_LOW = {"evit_keep_rate": 0.49, "dynamicvit_ratios": (0.517, 0.517 ** 2, 0.517 ** 3),
               "diffrate_rates": "vit_b_deit_8.7"}


def baseline_models(name: str, img_size: Optional[int], rho: float = 0.5, batch_size: int = 32) -> dict[str, nn.Module]:
    """timm, then ToMe, PYRA, EViT, DynamicViT and DiffRate at PYRA's "low" cost, and DyT (MLP
    dispatch, calibrated to ``rho`` active tokens); random weights (throughput does not depend on
    them, except DyT's, whose dispatchers are calibrated)."""
    probe = _vit(name, img_size)
    size = int(probe.patch_embed.img_size[0])
    images = torch.randn(batch_size, 3, size, size, generator=torch.Generator().manual_seed(1))
    return {
        "timm": probe,
        "tome low": add_tome(_vit(name, img_size), "low"),
        "pyra low": add_pyra(_vit(name, img_size), "low"),
        "evit 0.49": add_evit(_vit(name, img_size), keep_rate=MATCHED_LOW["evit_keep_rate"]),
        "dynamicvit rho 0.517": add_dynamicvit(_vit(name, img_size), ratios=MATCHED_LOW["dynamicvit_ratios"]),
        "diffrate 8.7": add_diffrate(_vit(name, img_size), kept_prune=MATCHED_LOW["diffrate_rates"]),
        "dyt rho 0.5": calibrate_dispatchers(add_dyt(_vit(name, img_size), rho=rho), images, rho),
    }
