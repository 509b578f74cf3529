"""A trained run as a model that leaves tieta's training: ``tieta export`` and ``tieta.load``.

An export folder holds:

    model.safetensors    every tensor of the inference model (the backbone with LoRA folded into
                         it, the adapters, the token-reduction modules' weights, the head), with a
                         checksum
    tieta_export.json    how to rebuild it: the timm model, the methods and their settings (merge
                         schedule, DyT's dispatch, a baseline's rates), the input size and
                         normalisation, the class names where the task has them

``tieta.load(folder)`` rebuilds the model with torch, timm and tieta only: the timm architecture,
the methods attached as configured, LoRA folded, then every tensor loaded strictly. It needs no
hub, no task folder and no run folder, and gives the trained model's logits.
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Optional

import torch
from torch import nn

import tieta
from tieta.data.vtab import open_task
from tieta.deploy.onnx import check_onnx, export_onnx
from tieta.errors import TietaError, listing
from tieta.methods.diffrate import DiffRateReduce, fix_rates
from tieta.methods.lora import merge_lora
from tieta.train.checkpoint import read_tensors, write_tensors
from tieta.train.config import RunConfig, from_dict, validate
from tieta.train.fit import image_size_of, load_run_model
from tieta.train.model import build_backbone, build_model
from tieta.train.rundir import CHECKPOINT

EXPORT_FORMAT = 1  # raised when an export changes so that an older tieta cannot read it
INFO_FILE = "tieta_export.json"
WEIGHTS_FILE = "model.safetensors"
ONNX_FILE = "model.onnx"  # with --onnx; a model over 2 GiB keeps its weights in model.onnx.data


@dataclass
class ExportInfo:
    """What an export says about its model (``tieta_export.json``)."""

    model: str
    method: str
    num_classes: int
    img_size: int
    normalization: str
    class_names: Optional[list[str]]
    config: dict[str, Any]


def is_export(folder: Path) -> bool:
    return (Path(folder) / INFO_FILE).is_file()


def task_class_names(config: RunConfig, num_classes: int) -> Optional[list[str]]:
    """The task's class names (an image folder's class folders), where its data is still there."""
    try:
        names = open_task(config.data.path).class_names if config.data.path else None
    except TietaError:
        return None
    return names if names and len(names) == num_classes else None


def _bytes(path: Path) -> int:
    return path.stat().st_size if path.is_file() else 0


def export_run(run: str | Path, output: str | Path, overwrite: bool = False,
               onnx_batch_size: Optional[int] = None) -> dict[str, Any]:
    """Write the inference model of the finished run in ``run`` to the folder ``output``.

    Args:
        onnx_batch_size: also write ``model.onnx`` at this fixed batch size, checked against
            PyTorch with onnxruntime (``tieta.deploy.onnx``).

    Returns:
        {"output": folder, "checkpoint_bytes": the run's checkpoint (trained tensors only),
         "export_bytes": model.safetensors, "backbone_bytes": the full backbone's tensors,
         "onnx_bytes", "onnx_max_difference" (with ONNX), ...}
    """
    run, output = Path(run), Path(output)
    if output.exists() and not output.is_dir():
        raise TietaError(f"output {output} exists and is not a folder")
    if output.is_dir() and any(output.iterdir()) and not overwrite:
        raise TietaError(f"output folder {output} already exists and is not empty; pick another or pass --overwrite")
    model, config, num_classes = load_run_model(run)
    merge_lora(model)
    model.eval()
    tensors = {name: tensor.detach().clone() for name, tensor in model.state_dict().items()}
    info = ExportInfo(config.model, config.method, num_classes, image_size_of(model), config.data.normalization,
                      task_class_names(config, num_classes), config.to_dict())
    record = {"format": EXPORT_FORMAT, "tieta_version": tieta.__version__, "source_run": str(run.resolve()),
              **info.__dict__}
    output.parent.mkdir(parents=True, exist_ok=True)
    # written beside, then renamed into place: an export folder is whole or absent
    staging = Path(tempfile.mkdtemp(prefix=f".{output.name}.", dir=output.parent))
    onnx_facts: dict[str, Any] = {}
    try:
        write_tensors(tensors, staging / WEIGHTS_FILE, {"tieta_export_format": str(EXPORT_FORMAT)})
        (staging / INFO_FILE).write_text(json.dumps(record, indent=2) + "\n")
        if onnx_batch_size is not None:
            onnx_facts = _write_onnx(model, staging, onnx_batch_size, info.img_size)
        output.mkdir(exist_ok=True)
        for entry in sorted(staging.iterdir()):
            os.replace(entry, output / entry.name)
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    backbone = build_backbone(config, num_classes, random_weights=True)
    checkpoint = run / CHECKPOINT if run.is_dir() else run
    return {"output": output, "checkpoint_bytes": _bytes(checkpoint), "export_bytes": _bytes(output / WEIGHTS_FILE),
            "backbone_bytes": sum(t.numel() * t.element_size() for t in backbone.state_dict().values()),
            "method": config.method, "model": config.model, **onnx_facts}


def _write_onnx(model: nn.Module, folder: Path, batch_size: int, image_size: int) -> dict[str, Any]:
    """``model.onnx`` at a fixed batch size, checked with onnxruntime on random images."""
    # a searched DiffRate model reads its kept numbers from its rate logits; fixing them at those
    # numbers changes nothing the model computes in evaluation and lets the graph hold them
    if any(isinstance(getattr(block, "reduce", None), DiffRateReduce) for block in getattr(model, "blocks", ())):
        fix_rates(model)
    path = export_onnx(model, folder / ONNX_FILE, batch_size, image_size)
    images = torch.randn(batch_size, 3, image_size, image_size, generator=torch.Generator().manual_seed(0))
    return {"onnx_bytes": sum(_bytes(p) for p in folder.glob(ONNX_FILE + "*")),
            "onnx_max_difference": check_onnx(model, path, images), "onnx_batch_size": batch_size}


def read_info(folder: str | Path) -> ExportInfo:
    """The ``tieta_export.json`` of an export folder, checked."""
    path = Path(folder) / INFO_FILE
    if not path.is_file():
        raise TietaError(f"{folder} is not a tieta export (no {INFO_FILE})")
    try:
        record = json.loads(path.read_text())
    except (OSError, ValueError) as error:
        raise TietaError(f"{path} is unreadable ({error})") from None
    if not isinstance(record, dict) or not isinstance(record.get("format"), int):
        raise TietaError(f"{path} is not what tieta export writes")
    if record["format"] > EXPORT_FORMAT:
        raise TietaError(f"{folder} was exported by tieta {record.get('tieta_version', '?')} in export format "
                         f"{record['format']}; this tieta ({tieta.__version__}) reads format {EXPORT_FORMAT}: "
                         "upgrade tieta to load it")
    try:
        names = record.get("class_names")
        return ExportInfo(str(record["model"]), str(record["method"]), int(record["num_classes"]),
                          int(record["img_size"]), str(record["normalization"]),
                          [str(n) for n in names] if names else None, dict(record["config"]))
    except (KeyError, TypeError, ValueError):
        raise TietaError(f"{path} lacks what tieta needs to rebuild the model (model, method, classes, "
                         "input size, settings)") from None


def _check_keys(expected: dict[str, torch.Tensor], found: dict[str, torch.Tensor], where: Path) -> None:
    """One sentence naming the first offending keys of a checkpoint that does not fit the model."""
    missing = [key for key in expected if key not in found]
    extra = [key for key in found if key not in expected]
    shapes = [key for key in expected if key in found and tuple(found[key].shape) != tuple(expected[key].shape)]
    problems = []
    if missing:
        problems.append(f"lacks {listing(missing)}")
    if extra:
        problems.append(f"has {listing(extra)}, which the model lacks")
    if shapes:
        key = shapes[0]
        more = f" ({len(shapes) - 1} more tensors are reshaped)" if len(shapes) > 1 else ""
        problems.append(f"has {key} of shape {tuple(found[key].shape)} where the model's is "
                        f"{tuple(expected[key].shape)}{more}")
    if problems:
        raise TietaError(f"{where} does not fit the model it describes: it " + "; it ".join(problems))


def load_export(folder: str | Path) -> tuple[nn.Module, ExportInfo]:
    """The inference model of an export folder (eval mode, on the CPU) and what the export says."""
    folder = Path(folder)
    info = read_info(folder)
    config = from_dict(RunConfig, info.config)
    validate(config)
    model = build_model(config, info.num_classes, random_weights=True)  # every tensor is replaced below
    merge_lora(model)
    tensors, _ = read_tensors(folder / WEIGHTS_FILE)
    expected = model.state_dict()
    _check_keys(expected, tensors, folder / WEIGHTS_FILE)
    model.load_state_dict(tensors, strict=True)
    model.pretrained_cfg = {**getattr(model, "pretrained_cfg", {}), "num_classes": info.num_classes,
                            "input_size": (3, info.img_size, info.img_size)}
    return model.eval(), info


def load(folder: str | Path) -> nn.Module:
    """``tieta.load(folder)``: the model a ``tieta export`` folder holds, ready for inference.

    Inputs are (B, 3, S, S) images normalised as in training (``tieta_export.json`` says which);
    the output is (B, num_classes) logits.
    """
    return load_export(folder)[0]
