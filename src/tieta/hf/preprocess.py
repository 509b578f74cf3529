"""The image processor's preprocessing as timm's ``pretrained_cfg`` (mean, std, interpolation, crop).

Read from the checkpoint's ``preprocessor_config.json`` where it has one (``image_mean``,
``image_std``, ``resample``, ``size`` and ``crop_size``), else the family's own processor defaults,
so that ``model.pretrained_cfg`` says how the images the checkpoint was trained on were prepared.
"""

from __future__ import annotations

from typing import Any

from tieta.errors import TietaError

OPENAI_CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
OPENAI_CLIP_STD = (0.26862954, 0.26130258, 0.27577711)
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
HALF = (0.5, 0.5, 0.5)
# each family's processor when the folder has none: ViTImageProcessor, BitImageProcessor (DINOv2:
# shortest side 256, centre crop 224), CLIPImageProcessor (224, crop 224), SiglipImageProcessor
FAMILY_DEFAULTS = {
    "vit": dict(mean=HALF, std=HALF, interpolation="bilinear", crop_pct=1.0),
    "dinov2": dict(mean=IMAGENET_MEAN, std=IMAGENET_STD, interpolation="bicubic", crop_pct=224 / 256),
    "clip": dict(mean=OPENAI_CLIP_MEAN, std=OPENAI_CLIP_STD, interpolation="bicubic", crop_pct=1.0),
    "siglip": dict(mean=HALF, std=HALF, interpolation="bicubic", crop_pct=1.0),
}
# PIL's resampling filters by number, as processor configs store them
RESAMPLE = {0: "nearest", 1: "lanczos", 2: "bilinear", 3: "bicubic", 4: "box", 5: "hamming"}


def _side(value: Any, keys: tuple[str, ...]) -> float | None:
    """A size setting's side: a number, or the first of ``keys`` in a mapping."""
    if isinstance(value, (int, float)) and not isinstance(value, bool):
        return float(value)
    if isinstance(value, dict):
        for key in keys:
            if isinstance(value.get(key), (int, float)) and not isinstance(value.get(key), bool):
                return float(value[key])
    return None


def _triple(value: Any, key: str, where: str) -> tuple[float, float, float]:
    if isinstance(value, (int, float)) and not isinstance(value, bool):
        value = [value] * 3
    if (not isinstance(value, list) or len(value) != 3
            or not all(isinstance(v, (int, float)) and not isinstance(v, bool) for v in value)):
        raise TietaError(f"{where} gives {key} as {value!r}; a processor config gives three numbers")
    return tuple(float(v) for v in value)


def pretrained_cfg(family: str, processor: dict[str, Any], where: str) -> dict[str, Any]:
    """mean, std, interpolation, crop_pct and crop_mode for a timm model's ``pretrained_cfg``.

    Args:
        family: a key of FAMILY_DEFAULTS.
        processor: the folder's preprocessor_config.json ({} where there is none).
        where: the file's path, for messages.
    """
    cfg = dict(FAMILY_DEFAULTS[family])
    if "image_mean" in processor:
        cfg["mean"] = _triple(processor["image_mean"], "image_mean", where)
    if "image_std" in processor:
        cfg["std"] = _triple(processor["image_std"], "image_std", where)
        if any(value <= 0 for value in cfg["std"]):
            raise TietaError(f"{where} gives image_std {list(cfg['std'])}; each must be positive")
    if "resample" in processor:
        cfg["interpolation"] = RESAMPLE.get(processor["resample"], cfg["interpolation"])
    if processor:
        resized = _side(processor.get("size"), ("shortest_edge", "height"))
        crop = _side(processor.get("crop_size"), ("height", "shortest_edge"))
        cropped = processor.get("do_center_crop", crop is not None)
        cfg["crop_pct"] = crop / resized if cropped and crop and resized and crop <= resized else 1.0
    cfg["crop_mode"] = "center"
    return cfg
