"""The standard comparisons behind ``tieta bench``: unpatched timm, ToMe and PYRA at the paper's
schedules (evaluation), or LoRA with and without merging (training), built from random weights
(throughput does not depend on them)."""

from __future__ import annotations

from typing import Optional

import timm
import torch
from torch import nn

from tieta.measure.benchmark import benchmark, shape_ceiling
from tieta.methods.lora import add_lora
from tieta.methods.params import freeze_backbone
from tieta.methods.pyra import add_pyra
from tieta.methods.schedules import resolve_schedule
from tieta.methods.tome import add_tome

DTYPES = {"fp32": None, "bf16": torch.bfloat16}


def _vit(name: str, img_size: Optional[int], seed: int = 0) -> nn.Module:
    from tieta.backbone import load_backbone

    torch.manual_seed(seed)
    kwargs = {} if img_size is None else {"img_size": img_size}
    return load_backbone(name, weights="random", num_classes=1000, **kwargs).eval()


def eval_models(name: str, img_size: Optional[int], schedules: list[str]) -> dict[str, nn.Module]:
    models = {"timm": _vit(name, img_size), "tome r=0": add_tome(_vit(name, img_size), 0)}
    for schedule in schedules:
        models[f"tome {schedule}"] = add_tome(_vit(name, img_size), schedule)
        models[f"pyra {schedule}"] = add_pyra(_vit(name, img_size), schedule)
    return models


def train_models(name: str, img_size: Optional[int], schedules: list[str], rank: int = 8) -> dict[str, nn.Module]:
    def lora(model: nn.Module) -> nn.Module:
        return freeze_backbone(add_lora(model, rank=rank))

    models = {"lora": lora(_vit(name, img_size))}
    for schedule in schedules:
        models[f"tome+lora {schedule}"] = lora(add_tome(_vit(name, img_size), schedule))
        models[f"pyra+lora {schedule}"] = lora(add_pyra(_vit(name, img_size), schedule))
    return models


def run_suite(model: str, img_size: Optional[int], batch_size: int, dtype: str, schedules: list[str],
              rounds: int, train: bool, device: str = "cpu") -> list[dict]:
    """Rows of the benchmark table, with each merged schedule's shape-limited ceiling (evaluation)."""
    models = (train_models if train else eval_models)(model, img_size, schedules)
    rows = benchmark(models, batch_size, DTYPES[dtype], device, rounds=rounds, train=train)
    if not train:
        plain = models["timm"]
        ceilings = {s: shape_ceiling(plain, resolve_schedule(plain, s), batch_size, device, DTYPES[dtype], rounds)
                    for s in schedules}
        for row in rows:
            schedule = row["name"].split(" ")[-1]
            if schedule in ceilings:
                row["ceiling_speedup"] = ceilings[schedule]
                row["ceiling_efficiency"] = ceilings[schedule] * row["flops_ratio"]
    return rows
