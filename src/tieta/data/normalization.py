"""``data.normalization``: the mean, std and resize filter that images are preprocessed with.

A run names them (``imagenet``; ``inception`` or ``half``, 0.5/0.5; ``clip`` or ``openai``, OpenAI's
statistics for CLIP and EVA-02), gives the numbers (``{mean: [r, g, b], std: [r, g, b]}`` on the
0-1 scale, with an optional ``interpolation``), or, by default, takes the backbone's own
(``model``): the mean, std and interpolation of ``model.pretrained_cfg``, timm's record of how its
published weights were trained. A backbone built with random weights or from a file has timm's
default pretrained_cfg of its model name; one without any gets ImageNet's numbers.

What a setting resolved to (:func:`resolve`) is a plain mapping, written into the run's config.yaml
(``resolved.normalization``), its checkpoint and its export, so that evaluating, exporting and
predicting preprocess exactly as training did, and ``timm.data.resolve_model_data_config`` of an
exported model builds the same transform (:func:`timm_data_config`).
"""

from __future__ import annotations

from typing import Any, Optional

from torch import nn

from tieta.data.transforms import INTERPOLATIONS, NORMALIZATIONS
from tieta.errors import TietaError, shown
from tieta.files import is_number

MODEL = "model"  # the backbone's own statistics, from its pretrained_cfg
DEFAULT_INTERPOLATION = "bicubic"  # the literature's resize, and that of every name above
CHOICES = f"one of {', '.join(NORMALIZATIONS)} or {MODEL}, or {{mean: [r, g, b], std: [r, g, b]}}"


def check_numbers(values: dict[str, Any], where: str) -> None:
    """Refuse explicit numbers that are not three finite means, three positive finite standard
    deviations and, where given, an interpolation tieta resizes with (one sentence naming ``where``)."""
    extra = sorted(set(values) - {"mean", "std", "interpolation", "source"})
    if extra or "mean" not in values or "std" not in values:
        raise TietaError(f"{where} as numbers is {{mean: [r, g, b], std: [r, g, b]}} (and optionally interpolation), "
                         f"got the keys {', '.join(map(str, values)) or 'none'}")
    for key in ("mean", "std"):
        numbers = values[key]
        if (not isinstance(numbers, (list, tuple)) or len(numbers) != 3
                or not all(is_number(n) for n in numbers)):
            raise TietaError(f"{where}.{key} must be three finite numbers (red, green, blue on the 0-1 scale), "
                             f"got {_listed(numbers)}")
    if not all(n > 0 for n in values["std"]):
        raise TietaError(f"{where}.std must be positive (images are divided by it), got {_listed(values['std'])}")
    interpolation = values.get("interpolation", DEFAULT_INTERPOLATION)
    if interpolation not in INTERPOLATIONS:
        raise TietaError(f"{where}.interpolation must be one of {', '.join(INTERPOLATIONS)}, "
                         f"got {shown(interpolation)}")
    if not isinstance(values.get("source", ""), str):
        raise TietaError(f"{where}.source is text that says where the numbers come from, got {shown(values['source'])}")


def check_setting(setting: Any, where: str = "data.normalization") -> None:
    """Refuse a setting that is neither a known name nor explicit numbers."""
    if isinstance(setting, dict):
        check_numbers(setting, where)
    elif not isinstance(setting, str) or (setting != MODEL and setting not in NORMALIZATIONS):
        raise TietaError(f"{where} must be {CHOICES}, got {shown(setting)}")


def resolve(setting: Any, model: Optional[nn.Module] = None) -> dict[str, Any]:
    """The numbers a setting stands for: {"mean": [3], "std": [3], "interpolation": name, "source":
    where they come from}; ``model`` (the built backbone) is read for ``model``."""
    check_setting(setting)
    if isinstance(setting, dict):
        return {"mean": [float(n) for n in setting["mean"]], "std": [float(n) for n in setting["std"]],
                "interpolation": setting.get("interpolation", DEFAULT_INTERPOLATION),
                "source": setting.get("source") or "the numbers given"}
    if setting != MODEL:
        mean, std = NORMALIZATIONS[setting]
        return {"mean": list(mean), "std": list(std), "interpolation": DEFAULT_INTERPOLATION, "source": setting}
    cfg = getattr(model, "pretrained_cfg", None)
    if not isinstance(cfg, dict) or not _has_numbers(cfg):
        mean, std = NORMALIZATIONS["imagenet"]
        return {"mean": list(mean), "std": list(std), "interpolation": DEFAULT_INTERPOLATION,
                "source": "imagenet (the backbone has no pretrained_cfg with a mean and std)"}
    interpolation = cfg.get("interpolation")
    name = cfg.get("architecture") or type(model).__name__
    tag = f"{name}.{cfg['tag']}" if cfg.get("tag") else name
    return {"mean": [float(n) for n in cfg["mean"]], "std": [float(n) for n in cfg["std"]],
            "interpolation": interpolation if interpolation in INTERPOLATIONS else DEFAULT_INTERPOLATION,
            "source": f"timm's pretrained_cfg of {tag}"}


def _has_numbers(cfg: dict[str, Any]) -> bool:
    try:
        check_numbers({"mean": list(cfg.get("mean") or ()), "std": list(cfg.get("std") or ())}, "pretrained_cfg")
    except TietaError:
        return False
    return True


def described(resolved: dict[str, Any]) -> str:
    """One line: the numbers and where they come from."""
    numbers = lambda values: "/".join(f"{n:.4g}" for n in values)
    return (f"mean {numbers(resolved['mean'])}, std {numbers(resolved['std'])}, {resolved['interpolation']} resize "
            f"({resolved['source']})")


def timm_data_config(resolved: dict[str, Any], img_size: int) -> dict[str, Any]:
    """The pretrained_cfg entries with which ``timm.data.resolve_model_data_config`` and
    ``create_transform`` build the transform tieta trains with: a straight resize to img_size x
    img_size ("squash", no crop) with the resolved filter, then the resolved mean and std."""
    return {"input_size": (3, img_size, img_size), "interpolation": resolved["interpolation"],
            "mean": tuple(resolved["mean"]), "std": tuple(resolved["std"]), "crop_pct": 1.0, "crop_mode": "squash"}


def _listed(value: Any) -> str:
    """A list of numbers as a message shows it: its first few items (anything else as errors.shown)."""
    if not isinstance(value, (list, tuple)):
        return shown(value)
    return "[" + ", ".join(shown(item, 12) for item in value[:4]) + (", ...]" if len(value) > 4 else "]")


def interpolation_of(setting: Any) -> str:
    """The resize filter of a resolved (or named) setting."""
    return setting.get("interpolation", DEFAULT_INTERPOLATION) if isinstance(setting, dict) else DEFAULT_INTERPOLATION
