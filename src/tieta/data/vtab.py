"""Image classification tasks on disk: VTAB-1k task folders and class-per-folder ImageFolders.

VTAB-1k layout (the public release the NOAH / VPT / PYRA / DyT code reads)::

    <task>/images/<split>/<idx>.jpg
    <task>/train800.txt  val200.txt  train800val200.txt  test.txt   # lines: "images/... <label>"

ImageFolder layout::

    <task>/train/<class name>/*.jpg   <task>/test/<class name>/*.jpg   (or val/ for test)
"""

from __future__ import annotations

import functools
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Optional

import torch
from torch.utils.data import Dataset
from tqdm.auto import tqdm

from tieta.data.transforms import load_resized
from tieta.errors import TietaError

VTAB_SPLITS = {
    "train": "train800val200.txt",
    "train800val200": "train800val200.txt",
    "train800": "train800.txt",
    "val200": "val200.txt",
    "val": "val200.txt",
    "test": "test.txt",
}
# folder names the reference scripts use for the same task
TASK_ALIASES = {
    "cifar": "cifar100",
    "cifar100": "cifar",
    "oxford_iiit_pet": "oxford_pet",
    "oxford_pet": "oxford_iiit_pet",
}
FOLDER_SPLITS = {"train": ("train",), "test": ("test", "val"), "val": ("val",)}
IMAGE_SUFFIXES = {".jpg", ".jpeg", ".png", ".bmp", ".gif", ".tif", ".tiff", ".webp"}


@dataclass
class Task:
    """A classification task folder: its layout, location and number of classes."""

    root: Path
    layout: str  # "vtab" or "folder"
    num_classes: int
    class_names: Optional[list[str]] = None

    def split(self, name: str) -> list[tuple[Path, int]]:
        """The (image path, label) pairs of a split ("train", "test", "train800", "val200")."""
        if self.layout == "vtab":
            return _read_list(self.root, _vtab_list_file(self.root, name))
        return _read_folder_split(self.root, name, self.class_names)


def open_task(path: str | Path) -> Task:
    """Recognise the task folder at ``path`` (accepting the reference scripts' folder aliases).

    Raises:
        TietaError: the folder is missing or has neither layout.
    """
    root = Path(path)
    if not root.is_dir() and root.name in TASK_ALIASES and (root.parent / TASK_ALIASES[root.name]).is_dir():
        root = root.parent / TASK_ALIASES[root.name]
    if not root.is_dir():
        raise TietaError(f"data folder {path} does not exist")
    root = root.resolve()  # run configs record it, and must still find it from another folder
    if (root / VTAB_SPLITS["train"]).is_file() or (root / VTAB_SPLITS["train800"]).is_file():
        labels = [label for file in sorted(set(VTAB_SPLITS.values())) if (root / file).is_file()
                  for _, label in _read_list(root, root / file)]
        if not labels:
            raise TietaError(f"the list files in {root} name no images")
        return Task(root, "vtab", max(labels) + 1)
    if (root / "train").is_dir():
        classes = sorted(p.name for p in (root / "train").iterdir() if p.is_dir())
        if not classes:
            raise TietaError(f"{root / 'train'} has no class folders")
        return Task(root, "folder", len(classes), classes)
    raise TietaError(
        f"{root} is neither a VTAB-1k task folder (train800val200.txt, test.txt, images/) "
        "nor an image folder with train/<class>/ subfolders"
    )


def _vtab_list_file(root: Path, split: str) -> Path:
    if split not in VTAB_SPLITS:
        raise TietaError(f"split must be one of {', '.join(VTAB_SPLITS)}, got {split!r}")
    file = root / VTAB_SPLITS[split]
    if not file.is_file():
        raise TietaError(f"{root} has no {file.name} for the {split!r} split")
    return file


def _read_list(root: Path, file: Path) -> list[tuple[Path, int]]:
    items = []
    for number, line in enumerate(file.read_text().splitlines(), start=1):
        if not line.strip():
            continue
        parts = line.split()
        if len(parts) != 2 or not parts[1].lstrip("-").isdigit():
            raise TietaError(f"{file}:{number}: expected '<image path> <integer label>', got {line.strip()!r}")
        label = int(parts[1])
        if label < 0:
            raise TietaError(f"{file}:{number}: label {label} is negative")
        items.append((root / parts[0], label))
    return items


def _read_folder_split(root: Path, split: str, classes: list[str]) -> list[tuple[Path, int]]:
    if split not in FOLDER_SPLITS:
        raise TietaError(f"an image folder has the splits {', '.join(FOLDER_SPLITS)}, not {split!r}")
    folder = next((root / name for name in FOLDER_SPLITS[split] if (root / name).is_dir()), None)
    if folder is None:
        raise TietaError(f"{root} has no {' or '.join(FOLDER_SPLITS[split])} folder for the {split!r} split")
    items = []
    for class_dir in sorted(p for p in folder.iterdir() if p.is_dir()):
        if class_dir.name not in classes:
            raise TietaError(f"class folder {class_dir} is not among the training classes")
        label = classes.index(class_dir.name)
        items += [(p, label) for p in sorted(class_dir.iterdir()) if p.suffix.lower() in IMAGE_SUFFIXES]
    return items


@functools.lru_cache(maxsize=2)
def _decode_all(paths: tuple[Path, ...], image_size: int, description: str) -> torch.Tensor:
    """All images of a split, resized, as one (n, 3, S, S) uint8 tensor; the last two splits decoded
    stay in memory, so runs one after another in one process (the demo) decode them once.
    (Images are read-only here: nothing writes into the returned tensor.)"""
    images = torch.empty(len(paths), 3, image_size, image_size, dtype=torch.uint8)
    with ThreadPoolExecutor(max_workers=4) as pool:
        decoded = pool.map(lambda path: load_resized(path, image_size), paths)
        for index, image in enumerate(tqdm(decoded, total=len(paths), desc=description, leave=False, disable=None)):
            images[index] = image
    return images


class ImageDataset(Dataset):
    """(uint8 image (3, S, S), label) pairs, decoded once and kept in memory when ``cache`` is set.

    Args:
        items: (path, label) pairs.
        image_size: S, the model's input resolution.
        num_classes: labels must lie in [0, num_classes).
        cache: decode everything up front (threads, progress bar) and keep it: the transform is
            deterministic, so every later epoch reads memory (3 * S * S bytes per image).
    """

    def __init__(self, items: list[tuple[Path, int]], image_size: int, num_classes: int, cache: bool = True,
                 description: str = "decoding images") -> None:
        for path, label in items:
            if label >= num_classes:
                raise TietaError(f"label {label} of {path} is out of range for a model with {num_classes} classes")
            if not path.is_file():
                raise TietaError(f"image {path} does not exist")
        if not items:
            raise TietaError("the split has no images")
        self.items = items
        self.image_size = image_size
        self.labels = torch.tensor([label for _, label in items])
        self.images: Optional[torch.Tensor] = None
        if cache:
            self.images = _decode_all(tuple(path for path, _ in items), image_size, description)

    def __len__(self) -> int:
        return len(self.items)

    def __getitem__(self, index: int) -> tuple[torch.Tensor, int]:
        if self.images is not None:
            return self.images[index], int(self.labels[index])
        return load_resized(self.items[index][0], self.image_size), int(self.labels[index])
