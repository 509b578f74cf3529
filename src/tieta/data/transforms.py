"""The literature's preprocessing: a straight bicubic resize, then mean/std normalisation.

There is no augmentation in the VTAB-1k recipes, so the resized image is the same every epoch: it is
kept as uint8 (what the resize produces) and normalised per batch, which is exactly
``ToTensor()`` followed by ``Normalize(mean, std)``.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch
from PIL import Image

from tieta.errors import TietaError

NORMALIZATIONS = {
    "imagenet": ((0.485, 0.456, 0.406), (0.229, 0.224, 0.225)),
    "inception": ((0.5, 0.5, 0.5), (0.5, 0.5, 0.5)),  # DyT's choice
}


def load_resized(path: Path, size: int) -> torch.Tensor:
    """Read an image as RGB and resize it straight to size x size (bicubic, PIL's antialiasing).

    Returns:
        (3, size, size) uint8 tensor.
    """
    try:
        with Image.open(path) as image:
            image = image.convert("RGB").resize((size, size), Image.Resampling.BICUBIC)
            array = np.asarray(image, dtype=np.uint8)
    except (OSError, ValueError) as error:
        raise TietaError(f"cannot read image {path}: {error}") from error
    return torch.from_numpy(array.copy()).permute(2, 0, 1)


class Normalize(torch.nn.Module):
    """uint8 images to normalised floats: ``(x / 255 - mean) / std``.

    Args:
        name: "imagenet" (0.485.../0.229...) or "inception" (0.5/0.5).
    """

    def __init__(self, name: str = "imagenet") -> None:
        super().__init__()
        if name not in NORMALIZATIONS:
            raise TietaError(f"normalization must be one of {', '.join(NORMALIZATIONS)}, got {name!r}")
        mean, std = NORMALIZATIONS[name]
        self.register_buffer("mean", torch.tensor(mean).view(1, 3, 1, 1) * 255, persistent=False)
        self.register_buffer("std", torch.tensor(std).view(1, 3, 1, 1) * 255, persistent=False)

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        """Args: images: (B, 3, H, W) uint8. Returns: (B, 3, H, W) float32."""
        return (images.float() - self.mean) / self.std
