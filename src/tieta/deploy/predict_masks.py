"""Segmenting images with a segmentation run or its export: ``tieta predict RUN IMAGE ... --output DIR``.

Each image is prepared as the run evaluates its test images: rescaled to fit
``segmentation_data.scale``, normalised as the run's images are, segmented as
``segmentation.eval_mode`` says (sliding windows or the whole image), the logits resized to the
image's own size. Two files are written per image into the output folder:

- ``<name>_mask.png``: the label mask, a palette PNG of the image's size whose pixel values are the
  model's class indices (0 to classes - 1; with ADE20K's ``reduce_zero_label``, index k is the
  annotation's label k + 1), coloured by :func:`palette`;
- ``<name>_overlay.png``: the image with each pixel's class colour blended over it (half and half).

A file in the way that tieta did not write there is refused before any image is segmented
(``--overwrite`` replaces it); an image that cannot be read is reported and skipped.
"""

from __future__ import annotations

import io
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Optional

import numpy as np
import torch
from PIL import Image
from tqdm.auto import tqdm

from tieta.data.transforms import Normalize, load_rgb
from tieta.data.vtab import IMAGE_SUFFIXES
from tieta.dense.config import SegmentationConfig
from tieta.dense.dataset import SegmentationDataConfig
from tieta.dense.model import SegmentationModel
from tieta.dense.transforms import evaluation_image
from tieta.device import resolve_device
from tieta.errors import TietaError
from tieta.files import check_owned, files_named, folder_mode, write_owned
from tieta.train.config import from_dict
from tieta.train.segmentation_run import segment

MASK_SUFFIX, OVERLAY_SUFFIX = "_mask.png", "_overlay.png"
OVERLAY_ALPHA = 0.5  # the class colour's share of an overlay pixel


@dataclass
class SegmentationSettings:
    """How a segmentation model's images are prepared and segmented (its run's settings)."""

    model: SegmentationConfig
    data: SegmentationDataConfig


@dataclass
class Segmented:
    """Per segmented image: (image, mask file, overlay file, its classes by share of pixels, largest
    first); and the files skipped with why."""

    rows: list[tuple[Path, Path, Path, list[tuple[int, float]]]] = field(default_factory=list)
    skipped: list[tuple[Path, str]] = field(default_factory=list)


def segmentation_settings_of(model, config: Optional[dict]) -> Optional[SegmentationSettings]:
    """A segmentation model's settings (the run's ``segmentation`` and ``segmentation_data``; the
    defaults where a run has none); None for any other model."""
    if not isinstance(model, SegmentationModel):
        return None
    config = config or {}
    settings = SegmentationSettings(
        from_dict(SegmentationConfig, dict(config.get("segmentation") or {}), "segmentation."),
        from_dict(SegmentationDataConfig, dict(config.get("segmentation_data") or {}), "segmentation_data."))
    settings.model.check()
    settings.data.check(prefix="segmentation_data.")
    return settings


def palette() -> np.ndarray:
    """(256, 3) uint8 colours, one per class index: PASCAL VOC's palette (each index's bits spread
    over the three channels from the top bit down), so neighbouring classes differ clearly."""
    colours = np.zeros((256, 3), dtype=np.uint8)
    for index in range(256):
        value, red, green, blue = index, 0, 0, 0
        for bit in range(8):
            red |= ((value >> 0) & 1) << (7 - bit)
            green |= ((value >> 1) & 1) << (7 - bit)
            blue |= ((value >> 2) & 1) << (7 - bit)
            value >>= 3
        colours[index] = (red, green, blue)
    return colours


def mask_png(labels: np.ndarray, colours: np.ndarray) -> bytes:
    """A palette PNG of (H, W) uint8 class indices."""
    picture = Image.fromarray(labels)  # mode L; the palette makes it P, the values kept
    picture.putpalette(colours.reshape(-1).tolist())
    buffer = io.BytesIO()
    picture.save(buffer, format="PNG")
    return buffer.getvalue()


def overlay_png(image: np.ndarray, labels: np.ndarray, colours: np.ndarray) -> bytes:
    """(H, W, 3) uint8 RGB with each pixel's class colour blended over it, as PNG bytes."""
    blended = (1 - OVERLAY_ALPHA) * image.astype(np.float32) + OVERLAY_ALPHA * colours[labels].astype(np.float32)
    buffer = io.BytesIO()
    Image.fromarray(np.clip(np.rint(blended), 0, 255).astype(np.uint8)).save(buffer, format="PNG")
    return buffer.getvalue()


def _earlier_output(path: Path, output: Path) -> bool:
    """Whether ``path`` is one of the masks and overlays in ``output`` (an output folder inside an
    input folder holds the last run's)."""
    return path.name.endswith((MASK_SUFFIX, OVERLAY_SUFFIX)) and path.parent.resolve() == output.resolve()


def output_names(files: list[Path], output: Path) -> list[tuple[Path, Path]]:
    """(mask, overlay) paths in ``output`` for each image, named by the image's name without its
    suffix; a name that repeats (images of one name in several folders) gets -2, -3..., the first
    number no other image's name has taken (``x.png`` twice beside ``x-2.png``: x, x-3, x-2)."""
    stems = {path.stem for path in files}  # an image's own name is its own, before any numbered one
    used: set[str] = set()
    names = []
    for path in files:
        stem, number = path.stem, 1
        while stem in used or (number > 1 and stem in stems):
            number += 1
            stem = f"{path.stem}-{number}"
        used.add(stem)
        names.append((output / f"{stem}{MASK_SUFFIX}", output / f"{stem}{OVERLAY_SUFFIX}"))
    return names


@torch.inference_mode()
def predict_masks(predictor, paths: list[str | Path], output: Path, overwrite: bool = False, device: str = "auto",
                  on_skip: Optional[Callable[[Path, str], None]] = None) -> Segmented:
    """Segment the images at ``paths`` (files, or folders of them) and write each one's mask and
    overlay into the folder ``output`` (made where missing).

    Raises:
        TietaError: ``output`` is a file, a file of the user's is in the way of one to write (unless
            ``overwrite``), or no image could be read.
    """
    result = Segmented()

    def skip(path: Path, why: str) -> None:
        result.skipped.append((path, why))
        if on_skip is not None:
            on_skip(path, why)

    if output.exists() and not output.is_dir():
        raise TietaError(f"{output} is a file; a segmentation model writes a mask and an overlay per image into a "
                         "folder: give --output DIR")
    files = []
    for path in files_named(paths, skip, IMAGE_SUFFIXES):
        if _earlier_output(path, output):  # segmenting it again would write x_mask_mask.png
            skip(path, "a mask or overlay that predict wrote into --output before")
        else:
            files.append(path)
    if not files:
        raise TietaError("no image files to segment" + (f" ({len(result.skipped)} paths skipped)"
                                                        if result.skipped else ""))
    names = output_names(files, output)
    for mask, overlay in names:  # before any image is segmented
        check_owned(mask, adopt=overwrite)
        check_owned(overlay, adopt=overwrite)
    output.mkdir(parents=True, exist_ok=True, mode=folder_mode())
    settings: SegmentationSettings = predictor.segmentation
    target = resolve_device(device)
    model = predictor.model.to(target).eval()
    normalize = Normalize(predictor.normalization).to(target)
    colours = palette()
    for path, (mask_path, overlay_path) in zip(tqdm(files, desc="segmenting", unit="img", disable=None), names):
        try:
            pixels = np.array(load_rgb(path), dtype=np.uint8)
        except TietaError as error:
            skip(path, str(error))
            continue
        image = normalize(evaluation_image(pixels, settings.data.scale)[None].to(target))
        logits = segment(model, image, settings.model, pixels.shape[:2])
        labels = logits[0].argmax(dim=0).to(torch.uint8).cpu().numpy()
        write_owned(mask_path, mask_png(labels, colours), adopt=overwrite)
        write_owned(overlay_path, overlay_png(pixels, labels, colours), adopt=overwrite)
        counts = np.bincount(labels.reshape(-1), minlength=model.classes)
        shares = sorted(((index, count / labels.size) for index, count in enumerate(counts) if count),
                        key=lambda item: -item[1])
        result.rows.append((path, mask_path, overlay_path, shares))
    if not result.rows:
        raise TietaError(f"no image could be read ({len(files)} tried, each named above with why)")
    return result


def classes_text(shares: list[tuple[int, float]], name: Callable[[int], str], shown: int = 3) -> str:
    """"sky 52%, tree 30%, road 10%": the largest classes of a mask and their shares of its pixels."""
    return ", ".join(f"{name(index)} {100 * share:.0f}%" for index, share in shares[:shown])
