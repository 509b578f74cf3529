"""The literature's preprocessing: a straight bicubic resize, then mean/std normalisation.

There is no augmentation in the VTAB-1k recipes, so the resized image is the same every epoch: it is
kept as uint8 (what the resize produces) and normalised per batch, which is exactly
``ToTensor()`` followed by ``Normalize(mean, std)``.
"""

from __future__ import annotations

import struct
import threading
import warnings
import zlib
from pathlib import Path

import numpy as np
import torch
from PIL import ExifTags, Image, ImageOps, UnidentifiedImageError

from tieta.errors import TietaError

NORMALIZATIONS = {
    "imagenet": ((0.485, 0.456, 0.406), (0.229, 0.224, 0.225)),
    "inception": ((0.5, 0.5, 0.5), (0.5, 0.5, 0.5)),  # DyT's choice
    "half": ((0.5, 0.5, 0.5), (0.5, 0.5, 0.5)),  # timm's published ViT-B/16 (augreg) weights
    "clip": ((0.48145466, 0.4578275, 0.40821073), (0.26862954, 0.26130258, 0.27577711)),  # OpenAI's: CLIP, EVA-02
    "openai": ((0.48145466, 0.4578275, 0.40821073), (0.26862954, 0.26130258, 0.27577711)),
}
# the resize filters a normalisation can name (timm's pretrained_cfg names), as PIL's
INTERPOLATIONS = {"bicubic": Image.Resampling.BICUBIC, "bilinear": Image.Resampling.BILINEAR,
                  "nearest": Image.Resampling.NEAREST, "lanczos": Image.Resampling.LANCZOS,
                  "box": Image.Resampling.BOX, "hamming": Image.Resampling.HAMMING}

# Largest image decoded, as width * height, checked on the header before any pixel is read: far above
# any benchmark image, far below what would exhaust memory (PIL's own bomb check starts at ~89 Mpx).
MAX_IMAGE_PIXELS = 64 * 2**20

# PIL modes whose own convert("RGB") means what the pixels mean (colour spaces, 1-bit, palettes, 8-bit grey)
_CONVERTIBLE = {"RGB", "L", "1", "P", "CMYK", "YCbCr", "LAB", "HSV", "RGBX"}
_WITH_ALPHA = {"RGBA", "LA", "PA", "RGBa"}
_GREY16 = {"I;16", "I;16L", "I;16B", "I;16N"}
# What PIL raises on corrupt or truncated files, besides OSError (which covers UnidentifiedImageError)
_DECODE_ERRORS = (OSError, ValueError, SyntaxError, EOFError, IndexError, TypeError, struct.error, zlib.error)
# Image.open warns (DecompressionBombWarning) about large headers; catching a warning swaps the
# process-wide filters, so the threads decoding a split take turns for the header read (not the decode).
_OPEN_LOCK = threading.Lock()


def load_resized(path: Path, size: int, interpolation: str = "bicubic") -> torch.Tensor:
    """Read an image as RGB and resize it straight to size x size (bicubic, PIL's antialiasing; or
    another of INTERPOLATIONS, where the model's preprocessing names it).

    Decoding is faithful or refused. RGB and 8-bit grey images without a transparency key decode
    exactly as ``image.convert("RGB")`` always did; 1-bit, palette, CMYK, YCbCr, LAB and HSV images go
    through PIL's own conversion. Images with alpha (RGBA, LA, PA, or a palette/grey/RGB transparency
    key) are composited over black. 16-bit grey (and 32-bit integer "I" images whose values fit in
    0-65535, read as 16-bit) become 8-bit by round(value / 257), which inverts the usual x * 257
    widening exactly; PIL reads 16-bit colour PNGs by their high byte. 32-bit float images (no standard
    range) and other modes are refused, as are images over MAX_IMAGE_PIXELS (checked on the header)
    and corrupt or truncated files. An EXIF orientation tag is applied first (ImageOps.exif_transpose).

    Returns:
        (3, size, size) uint8 tensor.
    Raises:
        TietaError: the file is missing, corrupt, truncated, too large or of a refused pixel type.
    """
    rgb = load_rgb(path)
    array = np.asarray(rgb.resize((size, size), INTERPOLATIONS[interpolation]), dtype=np.uint8)
    return torch.from_numpy(array.copy()).permute(2, 0, 1)


def load_rgb(path: Path) -> Image.Image:
    """The image at ``path`` as an upright 8-bit RGB PIL image, at its own size: decoded as
    :func:`load_resized` says, and turned as its EXIF orientation tag says (a photo taken with the
    phone sideways is stored sideways, with a tag saying how to turn it).

    ``path`` may also be an object with an ``open_binary()`` method returning a binary file (an image
    stored inside a dataset); its ``str()`` names it in messages.

    Raises:
        TietaError: as :func:`load_resized`.
    """
    try:
        with _open_checked(path) as image:
            return _to_rgb(_upright(image), path)  # reads the pixels
    except UnidentifiedImageError as error:
        raise TietaError(f"cannot read image {path}: it is not an image file PIL knows, "
                         "or it is corrupt") from error
    except _DECODE_ERRORS as error:
        system = isinstance(error, OSError) and error.strerror  # missing, a folder, no permission
        reason = error.strerror if system else f"it is corrupt or truncated ({error})"
        raise TietaError(f"cannot read image {path}: {reason}") from error


def _upright(image: Image.Image) -> Image.Image:
    """``image`` turned as its EXIF orientation tag says (ImageOps.exif_transpose), or ``image``
    itself where it has no such tag, the tag says "as stored", or its EXIF block cannot be read."""
    try:
        orientation = image.getexif().get(ExifTags.Base.Orientation, 1)
    except _DECODE_ERRORS:  # a damaged EXIF block: the pixels may still be fine, shown as stored
        return image
    if orientation not in (2, 3, 4, 5, 6, 7, 8):
        return image
    return ImageOps.exif_transpose(image)


def _open_checked(path: Path) -> Image.Image:
    """Image.open (header only) refusing images over MAX_IMAGE_PIXELS, without PIL's warning printed."""
    with _OPEN_LOCK, warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        try:
            opener = getattr(path, "open_binary", None)  # an image stored in a dataset, not a file
            image = Image.open(opener() if opener is not None else path)
        except Image.DecompressionBombError as error:  # over twice PIL's limit, so over ours
            limit = min(MAX_IMAGE_PIXELS, 2 * (Image.MAX_IMAGE_PIXELS or MAX_IMAGE_PIXELS))
            raise TietaError(f"image {path} has more than {limit:,} pixels, too many to decode") from error
    width, height = image.size
    if width * height > MAX_IMAGE_PIXELS or width * height == 0:
        image.close()
        raise TietaError(f"image {path} is {width} x {height} pixels, outside the limit of 1 to "
                         f"{MAX_IMAGE_PIXELS:,} pixels (64 megapixels)")
    for warning in caught:  # not ours to swallow (a bomb warning under our limit means PIL's was lowered)
        warnings.warn_explicit(warning.message, warning.category, warning.filename, warning.lineno)
    return image


def _to_rgb(image: Image.Image, path: Path) -> Image.Image:
    """The decoded pixels as an 8-bit RGB image, or TietaError where no faithful reading exists."""
    mode = image.mode
    if mode in _GREY16 or mode == "I":
        values = np.asarray(image)  # (H, W) uint16 (any byte order) or int32
        if mode == "I" and (values.min() < 0 or values.max() > 65535):
            raise TietaError(f"image {path} has 32-bit integer pixels outside 0-65535 (from {values.min()} to "
                             f"{values.max()}), which have no faithful 8-bit reading")
        grey = ((values.astype(np.uint32) + 128) // 257).astype(np.uint8)  # round(value / 257)
        rgb = Image.fromarray(grey).convert("RGB")  # (H, W) uint8: mode "L"
        if "transparency" in image.info:  # a 16-bit tRNS key: that value is transparent
            opaque = (values != image.info["transparency"]).astype(np.uint8) * 255
            rgb = _over_black(rgb, Image.fromarray(opaque))
        return rgb
    if mode in _WITH_ALPHA or (mode in _CONVERTIBLE and image.has_transparency_data):
        rgba = image.convert("RGBA")
        return _over_black(rgba.convert("RGB"), rgba.getchannel("A"))
    if mode in _CONVERTIBLE:
        return image.convert("RGB")
    if mode == "F":
        raise TietaError(f"image {path} has 32-bit float pixels, which have no standard range: "
                         "save it as an 8- or 16-bit image")
    raise TietaError(f"image {path} has the pixel type {mode!r}, which tieta does not decode: "
                     "save it as an 8-bit RGB or grey image")


def _over_black(rgb: Image.Image, alpha: Image.Image) -> Image.Image:
    """``rgb * alpha / 255``: the image composited over a black background."""
    canvas = Image.new("RGB", rgb.size)
    canvas.paste(rgb, mask=alpha)
    return canvas


class Normalize(torch.nn.Module):
    """uint8 images to normalised floats: ``(x / 255 - mean) / std``.

    Args:
        name: "imagenet" (0.485.../0.229...), "inception" or "half" (0.5/0.5), "clip" or "openai"
            (OpenAI's 0.481.../0.268...), or the numbers themselves as {"mean": [r, g, b], "std":
            [r, g, b]} on the 0-1 scale (what ``tieta.data.normalization`` resolves "model" to).
    """

    def __init__(self, name: str | dict = "imagenet") -> None:
        super().__init__()
        mean, std = normalization_numbers(name)
        self.register_buffer("mean", torch.tensor(mean).view(1, 3, 1, 1) * 255, persistent=False)
        self.register_buffer("std", torch.tensor(std).view(1, 3, 1, 1) * 255, persistent=False)

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        """Args: images: (B, 3, H, W) uint8. Returns: (B, 3, H, W) float32."""
        return (images.float() - self.mean) / self.std


def normalization_numbers(setting: str | dict) -> tuple[tuple[float, ...], tuple[float, ...]]:
    """(mean, std) of a named normalisation or of explicit numbers ({"mean": ..., "std": ...}, checked
    where they were read: tieta.data.normalization).

    Raises:
        TietaError: an unknown name, or numbers that are not three means and three deviations.
    """
    if isinstance(setting, dict):
        try:
            mean, std = tuple(map(float, setting["mean"])), tuple(map(float, setting["std"]))
        except (KeyError, TypeError, ValueError):
            mean = std = ()
        if len(mean) != 3 or len(std) != 3:
            raise TietaError("normalization as numbers is {mean: [r, g, b], std: [r, g, b]}")
        return mean, std
    if setting not in NORMALIZATIONS:
        raise TietaError(f"normalization must be one of {', '.join(NORMALIZATIONS)}, or model, or "
                         f"{{mean: [r, g, b], std: [r, g, b]}}, got {setting!r}")
    return NORMALIZATIONS[setting]
