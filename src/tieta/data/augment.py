"""Optional training augmentation (``data.augment``): ``none`` (the VTAB-1k papers' recipe: the
resized image, the same every epoch) or ``timm``: timm's training transform,
``create_transform(is_training=True, auto_augment="rand-m9-mstd0.5-inc1")`` at the run's image size,
with timm's defaults for the rest (a random resized crop of scale 0.08-1, a horizontal flip half of
the time, bilinear interpolation; no colour jitter, which timm leaves out with RandAugment).

timm's transform ends in ToTensor and Normalize; here it stops before them and gives uint8 images, which
the training loop normalises per batch as it does every image (Normalize), so the run's normalisation is
used either way. RandAugment fills what it shifts in with the run's mean colour.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Callable, Optional

import numpy as np
import torch
from PIL import Image
from timm.data import create_transform

from tieta.data.transforms import load_rgb
from tieta.data.vtab import ImageDataset
from tieta.errors import TietaError

RAND_AUGMENT = "rand-m9-mstd0.5-inc1"  # timm's RandAugment preset (DeiT's): 2 ops of magnitude 9 +- 0.5

Augment = Callable[[Image.Image], torch.Tensor]


def training_transform(name: str, image_size: int, mean: tuple[float, ...], std: tuple[float, ...]
                       ) -> Optional[Augment]:
    """The augmentation ``name`` ("none": None; "timm") as a function from an RGB PIL image to a
    (3, image_size, image_size) uint8 tensor, drawing from torch's and Python's random generators.

    Args:
        mean, std: the run's normalisation (0-1 values per channel); timm fills with the mean colour.
    """
    if name == "none":
        return None
    if name != "timm":
        raise TietaError(f"data.augment must be none or timm, got {name!r}")
    crop_and_flip, rand_augment, _to_tensor_and_normalize = create_transform(
        image_size, is_training=True, auto_augment=RAND_AUGMENT, mean=tuple(mean), std=tuple(std), separate=True)

    def augment(image: Image.Image) -> torch.Tensor:
        array = np.asarray(rand_augment(crop_and_flip(image)), dtype=np.uint8)
        return torch.from_numpy(array.copy()).permute(2, 0, 1)

    return augment


def normalization_of(normalize: torch.nn.Module) -> tuple[tuple[float, ...], tuple[float, ...]]:
    """(mean, std) as 0-1 values from a Normalize module (tieta.data.transforms), whatever chose them."""
    return (tuple((normalize.mean.flatten() / 255).tolist()), tuple((normalize.std.flatten() / 255).tolist()))


class AugmentedImages(ImageDataset):
    """(uint8 image (3, S, S), label) pairs, each image decoded and augmented anew whenever it is read.

    Args:
        items: (path, label) pairs, checked as ImageDataset checks them.
        augment: from :func:`training_transform`.
    """

    def __init__(self, items: list[tuple[Any, int]], image_size: int, num_classes: int, augment: Augment) -> None:
        super().__init__(items, image_size, num_classes, cache=False)
        self.augment = augment

    def __getitem__(self, index: int) -> tuple[torch.Tensor, int]:
        path: Path = self.items[index][0]
        return self.augment(load_rgb(path)), int(self.labels[index])
