"""Classifying new images with a trained run or an export: ``tieta predict``.

Images are prepared exactly as in training (the straight resize to the model's input size with the
run's filter, bicubic unless the model's preprocessing names another, and the run's normalisation),
decoded a batch at a time. A file that cannot be read is reported and skipped, and the others are
classified.
"""

from __future__ import annotations

import csv
import io
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterator, Optional

import torch
from torch import nn
from tqdm.auto import tqdm

from tieta.data import normalization as normalizations
from tieta.data.transforms import Normalize, load_resized
from tieta.data.vtab import IMAGE_SUFFIXES
from tieta.deploy.export import is_export, load_export, task_class_names
from tieta.deploy.predict_clips import predict_clips, video_settings_of
from tieta.deploy.predict_masks import segmentation_settings_of
from tieta.errors import TietaError
from tieta.files import files_named
from tieta.device import resolve_device
from tieta.train.model import image_size_of
from tieta.train.run_model import load_run_model
from tieta.train.record import run_normalization


@dataclass
class Predictor:
    """A model ready to classify: its input size, normalisation and class names."""

    model: nn.Module
    img_size: int
    normalization: dict[str, Any]  # the numbers and resize filter it was trained with (tieta.data.normalization)
    class_names: Optional[list[str]]
    video: Any = None  # a video model's clip settings (tieta.video.dataset.VideoDataConfig): it classifies clips
    # a segmentation model's settings (tieta.deploy.predict_masks.SegmentationSettings): it writes masks
    segmentation: Any = None

    def name(self, index: int) -> str:
        return self.class_names[index] if self.class_names else str(index)


def open_predictor(source: str | Path) -> Predictor:
    """The model of a run folder (or its checkpoint file) or of an export folder."""
    source = Path(source)
    if not source.exists():
        raise TietaError(f"{source} does not exist: give a run folder or an export folder")
    if source.is_dir() and is_export(source):
        model, info = load_export(source)
        return Predictor(model, info.img_size, normalizations.resolve(info.normalization, model), info.class_names,
                         video_settings_of(model, info.config), segmentation_settings_of(model, info.config))
    model, config, num_classes = load_run_model(source)
    return Predictor(model.eval(), image_size_of(model), run_normalization(config),
                     task_class_names(config, num_classes), video_settings_of(model, config.to_dict()),
                     segmentation_settings_of(model, config.to_dict()))


@dataclass
class Predictions:
    """Each classified image's top classes, and the files skipped with why."""

    rows: list[tuple[Path, list[tuple[str, float]]]] = field(default_factory=list)
    skipped: list[tuple[Path, str]] = field(default_factory=list)


def image_files(paths: list[str | Path], skip: Callable[[Path, str], None]) -> list[Path]:
    """The image files named, and those inside the folders named (recursively, sorted)."""
    return files_named(paths, skip, IMAGE_SUFFIXES)


def _batches(files: list[Path], size: int, batch_size: int, skip: Callable[[Path, str], None],
             interpolation: str = "bicubic") -> Iterator[tuple[list[Path], torch.Tensor]]:
    """(files, (b, 3, S, S) uint8 images) of up to ``batch_size`` readable images at a time."""
    chunk: list[Path] = []
    images: list[torch.Tensor] = []
    for path in files:
        try:
            images.append(load_resized(path, size, interpolation))
            chunk.append(path)
        except TietaError as error:
            skip(path, str(error))
        if len(chunk) == batch_size:
            yield chunk, torch.stack(images)
            chunk, images = [], []
    if chunk:
        yield chunk, torch.stack(images)


@torch.inference_mode()
def predict(predictor: Predictor, paths: list[str | Path], top_k: int = 5, batch_size: int = 32,
            device: str = "auto", on_skip: Optional[Callable[[Path, str], None]] = None) -> Predictions:
    """Classify the images at ``paths`` (files, or folders of them).

    Returns:
        Predictions: per image the ``top_k`` (class name, probability) pairs, best first.
    """
    result = Predictions()

    def skip(path: Path, why: str) -> None:
        result.skipped.append((path, why))
        if on_skip is not None:
            on_skip(path, why)

    if predictor.segmentation is not None:
        raise TietaError("a segmentation model segments images rather than classifies them: use "
                         "tieta.deploy.predict_masks.predict_masks (tieta predict ... --output DIR)")
    if predictor.video is not None:  # a video model: clips, each scored by its views' mean logits
        return predict_clips(predictor, paths, top_k, batch_size, device, skip, result)
    files = image_files(paths, skip)
    if not files:
        raise TietaError("no image files to classify" + (f" ({len(result.skipped)} paths skipped)"
                                                         if result.skipped else ""))
    target = resolve_device(device)
    model = predictor.model.to(target)
    normalize = Normalize(predictor.normalization).to(target)
    with tqdm(total=len(files), desc="classifying", unit="img", disable=None) as progress:
        for chunk, images in _batches(files, predictor.img_size, batch_size, skip,
                                      normalizations.interpolation_of(predictor.normalization)):
            probabilities = model(normalize(images.to(target))).float().softmax(dim=-1)
            values, indices = probabilities.topk(min(top_k, probabilities.shape[-1]), dim=-1)
            for path, row_values, row_indices in zip(chunk, values.tolist(), indices.tolist()):
                result.rows.append((path, [(predictor.name(i), p) for i, p in zip(row_indices, row_values)]))
            progress.update(len(chunk))
    if not result.rows:
        raise TietaError(f"no image could be read ({len(files)} tried, each named above with why)")
    return result


def shown_path(path: Path) -> str:
    """A file name as text that can always be written: a name that is not UTF-8 (Linux names are
    bytes) keeps its valid characters and shows each other byte as ``\\xNN`` (``b"\\xff.png"``
    becomes ``\\xff.png``)."""
    return os.fsencode(path).decode("utf-8", "backslashreplace")


def _writable(name: str) -> str:
    """A class name (a folder's name, so possibly not UTF-8) as :func:`shown_path` shows a path."""
    return name.encode("utf-8", "surrogateescape").decode("utf-8", "backslashreplace")


def predictions_csv(predictions: Predictions, top_k: int) -> str:
    """image, class_1, probability_1, ..., class_k, probability_k: one row per classified image.

    The file is UTF-8 text; an image or class name with bytes that are not UTF-8 is written as
    :func:`shown_path` writes it (each such byte as ``\\xNN``).
    """
    buffer = io.StringIO()
    writer = csv.writer(buffer)
    writer.writerow(["image"] + [f"{kind}_{rank}" for rank in range(1, top_k + 1) for kind in ("class", "probability")])
    for path, top in predictions.rows:
        writer.writerow([shown_path(path)] + [value for name, p in top for value in (_writable(name), f"{p:.6f}")])
    return buffer.getvalue()
