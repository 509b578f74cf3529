"""torch Datasets given to ``fit`` directly (``fit(config, output, train=..., test=...)``).

Each item is ``(image, label)``: the image a PIL image, or a (3, H, W) tensor of uint8 pixels or of
float values in [0, 1] (what torchvision's ToTensor gives; a normalised tensor is refused, since the
run normalises); the label an integer. Images are made RGB and resized to the model's input as
image files are (tieta.data.transforms: bicubic), decoded once and kept (or augmented anew each
time, with ``data.augment``).
"""

from __future__ import annotations

import hashlib
from pathlib import Path
from typing import Any, Optional

import numpy as np
import torch
from PIL import Image
from torch.utils.data import Dataset
from tqdm.auto import tqdm

from tieta.data.augment import Augment
from tieta.data.transforms import INTERPOLATIONS, _to_rgb, _upright
from tieta.data.vtab import Task
from tieta.errors import TietaError

GIVEN = "torch datasets"  # how summaries name them, in place of a folder


class GivenImage:
    """An item of a given dataset, named in fingerprints by its split, index and pixels' hash."""

    def __init__(self, split: str, index: int, digest: str) -> None:
        self.key = f"{split}[{index}]:{digest}"

    def __str__(self) -> str:
        return self.key


def count_classes(train: Dataset, num_classes: Optional[int]) -> int:
    """``num_classes``, else ``len(train.classes)`` (torchvision's ImageFolder has them), else the
    largest training label + 1 (which reads the whole training set once)."""
    if num_classes is not None:
        if isinstance(num_classes, bool) or not isinstance(num_classes, int) or num_classes < 1:
            raise TietaError(f"num_classes must be a positive integer, got {num_classes!r}")
        return num_classes
    classes = getattr(train, "classes", None)
    if classes is not None and len(classes) > 0:
        return len(classes)
    labels = [_label(train[index], "train", index) for index in range(_length(train, "train"))]
    return max(labels) + 1


def _length(dataset: Dataset, split: str) -> int:
    try:
        length = len(dataset)
    except TypeError:
        raise TietaError(f"the {split} dataset has no length: give a map-style torch Dataset "
                         "(with __len__ and __getitem__)") from None
    if length == 0:
        raise TietaError(f"the {split} dataset has no images")
    return length


def _label(item: Any, split: str, index: int) -> int:
    if not isinstance(item, (tuple, list)) or len(item) != 2:
        raise TietaError(f"item {index} of the {split} dataset is not an (image, label) pair")
    label = item[1]
    if isinstance(label, torch.Tensor) and label.numel() == 1 and not label.is_floating_point():
        label = int(label)
    if isinstance(label, (bool, np.bool_)) or not isinstance(label, (int, np.integer)):
        raise TietaError(f"item {index} of the {split} dataset has the label {label!r}, not a class number")
    return int(label)


def to_pil(image: Any, split: str, index: int) -> Image.Image:
    """A given image as an upright RGB PIL image (its tensor pixels read as uint8 or 0-1 floats)."""
    if isinstance(image, Image.Image):
        return _to_rgb(_upright(image), f"item {index} of the {split} dataset")
    if not isinstance(image, torch.Tensor) or image.dim() != 3 or image.shape[0] not in (1, 3) \
            or image.shape[1] == 0 or image.shape[2] == 0:
        kind = f"a tensor of shape {tuple(image.shape)}" if isinstance(image, torch.Tensor) else type(image).__name__
        raise TietaError(f"item {index} of the {split} dataset has {kind} for its image: give a PIL image or a "
                         "(3, H, W) tensor")
    if image.is_floating_point():
        if not bool(torch.isfinite(image).all()) or image.min() < 0 or image.max() > 1:
            raise TietaError(f"item {index} of the {split} dataset has float pixels outside [0, 1]: give images "
                             "before normalisation (the run normalises them)")
        image = (image * 255).round()
    elif image.dtype != torch.uint8:
        raise TietaError(f"item {index} of the {split} dataset has {image.dtype} pixels: give uint8 or 0-1 floats")
    array = image.to(torch.uint8).expand(3, -1, -1).permute(1, 2, 0).contiguous().numpy()
    return Image.fromarray(array)


class GivenImages(Dataset):
    """A given torch Dataset as (uint8 image (3, S, S), label) pairs: decoded once and kept, or, with
    ``augment``, read and augmented anew each time.

    Args:
        dataset: yields (PIL image or (3, H, W) tensor, int label).
        split: "train" or "test", for messages and fingerprints.
        image_size: S, the model's input resolution.
        num_classes: labels must lie in [0, num_classes).
        interpolation: the resize filter (tieta.data.transforms.INTERPOLATIONS) of the run's normalisation.
    """

    def __init__(self, dataset: Dataset, split: str, image_size: int, num_classes: int,
                 augment: Optional[Augment] = None, description: str = "decoding images",
                 interpolation: str = "bicubic") -> None:
        self.dataset, self.split, self.image_size, self.augment = dataset, split, image_size, augment
        self.interpolation = interpolation
        length = _length(dataset, split)
        labels, images, names = [], [], []
        for index in tqdm(range(length), desc=description, leave=False, disable=None):
            item = dataset[index]
            label = _label(item, split, index)
            if not 0 <= label < num_classes:
                raise TietaError(f"item {index} of the {split} dataset has the label {label}, out of range for a "
                                 f"model with {num_classes} classes")
            labels.append(label)
            image = self._resized(item[0], index)
            names.append(GivenImage(split, index, hashlib.sha256(image.numpy().tobytes()).hexdigest()[:16]))
            if augment is None:
                images.append(image)
        self.labels = torch.tensor(labels)
        self.images = torch.stack(images) if augment is None else None
        self.items: list[tuple[Any, int]] = list(zip(names, labels))

    def _resized(self, image: Any, index: int) -> torch.Tensor:
        pil = to_pil(image, self.split, index).resize((self.image_size, self.image_size),
                                                      INTERPOLATIONS[self.interpolation])
        return torch.from_numpy(np.asarray(pil, dtype=np.uint8).copy()).permute(2, 0, 1)

    def __len__(self) -> int:
        return len(self.labels)

    def __getitem__(self, index: int) -> tuple[torch.Tensor, int]:
        if self.images is not None:
            return self.images[index], int(self.labels[index])
        return self.augment(to_pil(self.dataset[index][0], self.split, index)), int(self.labels[index])


def given_task(train: GivenImages, test: GivenImages, num_classes: int) -> Task:
    """A Task over given datasets: what fit records and fingerprints ("train" and "test" splits)."""
    names = getattr(train.dataset, "classes", None)  # torchvision's ImageFolder has them
    if not (isinstance(names, (list, tuple)) and len(names) == num_classes and all(isinstance(n, str) for n in names)):
        names = None
    return Task(Path.cwd(), "torch", num_classes, list(names) if names else None,
                {"train": train.items, "test": test.items}, source=GIVEN)
