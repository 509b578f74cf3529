"""Small segmentation tasks made from real images, for tests and benchmarks, their masks known by
construction: each picture is one photograph of a VTAB-1k task folder (e.g. vtab-mini's dtd10) as
the background, with a disc, a square and a triangle cut from other photographs pasted onto it.

The masks follow ADE20K's convention: 0 is "other" (a one-pixel outline around each pasted shape,
where the cut is blurred by JPEG and resizing), 1 the background, 2 the disc, 3 the square, 4 the
triangle; with ``reduce_zero_label`` (the default) these are the classes 0-3 and the outline is
ignored. Shapes overlap where they fall so; the later one is on top, in the picture and in the mask.
"""

from __future__ import annotations

import io
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw, ImageFilter

from tieta.data.vtab import open_task
from tieta.errors import TietaError
from tieta.files import folder_mode, write_file

LAYOUTS = ("ade20k", "lists")
SHAPES = ("disc", "square", "triangle")  # mask labels 2, 3, 4 (1: the background, 0: the outline)
CLASS_NAMES = ("background",) + SHAPES


def make_segmentation_task(root: str | Path, source: str | Path, train_images: int = 6, test_images: int = 3,
                           width: int = 96, height: int = 64, layout: str = "ade20k", classes_file: bool = True,
                           seed: int = 0) -> Path:
    """Write a segmentation task to the new (or empty) folder ``root`` and return it.

    Picture k takes the source's training images 4k (background) and 4k+1 to 4k+3 (the shapes' fill),
    test pictures continuing after the training ones; the shapes' places and sizes are drawn from
    ``seed``.

    Args:
        source: a VTAB-1k task folder with at least 4 x (train_images + test_images) training images.
        width, height: each picture's size in pixels (at least 16 each).
        layout: "ade20k" (images/training/*.jpg, annotations/training/*.png, validation/ for test) or
            "lists" (images/*.jpg, masks/*.png, train.txt and val.txt).
        classes_file: write classes.txt (background, disc, square, triangle).
    Raises:
        TietaError: ``root`` exists and is not an empty folder, the source has too few images, or the
            settings are out of range.
    """
    root = Path(root)
    if layout not in LAYOUTS:
        raise TietaError(f"layout must be one of {', '.join(LAYOUTS)}, got {layout!r}")
    if width < 16 or height < 16 or train_images < 1 or test_images < 1:
        raise TietaError("a segmentation task needs at least 1 training and 1 test picture of at least 16 x 16")
    if root.exists() and (not root.is_dir() or any(root.iterdir())):
        raise TietaError(f"{root} already exists and is not an empty folder: a segmentation task is written to a "
                         "new one")
    photos = [path for path, _ in open_task(source).split("train")]
    needed = 4 * (train_images + test_images)
    if len(photos) < needed:
        raise TietaError(f"the training split of {source} has {len(photos)} images, fewer than the {needed} needed")
    rng = np.random.default_rng(seed)
    lines: dict[str, list[str]] = {"train": [], "val": []}
    for number in range(train_images + test_images):
        split = "train" if number < train_images else "val"
        picture, mask = _picture(photos[4 * number:4 * number + 4], width, height, rng)
        name = f"{split}_{number:04d}"
        if layout == "ade20k":
            folder = "training" if split == "train" else "validation"
            image_name, mask_name = f"images/{folder}/{name}.jpg", f"annotations/{folder}/{name}.png"
        else:
            image_name, mask_name = f"images/{name}.jpg", f"masks/{name}.png"
        for written in (image_name, mask_name):
            (root / written).parent.mkdir(parents=True, exist_ok=True, mode=folder_mode())
        write_file(root / image_name, _encoded(picture, "JPEG"))
        write_file(root / mask_name, _encoded(mask, "PNG"))
        lines[split].append(f"{image_name} {mask_name}")
    if layout == "lists":
        for split, listed in lines.items():
            write_file(root / f"{split}.txt", "\n".join(listed) + "\n")
    if classes_file:
        write_file(root / "classes.txt", "\n".join(CLASS_NAMES) + "\n")
    return root


def _encoded(image: Image.Image, kind: str) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, format=kind, **({"quality": 95} if kind == "JPEG" else {}))
    return buffer.getvalue()


def _filled(path: Path, width: int, height: int) -> Image.Image:
    """The photograph at ``path`` scaled and centre-cropped to cover width x height."""
    with Image.open(path) as opened:
        image = opened.convert("RGB")
    scale = max(width / image.width, height / image.height)
    size = (max(round(image.width * scale), width), max(round(image.height * scale), height))
    image = image.resize(size, Image.Resampling.BICUBIC)
    left, top = (image.width - width) // 2, (image.height - height) // 2
    return image.crop((left, top, left + width, top + height))


def _picture(photos: list[Path], width: int, height: int, rng: np.random.Generator
             ) -> tuple[Image.Image, Image.Image]:
    """(picture, mask): the first photo as background, a shape of each of the others pasted on it."""
    picture = _filled(photos[0], width, height)
    labels = Image.new("L", (width, height), 1)
    for label, (shape, photo) in enumerate(zip(SHAPES, photos[1:]), start=2):
        side = int(rng.integers(min(width, height) // 4, min(width, height) // 2 + 1))
        left, top = int(rng.integers(0, width - side + 1)), int(rng.integers(0, height - side + 1))
        box = (left, top, left + side - 1, top + side - 1)
        cut = Image.new("L", (width, height), 0)
        draw = ImageDraw.Draw(cut)
        if shape == "disc":
            draw.ellipse(box, fill=255)
        elif shape == "square":
            draw.rectangle(box, fill=255)
        else:
            draw.polygon([(left + side // 2, top), (left, top + side - 1), (left + side - 1, top + side - 1)],
                         fill=255)
        picture.paste(_filled(photo, width, height), mask=cut)
        outline = cut.filter(ImageFilter.MaxFilter(3))  # the shape grown by a pixel
        labels.paste(0, mask=outline)
        labels.paste(label, mask=cut)
    return picture, labels
