"""Image classification tasks on disk: VTAB-1k task folders and class-per-folder ImageFolders.

VTAB-1k layout (the public release the NOAH / VPT / PYRA / DyT code reads)::

    <task>/images/<split>/<idx>.jpg
    <task>/train800.txt  val200.txt  train800val200.txt  test.txt   # lines: "images/... <label>"

ImageFolder layout::

    <task>/train/<class name>/*.jpg   <task>/test/<class name>/*.jpg   (or val/ for test)

The other sources (a class-per-folder tree without a split, CSV/TSV list files, a ``datasets``
DatasetDict on disk or on the hub) are read by tieta.data.sources and tieta.data.hub into the same
Task, with their splits listed up front.
"""

from __future__ import annotations

import functools
import hashlib
import os
import re
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Optional

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
    layout: str  # "vtab" or "folder"; "classes", "lists" or "datasets" (tieta.data.sources, tieta.data.hub)
    num_classes: int
    class_names: Optional[list[str]] = None
    # the other sources: their (image, label) pairs per split ("train", "test", "val"), read when opened
    items: Optional[dict[str, list[tuple[Any, int]]]] = None
    identity: str = ""  # what else the fingerprint covers (a dataset's own fingerprint, the held-out fraction)
    source: Optional[str] = None  # how data.path names it where that is not root (a list file, "hf:NAME")

    @property
    def data_path(self) -> str:
        """What data.path must say to open this task again."""
        return self.source or str(self.root)

    def split(self, name: str) -> list[tuple[Path, int]]:
        """The (image path, label) pairs of a split ("train", "test", "train800", "val200").

        Raises:
            TietaError: the split is unknown, missing, malformed or has no images.
        """
        if self.items is not None:
            items, where = _listed_split(self, name), self.data_path
        elif self.layout == "vtab":
            file = _vtab_list_file(self.root, name)
            items = _read_list(self.root, file)
            where = file
        else:
            items = _read_folder_split(self.root, name, self.class_names)
            where = self.root
        if not items:
            raise TietaError(f"the {name!r} split of {_shown(where)} has no images")
        return items


def fingerprint(task: Task, splits: tuple[str, ...]) -> str:
    """A short fingerprint of what a run reads from ``task``: per split, every image's path (relative
    to the task folder) and label, and the number of classes; it changes when a list file, an image
    folder's contents or the classes change (not when an image file is edited in place)."""
    digest = hashlib.sha256(f"{task.layout}|{task.num_classes}|".encode())
    if task.identity:  # the other sources only, so that the folders' fingerprints stay as they were
        digest.update(f"{task.identity}|".encode())
    count = 0
    for name in splits:
        items = task.split(name)
        count += len(items)
        digest.update(f"{name}|{len(items)}|".encode())
        for path, label in items:
            # a file by its path in the task folder; an image stored in a dataset by its split and row
            shown = os.fsencode(os.path.relpath(path, task.root)) if isinstance(path, Path) else path.key.encode()
            digest.update(shown + f"|{label}|".encode())
    return f"{task.num_classes} classes, {count} images, sha256 {digest.hexdigest()[:16]}"


def open_task(path: str | Path, holdout: Optional[float] = None) -> Task:
    """Recognise the task folder at ``path`` (accepting the reference scripts' folder aliases), or
    one of the other sources: ``hf:NAME`` (a hub dataset), a folder saved by ``datasets``
    (dataset_dict.json), a folder with train.csv and test.csv (or .tsv), a single .csv/.tsv list
    file, or a class-per-folder tree ``<class>/*.jpg``. The last two have no test split: ``holdout``
    (a fraction, e.g. 0.2) takes a seeded, stratified test split out of them (tieta.data.sources).

    A VTAB-1k task has the classes 0 to the largest label of its list files, and each of them must
    have an image in some list: a stray label (a 99 among ten classes) is refused, not turned into a
    100-class head. Where the training lists (train800val200.txt, else train800.txt + val200.txt)
    have every class up to their largest label, the other lists may only use those classes. Where
    they skip classes (the public sun397 has 325 of its 397 classes in train800val200.txt), the test
    list may have classes without a training image, as in the reference code.

    Raises:
        TietaError: the folder is missing, has neither layout, or its lists or class folders are
            malformed (the message names the file and line).
    """
    from tieta.data import hub, sources  # they build on this module
    if str(path).startswith(hub.HUB_PREFIX):
        return hub.open_hub(str(path)[len(hub.HUB_PREFIX):], holdout)
    root = Path(path)
    if root.suffix.lower() in sources.LIST_SEPARATORS and root.is_file():
        return sources.open_list_file(root.resolve(), holdout)
    if not root.is_dir() and root.name in TASK_ALIASES and (root.parent / TASK_ALIASES[root.name]).is_dir():
        root = root.parent / TASK_ALIASES[root.name]
    if not root.is_dir():
        raise TietaError(f"data folder {_shown(path)} "
                         + ("is a file, not a folder or a .csv / .tsv list" if root.exists() else "does not exist"))
    root = root.resolve()  # run configs record it, and must still find it from another folder
    if (root / VTAB_SPLITS["train"]).exists() or (root / VTAB_SPLITS["train800"]).exists():
        lists = {name: _read_lines(root, root / name) for name in sorted(set(VTAB_SPLITS.values()))
                 if (root / name).exists()}
        if not any(lists.values()):
            raise TietaError(f"the list files in {_shown(root)} name no images")
        sources.refuse_holdout(root, holdout)
        return Task(root, "vtab", _check_labels(root, lists))
    if (root / hub.DATASET_DICT).is_file():  # before train/: save_to_disk writes the splits into folders
        return hub.open_saved(root, holdout)
    if (root / "train").is_dir():
        sources.refuse_holdout(root, holdout)
        classes = [p.name for p in _class_folders(root / "train")]
        if not classes:
            raise TietaError(f"{_shown(root / 'train')} has no class folders")
        for name in classes:
            if not any(p.suffix.lower() in IMAGE_SUFFIXES for p in _listdir(root / "train" / name)):
                raise TietaError(f"class folder {_shown(root / 'train' / name)} has no images "
                                 f"({', '.join(sorted(IMAGE_SUFFIXES))})")
        return Task(root, "folder", len(classes), classes)
    if sources.list_files(root):
        return sources.open_list_folder(root, holdout)
    if any(p.suffix.lower() in IMAGE_SUFFIXES for folder in _class_folders(root) for p in _listdir(folder)):
        return sources.open_class_tree(root, holdout)  # (a lone images/ of split folders is none)
    raise TietaError(
        f"{_shown(root)} is neither a VTAB-1k task folder (train800val200.txt, test.txt, images/), an image folder "
        "with train/<class>/ subfolders, a class-per-folder tree (<class>/*.jpg), a folder with train.csv and "
        "test.csv, nor a dataset saved by datasets (dataset_dict.json)"
    )


def _listed_split(task: Task, split: str) -> list[tuple[Any, int]]:
    """A split of a source whose splits were read when it was opened (the folder layout's names)."""
    if split not in FOLDER_SPLITS:
        raise TietaError(f"{_shown(task.data_path)} has the splits {', '.join(FOLDER_SPLITS)}, not {split!r}")
    found = next((task.items[name] for name in FOLDER_SPLITS[split] if name in task.items), None)
    if found is None:
        raise TietaError(f"{_shown(task.data_path)} has no {' or '.join(FOLDER_SPLITS[split])} split "
                         f"for the {split!r} split")
    return found


def _shown(path: str | Path) -> str:
    """A path for a one-line message: as it is, or quoted with escapes where a character of it would
    not print (a line break in a folder's name)."""
    text = str(path)
    return text if text.isprintable() else repr(text)


def _vtab_list_file(root: Path, split: str) -> Path:
    if split not in VTAB_SPLITS:
        raise TietaError(f"split must be one of {', '.join(VTAB_SPLITS)}, got {split!r}")
    file = root / VTAB_SPLITS[split]
    if not file.exists():
        raise TietaError(f"{_shown(root)} has no {file.name} for the {split!r} split")
    return file


def _read_list(root: Path, file: Path) -> list[tuple[Path, int]]:
    return [(path, label) for _, path, label in _read_lines(root, file)]


_LABEL = re.compile(r"-?[0-9]+")  # ASCII digits only: str.isdigit() also accepts "²", which int() refuses


def _read_lines(root: Path, file: Path) -> list[tuple[int, Path, int]]:
    """(line number, image path, label) of each non-blank line of a list file ("<path> <label>").

    Raises:
        TietaError: naming the file and line, for anything but a relative path inside ``root`` and a
            non-negative integer label, and for a file that cannot be read or is not UTF-8.
    """
    if not file.is_file():  # a folder, or a device that would never end
        raise TietaError(f"list file {_shown(file)} is not a regular file")
    try:
        data = file.read_bytes()
    except OSError as error:
        raise TietaError(f"cannot read list file {_shown(file)}: {error.strerror or error}") from error
    items = []
    for number, raw in enumerate(data.splitlines(), start=1):
        try:  # a BOM (from some Windows editors) would otherwise become part of the first path
            line = raw.decode("utf-8-sig" if number == 1 else "utf-8")
        except UnicodeDecodeError as error:
            raise TietaError(f"{_shown(file)}:{number}: not UTF-8 text (byte 0x{raw[error.start]:02x} at column "
                             f"{error.start + 1})") from error
        if not line.strip():
            continue
        parts = line.split()
        if len(parts) != 2 or not _LABEL.fullmatch(parts[1]) or len(parts[1]) > 18:
            shown = line.strip() if len(line.strip()) <= 80 else line.strip()[:77] + "..."
            raise TietaError(f"{_shown(file)}:{number}: expected '<image path> <integer label>', got {shown!r}")
        name, label = parts[0], int(parts[1])
        if label < 0:
            raise TietaError(f"{_shown(file)}:{number}: label {label} is negative")
        if not name.isprintable():
            raise TietaError(f"{_shown(file)}:{number}: image path {name!r} has an unprintable character")
        # Checked on the text, not with resolve(): a task's images/ is often a symlink to other storage.
        if os.path.isabs(name) or os.path.normpath(name).split(os.sep)[0] == os.pardir:
            raise TietaError(f"{_shown(file)}:{number}: image path {name} leaves the task folder")
        items.append((number, root / name, label))
    return items


def _check_labels(root: Path, lists: dict[str, list[tuple[int, Path, int]]]) -> int:
    """The number of classes of a VTAB task, from its list files' (line, path, label) triples.

    Raises:
        TietaError: a label is stray (see open_task), naming the file and line.
    """
    whole, parts = VTAB_SPLITS["train"], [VTAB_SPLITS["train800"], VTAB_SPLITS["val200"]]
    training = [whole] if whole in lists else parts
    training = [name for name in training if name in lists]
    first: dict[int, tuple[str, int]] = {}  # label -> where it first occurs, training lists first
    for name in training + [name for name in lists if name not in training]:
        for number, _, label in lists[name]:
            first.setdefault(label, (name, number))
    trained = sorted({label for name in training for _, _, label in lists[name]})
    if trained and trained[-1] == len(trained) - 1:  # the training lists have every class 0..n-1
        classes = f"classes 0-{trained[-1]}" if trained[-1] else "only class 0"
        span = f"{' and '.join(training)} {'has' if len(training) == 1 else 'have'} {classes}"
        for name in lists:
            for number, _, label in lists[name]:
                if label > trained[-1]:
                    raise TietaError(f"{_shown(root / name)}:{number}: label {label} is not a training class ({span})")
    labels = sorted(first)
    if labels[0] != 0:
        name, number = first[labels[0]]
        raise TietaError(f"no list file has label 0 (the smallest is {labels[0]}, in {_shown(root / name)}:{number}): "
                         "labels must number the classes from 0")
    gap = next((index for index, label in enumerate(labels) if label != index), None)
    if gap is not None:  # ids gap..labels[gap]-1 have no image anywhere: labels[gap] looks like a typo
        name, number = first[labels[gap]]
        missing = f"class {gap}" if labels[gap] == gap + 1 else f"classes {gap}-{labels[gap] - 1}"
        raise TietaError(f"{missing} {'has' if labels[gap] == gap + 1 else 'have'} no image in any list file: "
                         f"is label {labels[gap]} in {_shown(root / name)}:{number} a typo?")
    return len(labels)


def _read_folder_split(root: Path, split: str, classes: list[str]) -> list[tuple[Path, int]]:
    if split not in FOLDER_SPLITS:
        raise TietaError(f"an image folder has the splits {', '.join(FOLDER_SPLITS)}, not {split!r}")
    folder = next((root / name for name in FOLDER_SPLITS[split] if (root / name).is_dir()), None)
    if folder is None:
        raise TietaError(f"{_shown(root)} has no {' or '.join(FOLDER_SPLITS[split])} folder for the {split!r} split")
    items = []
    for class_dir in _class_folders(folder):
        if class_dir.name not in classes:
            raise TietaError(f"class folder {_shown(class_dir)} is not among the training classes")
        label = classes.index(class_dir.name)
        items += [(p, label) for p in _listdir(class_dir) if p.suffix.lower() in IMAGE_SUFFIXES]
    return items


def _listdir(folder: Path) -> list[Path]:
    """The sorted entries of a folder, or TietaError (not a traceback) where it cannot be listed."""
    try:
        return sorted(folder.iterdir())
    except OSError as error:
        raise TietaError(f"cannot list folder {_shown(folder)}: {error.strerror or error}") from error


def _class_folders(folder: Path) -> list[Path]:
    # hidden folders (.ipynb_checkpoints, .git) are never classes
    return [p for p in _listdir(folder) if p.is_dir() and not p.name.startswith(".")]


@functools.lru_cache(maxsize=2)
def _decode_all(paths: tuple[Path, ...], image_size: int, description: str,
                interpolation: str = "bicubic") -> torch.Tensor:
    """All images of a split, resized, as one (n, 3, S, S) uint8 tensor; the last two splits decoded
    stay in memory, so runs one after another in one process (the demo) decode them once.
    (Images are read-only here: nothing writes into the returned tensor.)"""
    images = torch.empty(len(paths), 3, image_size, image_size, dtype=torch.uint8)
    with ThreadPoolExecutor(max_workers=4) as pool:
        decoded = pool.map(lambda path: load_resized(path, image_size, interpolation), paths)
        try:
            for index, image in enumerate(tqdm(decoded, total=len(paths), desc=description, leave=False,
                                               disable=None)):
                images[index] = image
        except BaseException:  # a bad image: say so now, not after decoding the rest of the split
            pool.shutdown(wait=False, cancel_futures=True)
            raise
    return images


class ImageDataset(Dataset):
    """(uint8 image (3, S, S), label) pairs, decoded once and kept in memory when ``cache`` is set.

    Args:
        items: (path, label) pairs.
        image_size: S, the model's input resolution.
        num_classes: labels must lie in [0, num_classes).
        cache: decode everything up front (threads, progress bar) and keep it: the transform is
            deterministic, so every later epoch reads memory (3 * S * S bytes per image).
        interpolation: the resize filter (tieta.data.transforms.INTERPOLATIONS), as the model's
            normalisation names it.
    """

    def __init__(self, items: list[tuple[Any, int]], image_size: int, num_classes: int, cache: bool = True,
                 description: str = "decoding images", interpolation: str = "bicubic") -> None:
        for path, label in items:
            if not 0 <= label < num_classes:
                raise TietaError(f"label {label} of {_shown(path)} is out of range for a model with {num_classes} "
                                 "classes")
            if isinstance(path, Path) and not path.is_file():  # (an image stored in a dataset is no file)
                raise TietaError(f"image {_shown(path)} {'is not a file' if path.exists() else 'does not exist'}")
        if not items:
            raise TietaError("the split has no images")
        self.items = items
        self.image_size = image_size
        self.interpolation = interpolation
        self.labels = torch.tensor([label for _, label in items])
        self.images: Optional[torch.Tensor] = None
        if cache:
            self.images = _decode_all(tuple(path for path, _ in items), image_size, description, interpolation)

    def __len__(self) -> int:
        return len(self.items)

    def __getitem__(self, index: int) -> tuple[torch.Tensor, int]:
        if self.images is not None:
            return self.images[index], int(self.labels[index])
        return load_resized(self.items[index][0], self.image_size, self.interpolation), int(self.labels[index])
