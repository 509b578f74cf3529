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

An export is whole or absent: it is written into a hidden folder beside the output and then moved
into place (or, with ``--overwrite``, exchanged with the older export in one step), so a process
killed at any instant leaves the old export or the new one, never a mix of two (killed just after
the exchange, it leaves the older export in the hidden folder ``.NAME.tieta-export-*`` beside it).
Of two exports into one folder at once, the second to finish finds the folder changed and refuses;
``--overwrite`` replaces only an export, never a folder that holds other files.

Everything read back is checked (``tieta_export.json`` within JSON limits and of the types tieta
writes, agreeing with its own settings; every tensor present, of its shape and type; the checksum
required), so that a damaged or edited export is one sentence, never a model that quietly differs.
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import os
import stat
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Optional

import torch
from torch import nn

import tieta
from tieta.backbone import MAX_IMG_SIZE
from tieta.data import normalization as normalizations
from tieta.data.vtab import open_task
from tieta.deploy.onnx import check_onnx, export_onnx
from tieta.errors import TietaError, listing, shown
from tieta.files import folder_mode, move_folder, read_json, remove_folder, swap_folders, write_file
from tieta.hf.export import TRANSFORMERS_FILES, check_methods, write_transformers
from tieta.methods import registry
from tieta.methods.lora import merge_lora
from tieta.train.checkpoint import read_tensors, write_tensors
from tieta.train.config import RunConfig, from_dict, validate
from tieta.train.model import image_size_of
from tieta.train.run_model import load_run_model
from tieta.train.model import build_backbone, build_model
from tieta.train.record import run_normalization
from tieta.train.rundir import CHECKPOINT, CHECKPOINT_BEST
from tieta.train.segmentation_run import open_segmentation_run_task
from tieta.video.dataset import open_video_task

EXPORT_FORMAT = 2  # raised when an export changes so that an older tieta cannot read it (2: normalization as numbers)
INFO_FILE = "tieta_export.json"
WEIGHTS_FILE = "model.safetensors"
ONNX_FILE = "model.onnx"  # with --onnx; a model over 2 GiB keeps its weights in model.onnx.data
EXPORT_FILES = (WEIGHTS_FILE, INFO_FILE, ONNX_FILE, ONNX_FILE + ".data")  # all that an export folder holds
EXPORT_FILES += TRANSFORMERS_FILES  # or, with --format transformers, a transformers model folder
MAX_INFO_BYTES = 16 << 20  # tieta_export.json: settings and class names, far below this
MAX_CLASSES = 10**6


@dataclass
class ExportInfo:
    """What an export says about its model (``tieta_export.json``)."""

    model: str
    method: str
    num_classes: int
    img_size: int
    normalization: str | dict[str, Any]  # the numbers it was trained with (tieta.data.normalization), or a name
    class_names: Optional[list[str]]
    config: dict[str, Any]


def is_export(folder: Path) -> bool:
    return (Path(folder) / INFO_FILE).is_file()


def task_class_names(config: RunConfig, num_classes: int) -> Optional[list[str]]:
    """The task's class names (an image folder's class folders, a segmentation task's classes.txt),
    where its data is still there."""
    try:
        if config.data.path is None:
            return None
        if getattr(config.data, "kind", None) == "video":  # a folder of clips: its class folders' names
            names = open_video_task(config.data.path).class_names
        elif getattr(config.data, "kind", None) == "segmentation":  # its classes.txt, if it has one
            names = open_segmentation_run_task(config).class_names
        else:
            names = open_task(config.data.path, config.data.holdout).class_names
    except TietaError:
        return None
    return names if names and len(names) == num_classes else None


def _bytes(path: Path) -> int:
    return path.stat().st_size if path.is_file() else 0


def export_run(run: str | Path, output: str | Path, overwrite: bool = False,
               onnx_batch_size: Optional[int] = None, best: bool = False) -> dict[str, Any]:
    """Write the inference model of the finished run in ``run`` to the folder ``output``.

    Args:
        best: the run's best evaluated epoch (checkpoint_best.safetensors) instead of its final one.
        onnx_batch_size: also write ``model.onnx`` at this fixed batch size, checked against
            PyTorch with onnxruntime (``tieta.deploy.onnx``).

    Returns:
        {"output": folder, "checkpoint_bytes": the run's checkpoint (trained tensors only),
         "export_bytes": model.safetensors, "backbone_bytes": the full backbone's tensors,
         "onnx_bytes", "onnx_max_difference" (with ONNX), ...}
    """
    run, output = Path(run), Path(output)
    _check_output(output, overwrite)
    before = _identity(output)  # what stands there now: a change by the end means another writer
    model, config, num_classes = load_run_model(run, best)
    merge_lora(model)
    model.eval()
    tensors = {name: tensor.detach().clone() for name, tensor in model.state_dict().items()}
    info = ExportInfo(config.model, config.method, num_classes, image_size_of(model), run_normalization(config),
                      task_class_names(config, num_classes), config.to_dict())
    record = {"format": EXPORT_FORMAT, "tieta_version": tieta.__version__, "source_run": str(run.resolve()),
              **info.__dict__}
    output.parent.mkdir(parents=True, exist_ok=True)
    # hidden, so that a report never searches it; removed whatever happens (after an exchange it
    # holds the older export)
    staging = Path(tempfile.mkdtemp(prefix=f".{output.name}.tieta-export-", dir=output.parent))
    onnx_facts: dict[str, Any] = {}
    try:
        write_tensors(tensors, staging / WEIGHTS_FILE, {"tieta_export_format": str(EXPORT_FORMAT)})
        write_file(staging / INFO_FILE, json.dumps(record, indent=2) + "\n")
        if onnx_batch_size is not None:
            onnx_facts = _write_onnx(model, staging, onnx_batch_size, info.img_size)
        export_bytes = _bytes(staging / WEIGHTS_FILE)
        _give_usual_modes(staging, output)
        _commit(staging, output, before, overwrite)
    finally:
        remove_folder(staging)
    backbone = build_backbone(config, num_classes, random_weights=True)
    checkpoint = run / (CHECKPOINT_BEST if best else CHECKPOINT) if run.is_dir() else run
    return {"output": output, "checkpoint_bytes": _bytes(checkpoint), "export_bytes": export_bytes,
            "backbone_bytes": sum(t.numel() * t.element_size() for t in backbone.state_dict().values()),
            "method": config.method, "model": config.model, **onnx_facts}


def export_transformers_run(run: str | Path, output: str | Path, overwrite: bool = False) -> dict[str, Any]:
    """Write the LoRA-only run in ``run`` to ``output`` as a transformers model folder
    (:mod:`tieta.hf.export`), whole or not at all as :func:`export_run` writes.

    Returns:
        {"output", "model", "method", "transformers_class", "max_difference", "note", "export_bytes"}.
    """
    run, output = Path(run), Path(output)
    _check_output(output, overwrite)
    before = _identity(output)
    model, config, num_classes = load_run_model(run)
    check_methods(config.methods)
    merge_lora(model)
    model.eval()
    output.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{output.name}.tieta-export-", dir=output.parent))
    try:
        facts = write_transformers(model, config.methods, num_classes, run_normalization(config),
                                   task_class_names(config, num_classes), staging, str(run.resolve()))
        export_bytes = sum(_bytes(path) for path in staging.iterdir())
        _give_usual_modes(staging, output)
        _commit(staging, output, before, overwrite)
    finally:
        remove_folder(staging)
    return {"output": output, "model": config.model, "method": config.method, "export_bytes": export_bytes, **facts}


def _identity(path: Path) -> Optional[tuple[int, int]]:
    """The device and inode of what stands at ``path`` (a link itself, not its target); None where
    nothing does."""
    try:
        found = os.lstat(path)
    except FileNotFoundError:
        return None
    return found.st_dev, found.st_ino


def _check_output(output: Path, overwrite: bool) -> None:
    """Refuse an output folder that this export may not take or replace (one sentence)."""
    try:
        found = os.lstat(output)
    except FileNotFoundError:
        return
    if stat.S_ISLNK(found.st_mode):
        raise TietaError(f"output {output} is a symbolic link; give the folder itself")
    if not stat.S_ISDIR(found.st_mode):
        raise TietaError(f"output {output} exists and is not a folder")
    entries = sorted(os.listdir(output))
    if entries and not overwrite:
        raise TietaError(f"output folder {output} already exists and is not empty; pick another or pass --overwrite")
    foreign = [name for name in entries if name not in EXPORT_FILES]
    if foreign:
        raise TietaError(f"output folder {output} holds {listing(foreign)}, which tieta export does not write; "
                         "move them away or export elsewhere (nothing was replaced)")


def _give_usual_modes(staging: Path, output: Path) -> None:
    """The modes a plain ``mkdir`` and ``open`` would give (a temporary folder is private), or the
    replaced export folder's own."""
    try:
        mode = stat.S_IMODE(os.lstat(output).st_mode)
    except FileNotFoundError:
        mode = folder_mode()
    for entry in staging.iterdir():
        os.chmod(entry, folder_mode() & 0o666)
    os.chmod(staging, mode)


@contextlib.contextmanager
def _locked(folder: Path):
    """Hold an exclusive lock on ``folder`` (released by the kernel if the process dies)."""
    handle = os.open(folder, os.O_RDONLY | os.O_DIRECTORY)
    try:
        fcntl.flock(handle, fcntl.LOCK_EX)
        yield
    finally:
        os.close(handle)


def _commit(staging: Path, output: Path, before: Optional[tuple[int, int]], overwrite: bool) -> None:
    """Put the staged export at ``output`` in one step: moved where nothing (or an empty folder)
    stands, exchanged with an older export otherwise (``staging`` then holds the older one).

    Raises:
        TietaError: ``output`` changed since the export began (another process wrote it), or now
            holds something an export may not replace.
    """
    changed = TietaError(f"{output} was written by another process while this export ran; nothing was replaced")
    with _locked(output.parent):  # the check and the move as one step among exporting processes
        if _identity(output) != before:
            raise changed
        _check_output(output, overwrite)
        if before is None or not os.listdir(output):
            try:
                move_folder(staging, output)
            except FileExistsError:
                raise changed from None
        else:
            swap_folders(staging, output)


def _write_onnx(model: nn.Module, folder: Path, batch_size: int, image_size: int) -> dict[str, Any]:
    """``model.onnx`` at a fixed batch size, checked with onnxruntime on random images."""
    # each method readies its part for a fixed graph, changing nothing evaluation computes (a
    # searched rate fixed at the number it gives)
    for method in registry.METHODS.values():
        if method.prepare_export is not None:
            method.prepare_export(model)
    path = export_onnx(model, folder / ONNX_FILE, batch_size, image_size)
    images = torch.randn(batch_size, 3, image_size, image_size, generator=torch.Generator().manual_seed(0))
    return {"onnx_bytes": sum(_bytes(p) for p in folder.glob(ONNX_FILE + "*")),
            "onnx_max_difference": check_onnx(model, path, images), "onnx_batch_size": batch_size}


def read_info(folder: str | Path) -> ExportInfo:
    """The ``tieta_export.json`` of an export folder, checked: within JSON limits, every entry of the
    type tieta writes, and agreeing with the settings it holds.

    Raises:
        TietaError: one sentence naming the file and the first problem.
    """
    folder = Path(folder)
    path = folder / INFO_FILE
    if not os.path.lexists(path):
        raise TietaError(f"{folder} is not a tieta export (no {INFO_FILE})")
    try:
        record = read_json(path, "export description", MAX_INFO_BYTES)
    except TietaError as error:
        raise TietaError(f"the export in {folder} is unreadable: {error}") from None
    if not isinstance(record, dict) or type(record.get("format")) is not int or record["format"] < 1:
        raise TietaError(f"{path} is not what tieta export writes")
    if record["format"] > EXPORT_FORMAT:
        version = record.get("tieta_version")
        version = version if isinstance(version, str) and version.isprintable() and len(version) <= 40 else "?"
        raise TietaError(f"{folder} was exported by tieta {version} in export format "
                         f"{record['format']}; this tieta ({tieta.__version__}) reads format {EXPORT_FORMAT}: "
                         "upgrade tieta to load it")
    needed = ("model", "method", "num_classes", "img_size", "normalization", "config")
    if any(key not in record for key in needed):
        raise TietaError(f"{path} lacks what tieta needs to rebuild the model (model, method, classes, "
                         "input size, settings)")
    num_classes = _whole(record, "num_classes", MAX_CLASSES, path)
    info = ExportInfo(_text(record, "model", path), _text(record, "method", path), num_classes,
                      _whole(record, "img_size", MAX_IMG_SIZE, path), _normalization(record, path),
                      _class_names(record.get("class_names"), num_classes, path), record["config"])
    _check_agreement(info, path)
    return info


def _text(record: dict[str, Any], key: str, path: Path) -> str:
    value = record[key]
    if not isinstance(value, str) or not value:
        raise TietaError(f"{path} gives {key} as {shown(value)}; tieta export writes a name")
    return value


def _normalization(record: dict[str, Any], path: Path) -> str | dict[str, Any]:
    """The numbers (or, in an older export, the name) of the normalisation the model was trained with."""
    value = record["normalization"]
    try:
        normalizations.check_setting(value, "normalization")
    except TietaError as error:
        raise TietaError(f"{path} gives normalization as {shown(value)}, which tieta cannot use ({error})") from None
    return value


def _whole(record: dict[str, Any], key: str, largest: int, path: Path) -> int:
    """A whole number from 1 to ``largest`` (a float, a bool or a string is refused, never rounded)."""
    value = record[key]
    if type(value) is not int or not 1 <= value <= largest:
        raise TietaError(f"{path} gives {key} as {shown(value)}; tieta export writes a whole number from 1 to "
                         f"{largest:,}")
    return value


def _class_names(names: Any, num_classes: int, path: Path) -> Optional[list[str]]:
    """None (no names), or one name per class."""
    if names is None:
        return None
    if not isinstance(names, list) or not all(isinstance(name, str) for name in names):
        raise TietaError(f"{path} gives class_names as {shown(names)}; tieta export writes a list of names")
    if len(names) != num_classes:
        raise TietaError(f"{path} names {len(names):,} classes but its model has {num_classes:,}")
    return names


def _check_agreement(info: ExportInfo, path: Path) -> RunConfig:
    """The export's settings as a RunConfig, refused unless they are usable and say what the export
    itself says (model, methods, normalisation, input size)."""
    if not isinstance(info.config, dict):
        raise TietaError(f"{path} gives config as {shown(info.config)}; tieta export writes a mapping of settings")
    try:
        config = from_dict(RunConfig, info.config)
        validate(config)
    except TietaError as error:
        raise TietaError(f"{path} holds settings tieta cannot use: {error}") from None
    pairs = [("model", info.model, config.model), ("method", info.method, config.method)]
    if config.img_size is not None:
        pairs.append(("img_size", info.img_size, config.img_size))
    for key, said, configured in pairs:
        if said != configured:
            raise TietaError(f"{path} disagrees with itself: it gives {key} {shown(said)} but its settings give "
                             f"{shown(configured)}")
    _check_normalization(info, config, path)
    return config


def _check_normalization(info: ExportInfo, config: RunConfig, path: Path) -> None:
    """The export's normalisation the numbers its settings stand for: those of the name they give, or
    those the run recorded where they give "model" (an older export's settings may record none)."""
    configured = config.data.normalization
    if configured == normalizations.MODEL:
        configured = (config.resolved or {}).get("normalization")
    if configured is None or info.normalization == normalizations.MODEL:
        return
    numbers = lambda setting: {key: value for key, value in normalizations.resolve(setting).items() if key != "source"}
    if numbers(info.normalization) != numbers(configured):
        raise TietaError(f"{path} disagrees with itself: it gives normalization {shown(info.normalization)} but its "
                         f"settings give {shown(configured)}")


def _check_keys(expected: dict[str, torch.Tensor], found: dict[str, torch.Tensor], where: Path) -> None:
    """One sentence naming the first offending keys of a checkpoint that does not fit the model."""
    missing = [key for key in expected if key not in found]
    extra = [key for key in found if key not in expected]
    shapes = [key for key in expected if key in found and tuple(found[key].shape) != tuple(expected[key].shape)]
    types = [key for key in expected if key in found and found[key].dtype != expected[key].dtype]
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
    if types:
        key = types[0]
        more = f" ({len(types) - 1} more tensors are of another type)" if len(types) > 1 else ""
        problems.append(f"has {key} as {found[key].dtype} where the model's is {expected[key].dtype}{more}")
    if problems:
        raise TietaError(f"{where} does not fit the model it describes: it " + "; it ".join(problems))


def load_export(folder: str | Path) -> tuple[nn.Module, ExportInfo]:
    """The inference model of an export folder (eval mode, on the CPU) and what the export says."""
    folder = Path(folder)
    info = read_info(folder)
    config = _check_agreement(info, folder / INFO_FILE)
    model = build_model(config, info.num_classes, random_weights=True)  # every tensor is replaced below
    merge_lora(model)
    if image_size_of(model) != info.img_size:
        raise TietaError(f"{folder / INFO_FILE} gives img_size {info.img_size} but the model it describes takes "
                         f"{image_size_of(model)}")
    tensors, _ = read_tensors(folder / WEIGHTS_FILE)
    expected = model.state_dict()
    _check_keys(expected, tensors, folder / WEIGHTS_FILE)
    model.load_state_dict(tensors, strict=True)
    # timm.data.resolve_model_data_config(model) gives the transform the model was trained with
    preprocessing = normalizations.timm_data_config(normalizations.resolve(info.normalization, model), info.img_size)
    model.pretrained_cfg = {**getattr(model, "pretrained_cfg", {}), "num_classes": info.num_classes,
                            **preprocessing}
    return model.eval(), info


def load(folder: str | Path) -> nn.Module:
    """``tieta.load(folder)``: the model a ``tieta export`` folder holds, ready for inference.

    Inputs are (B, 3, S, S) images normalised as in training (``tieta_export.json`` says which);
    the output is (B, num_classes) logits.
    """
    return load_export(folder)[0]
