"""``tieta import``: a checkpoint of the PYRA, DyT or NOAH reference code becomes an ordinary run folder.

The reference scripts save the whole ViT; a tieta run keeps the trained tensors in its checkpoint
and rebuilds the frozen backbone from ``config.weights``. So an import

1. reads the checkpoint without running code (``tieta.reference.common``),
2. renames the kind's modules to tieta's (``pyra.py``, ``dyt.py``, ``noah.py``, each pinned to its
   public code) and reads from them the settings they fix (LoRA rank, merge schedule, adapter width),
3. builds the tieta model of ``--model`` with those methods and checks the checkpoint against it:
   every shape (the first mismatch is named), no key missing, no key left over,
4. writes the run folder: ``backbone.safetensors`` (the checkpoint's backbone, today's timm names,
   which ``config.weights`` names by its absolute path), ``checkpoint.safetensors`` (trained tensors and
   config), ``config.yaml`` and the state "finished",
5. rebuilds the run as ``tieta eval`` will (``load_run_model``) and checks that every tensor came back.

Every check runs before anything is written. A folder that holds a run is replaced only with
``overwrite``, and then only once the new run's files are all written (``RunDir`` exchanges the folders whole).

The backbones of the three codes' ViTs are named as today's timm names them (timm 0.5.4's and 0.9's
ViT keys agree with timm 1.0's for these models), so they are written unchanged; a key today's model
does not have is refused as left over, never guessed. ``config.weights`` is an absolute path, which
the checkpoint's own copy of the config keeps too: to move an imported run, import it again there.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Optional

import torch
from torch import nn

from tieta.data.vtab import open_task
from tieta.errors import TietaError, listing
from tieta.reference import dyt, noah, pyra
from tieta.reference.common import Converted, Reference, read_reference, shape_text
from tieta.train.checkpoint import save_checkpoint, write_tensors
from tieta.train.config import load_config
from tieta.train.model import image_size_of
from tieta.train.run_model import load_run_model
from tieta.train.model import apply_methods, build_backbone
from tieta.train.rundir import CHECKPOINT, FAILED, FINISHED, RunDir, holds_run

KINDS: dict[str, Callable[[Reference, int, Any], Converted]] = {
    "pyra": pyra.convert,
    "dyt": dyt.convert,
    "noah": noah.convert,
}
NAMES = {"pyra": "PYRA", "dyt": "DyT", "noah": "NOAH"}
DEFAULT_MODEL = "vit_base_patch16_224"  # all three codes train ViT-B/16 (ImageNet-21k) by default
BACKBONE = "backbone.safetensors"
HEADS = ("head", "head_dist")
# settings the checkpoint fixes (or that have their own flag): --set may not change them
FIXED = ("model", "weights", "method", "img_size", "data.path", "lora.", "merge.", "adapter.scale", "adapter.dim",
         "dyt.variant", "dyt.experts", "dyt.adapter_dim")
# what gives away which code wrote a checkpoint: (kind, key pattern or None, saved argument or None)
SIGNS = (
    ("pyra", r"^blocks\.\d+\.pyra_(a|b|norm)", "token_merging"),
    ("dyt", r"^blocks\.\d+\.(mlp_token_select|adaptmlp)\.", "token_target_ratio"),
    ("noah", None, "is_LoRA"),
)


@dataclass
class ImportResult:
    """What an import wrote.

    Attributes:
        output: the run folder.
        method: the tieta methods the run has.
        num_classes: classes of its head.
        trained: trained parameters (in the checkpoint); backbone: frozen ones (in backbone.safetensors).
        notes: what was assumed where the reference checkpoint does not say.
    """

    output: Path
    method: str
    num_classes: int
    trained: int
    backbone: int
    notes: list[str] = field(default_factory=list)


def _check_kind(reference: Reference, kind: str) -> None:
    """Refuse a checkpoint that another of the codes evidently wrote (its modules or its arguments say so)."""
    for other, pattern, argument in SIGNS:
        if other == kind:
            continue
        key = next((key for key in reference.tensors if pattern and re.search(pattern, key)), None)
        evidence = key or (f"its saved argument {argument}" if argument in reference.args else None)
        if evidence is not None:
            raise TietaError(f"{reference.path} looks like a checkpoint of the {NAMES[other]} code ({evidence}), "
                             f"not the {NAMES[kind]} code's; import it with --from {other}")


def _check_output(output: Path, overwrite: bool) -> None:
    if output.exists() and not output.is_dir():
        raise TietaError(f"output {output} exists and is not a folder")
    if holds_run(output) and not overwrite:
        raise TietaError(f"output folder {output} already exists and is not empty; pick another, or pass --overwrite "
                         "to replace its run")


def _check_settings(settings: dict[str, Any]) -> None:
    for key in settings:
        if any(key == fixed or (fixed.endswith(".") and key.startswith(fixed)) for fixed in FIXED):
            raise TietaError(f"--set {key}: the import takes that from the checkpoint (or from --model, --img-size, "
                             "--data, --schedule)")


def _num_classes(reference: Reference, num_classes: Optional[int], task_classes: Optional[int]) -> int:
    head = reference.tensors.get("head.weight")
    if head is None or head.dim() != 2:
        raise TietaError(f"{reference.path} has no classifier weight head.weight (a 2-D tensor): it is not a "
                         "fine-tuned checkpoint")
    classes = int(head.shape[0])
    if num_classes is not None and num_classes != classes:
        raise TietaError(f"--num-classes is {num_classes}, but the checkpoint's head has {classes} classes")
    if task_classes is not None and task_classes != classes:
        raise TietaError(f"the task in --data has {task_classes} classes, but the checkpoint's head has {classes}")
    return classes


def _check_shapes(reference: Reference, converted: Converted, model: nn.Module, model_name: str) -> None:
    """Refuse the first tensor (in the checkpoint's order) whose shape differs from the model's."""
    expected = {name: tuple(tensor.shape) for name, tensor in model.state_dict().items()}
    for name, tensor in converted.tensors.items():
        if name in expected and tuple(tensor.shape) != expected[name]:
            origin = converted.origin[name]
            was = shape_text(reference.tensors[origin].shape)
            here = f"{name} is {shape_text(expected[name])}" if origin != name else shape_text(expected[name])
            hint = ("trained at another image size? give it with --img-size" if name == "pos_embed" else
                    "a checkpoint for another architecture? name it with --model")
            raise TietaError(f"{reference.path} does not fit {model_name}: {origin} is {was} in the checkpoint but "
                             f"{here} in the model ({hint})")


def _check_fit(reference: Reference, converted: Converted, model: nn.Module, kind: str, model_name: str) -> None:
    """Refuse a checkpoint that does not fit the built model: a shape, then missing keys, then extra ones."""
    _check_shapes(reference, converted, model, model_name)
    expected = model.state_dict()
    source = reference.path
    missing = [converted.reference_name(name) for name in expected if name not in converted.tensors]
    if missing:
        raise TietaError(f"{source} lacks {listing(missing)}, which a {NAMES[kind]}-code checkpoint for {model_name} "
                         f"with {converted.method} has")
    extra = [converted.origin[name] for name in converted.tensors if name not in expected]
    if extra:
        raise TietaError(f"{source} has keys that a {NAMES[kind]}-code checkpoint for {model_name} with "
                         f"{converted.method} does not: {listing(extra)}")


def _rebuilds(output: Path, model: nn.Module) -> None:
    """Rebuild the run as ``tieta eval`` does and check every tensor against ``model``."""
    rebuilt, _, _ = load_run_model(output / CHECKPOINT)
    want, got = model.state_dict(), rebuilt.state_dict()
    for name, tensor in want.items():
        if name not in got or got[name].shape != tensor.shape or not torch.equal(got[name], tensor):
            raise TietaError(f"the imported run in {output} does not rebuild to the checkpoint's {name}; this is a "
                             "bug in tieta's importer")


def import_checkpoint(
    kind: str,
    source: str | Path,
    output: str | Path,
    model: Optional[str] = None,
    num_classes: Optional[int] = None,
    data: Optional[str | Path] = None,
    img_size: Optional[int] = None,
    schedule: Any = None,
    settings: Optional[dict[str, Any]] = None,
    overwrite: bool = False,
) -> ImportResult:
    """Turn a reference checkpoint into a finished tieta run folder that ``tieta eval`` reads.

    Args:
        kind: "pyra", "dyt" or "noah": whose code wrote the checkpoint.
        source: the checkpoint (.pth/.pt/.bin, read with weights_only=True, or .safetensors).
        output: the run folder to write.
        model: the timm model it was trained on (default vit_base_patch16_224).
        num_classes: if given, checked against the checkpoint's head.
        data: the task folder, recorded for ``tieta eval`` (its classes are checked).
        img_size: the input size it was trained at (default: the saved arguments', else the model's).
        schedule: for PYRA-code checkpoints without PYRA modules: the ToMe schedule, or "none".
        settings: other dotted run settings (seed, device, data.normalization ...).
        overwrite: replace the run in ``output``.

    Raises:
        TietaError: one sentence for anything that does not fit; nothing is written then.
    """
    if kind not in KINDS:
        raise TietaError(f"--from takes one of {', '.join(KINDS)}, got {kind!r}")
    source, output, settings = Path(source), Path(output), dict(settings or {})
    _check_output(output, overwrite)
    _check_settings(settings)
    task = open_task(data) if data is not None else None
    reference = read_reference(source)
    _check_kind(reference, kind)
    classes = _num_classes(reference, num_classes, task.num_classes if task else None)
    model_name = model or DEFAULT_MODEL

    base = {"model": model_name, "weights": "random", **({"img_size": img_size} if img_size else {})}
    backbone = build_backbone(load_config(overrides=base), classes, random_weights=True)
    converted = KINDS[kind](reference, len(backbone.blocks), schedule)
    overrides = {**converted.settings, **base, **settings}
    if task is not None:
        overrides["data.path"] = str(task.root)
    config = load_config(overrides=overrides)
    if config.img_size is not None and config.img_size != image_size_of(backbone):  # the saved arguments' size
        backbone = build_backbone(config, classes, random_weights=True)
    _check_shapes(reference, converted, backbone, model_name)  # the backbone first: its sizes explain the rest
    built = apply_methods(backbone, config)
    _check_fit(reference, converted, built, kind, model_name)
    built.load_state_dict(converted.tensors)
    reference.tensors, converted.tensors = {}, {}  # the model holds the values now: a ViT-L's worth less memory

    trained = {name for name, param in built.named_parameters() if param.requires_grad}
    frozen = {name: tensor for name, tensor in built.state_dict().items()
              if name not in trained and name.split(".", 1)[0] not in HEADS}
    weights = (output / BACKBONE).resolve()
    config = load_config(overrides={**overrides, "weights": str(weights)})
    config_dict = config.to_dict()

    run = RunDir(output, overwrite)
    run.check_writable(sum(t.numel() * t.element_size() for t in built.state_dict().values()) + 2**20)
    run.open()
    try:
        run.start(config_dict, epochs=0)
        write_tensors(frozen, run.file(BACKBONE), {"tieta_imported_from": f"{kind} checkpoint {source.name}"})
        save_checkpoint(built, run.checkpoint, config_dict, classes)
        run.checkpointed(0)  # a replacement moves in here, whole: nothing of the replaced run comes along
        _rebuilds(output, built)
        run.set_state(FINISHED, f"imported from {kind} checkpoint {source.resolve()}")
    except BaseException as error:
        if not run.replacing:
            run.set_state(FAILED, str(error) if isinstance(error, TietaError) else f"import failed: {error!r}")
        raise
    finally:
        run.close()
    return ImportResult(output, converted.method, classes,
                        sum(param.numel() for name, param in built.named_parameters() if name in trained),
                        sum(tensor.numel() for tensor in frozen.values()), converted.notes)
