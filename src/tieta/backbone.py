"""load_backbone: a timm ViT by name, with weights from the hub, a local file or a built-in asset.

Local files are read with timm's own loaders, never by unpickling code: ``.safetensors`` directly,
``.pth`` / ``.pt`` / ``.bin`` through ``torch.load(weights_only=True)``, and Google's ``.npz`` ViT
checkpoints through timm's npz loader. The state dict then goes through the model family's
``checkpoint_filter_fn`` (timm's conversions, position-embedding resampling to ``img_size``) and is
loaded strictly but for the classifier, which is always reset to the task's classes.
"""

from __future__ import annotations

import difflib
import importlib
from pathlib import Path
from typing import Callable, Optional, Union

import timm
from torch import nn

from tieta.errors import TietaError

WEIGHT_SUFFIXES = (".safetensors", ".pth", ".pt", ".bin", ".npz")
RANDOM = "random"


# the largest image side tieta builds a model for, checked here too for what reaches timm without a run
# config (tieta import --img-size)
MAX_IMG_SIZE = 4096


def builtin_weights() -> dict[str, Callable[[], Path]]:
    from tieta.data import assets  # imported lazily: building an asset needs the registry

    return {assets.SALIENCY_DINOV2_VITS14: assets.saliency_dinov2_vits14_weights}


def load_backbone(
    name: str,
    weights: Optional[Union[str, Path]] = None,
    num_classes: int = 1000,
    img_size: Optional[int] = None,
    **timm_kwargs,
) -> nn.Module:
    """Create the timm model ``name`` with pretrained weights and a fresh head for ``num_classes``.

    Args:
        name: a timm model name, e.g. "vit_base_patch16_224".
        weights: None for timm's published weights of ``name`` (from the model hub, needs network);
            "random" for random initialisation; the name of a built-in asset
            ("dinov2_vits14_saliency"); or a local .safetensors / .pth / .pt / .bin / .npz file.
        num_classes: classes of the task; the head is always re-initialised for them.
        img_size: input resolution; position embeddings are resampled to it. None keeps the model's.
        **timm_kwargs: passed to ``timm.create_model`` (e.g. ``drop_path_rate``).

    Returns:
        The model, in train mode, on the CPU.
    """
    if img_size is not None:
        timm_kwargs["img_size"] = img_size
    builtin = builtin_weights()
    if weights is None:
        model = _create(name, pretrained=True, num_classes=num_classes, **timm_kwargs)
        model.reset_classifier(num_classes)  # even where the published head has as many classes
        return model
    model = _create(name, pretrained=False, num_classes=num_classes, **timm_kwargs)
    if str(weights) == RANDOM:
        return model
    path = builtin[str(weights)]() if str(weights) in builtin else Path(weights)
    load_weights_file(model, path)
    return model


def _create(name: str, pretrained: bool, **kwargs) -> nn.Module:
    if not timm.is_model(name):
        close = difflib.get_close_matches(name, timm.list_models(), n=3)
        hint = f"; did you mean {', '.join(close)}?" if close else ""
        raise TietaError(f"timm has no model named {name!r}{hint}")
    img_size = kwargs.get("img_size")
    if img_size is not None and (type(img_size) is not int or not 1 <= img_size <= MAX_IMG_SIZE):
        raise TietaError(f"img_size must be a whole number of pixels from 1 to {MAX_IMG_SIZE}, got {img_size!r}")
    try:
        model = timm.create_model(name, pretrained=pretrained, **kwargs)
    except TietaError:
        raise
    except Exception as error:  # network, hub and config errors all mean the same thing to the user
        if isinstance(error, TypeError) and "img_size" in str(error):
            raise TietaError(f"timm's {name} takes no img_size: it is not a VisionTransformer, the models tieta "
                             "works on") from error
        if pretrained:
            raise TietaError(
                f"could not get the published weights of {name} from the model hub ({type(error).__name__}: "
                f"{str(error).splitlines()[0] if str(error) else 'no detail'}); pass a local weights file, "
                "or 'random'"
            ) from error
        raise TietaError(f"timm could not build {name}: {error}") from error
    _check_patch_grid(model, name, img_size)
    return model


def _check_patch_grid(model: nn.Module, name: str, img_size: Optional[int]) -> None:
    """Refuse an input size the patches do not tile (timm would only fail at the first forward pass)."""
    patch_embed = getattr(model, "patch_embed", None)
    patch = getattr(patch_embed, "patch_size", None)
    if img_size is None or patch is None or getattr(patch_embed, "dynamic_img_pad", False):
        return
    patch = tuple(patch) if isinstance(patch, (tuple, list)) else (patch, patch)
    if any(img_size % side for side in patch):
        side = patch[0] if patch[0] == patch[1] else "x".join(map(str, patch))
        lower = img_size - img_size % patch[0]
        near = " or ".join(str(size) for size in (lower, lower + patch[0]) if size > 0)
        raise TietaError(f"img_size {img_size} is not a multiple of {name}'s patch size {side}; use e.g. {near}")


def load_weights_file(model: nn.Module, path: Path) -> None:
    """Load a local weights file into ``model``, strictly for every parameter but the classifier.

    Raises:
        TietaError: the file is missing, of an unknown kind, unreadable, or does not fit the model.
    """
    path = Path(path)
    if not path.exists():
        raise TietaError(f"weights file {path} does not exist")
    if not path.is_file():
        raise TietaError(f"weights file {path} is not a file")
    if path.suffix not in WEIGHT_SUFFIXES:
        raise TietaError(f"weights file {path} should end in one of {', '.join(WEIGHT_SUFFIXES)}")
    if path.suffix == ".npz":
        _load_npz(model, path)
        return
    try:
        state_dict = timm.models.load_state_dict(str(path), weights_only=True)
    except Exception as error:
        raise TietaError(f"could not read weights file {path}: {str(error).splitlines()[0]}") from error
    filter_fn = getattr(importlib.import_module(type(model).__module__), "checkpoint_filter_fn", None)
    if filter_fn is not None:
        try:
            state_dict = filter_fn(state_dict, model)
        except Exception as error:
            raise TietaError(f"weights file {path} does not fit {type(model).__name__}: {error}") from error
    head_names = _head_names(model)
    state_dict = {k: v for k, v in state_dict.items() if k.split(".")[0] not in head_names}
    expected = {k: v.shape for k, v in model.state_dict().items() if k.split(".")[0] not in head_names}
    missing = sorted(set(expected) - set(state_dict))
    unexpected = sorted(set(state_dict) - set(expected))
    wrong = sorted(k for k in set(expected) & set(state_dict) if tuple(state_dict[k].shape) != tuple(expected[k]))
    if missing or unexpected or wrong:
        detail = "; ".join(
            f"{label} {', '.join(keys[:3])}{' ...' if len(keys) > 3 else ''}"
            for label, keys in (("missing", missing), ("unexpected", unexpected), ("wrong shape", wrong))
            if keys
        )
        raise TietaError(f"weights file {path} does not fit this model ({detail})")
    model.load_state_dict(state_dict, strict=False)


def _load_npz(model: nn.Module, path: Path) -> None:
    loader = getattr(model, "load_pretrained", None)
    if loader is None:
        raise TietaError(f"{type(model).__name__} has no loader for Google .npz checkpoints")
    num_classes = model.num_classes
    try:
        loader(str(path))
    except Exception as error:
        raise TietaError(f"weights file {path} does not fit this model ({type(error).__name__}: {error})") from error
    model.reset_classifier(num_classes)  # the checkpoint's head was trained for another task


def _head_names(model: nn.Module) -> set[str]:
    return {name for name in ("head", "head_dist") if isinstance(getattr(model, name, None), nn.Module)}

