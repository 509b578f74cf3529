"""A semantic segmentation task folder, its settings, and the (image, mask) pairs a model trains on.

Two layouts, as mmseg reads ADE20K and its custom datasets::

    <task>/images/training/*.jpg       <task>/annotations/training/*.png     (validation/ for test)
    <task>/train.txt  val.txt or test.txt   # lines: "<image path> <mask path>", paths inside the task

A mask is a single-channel PNG label map (mode L, or P read as its indices) of the image's size.
With ``reduce_zero_label`` (ADE20K's convention: 0 is "other") label 0 becomes the ignore index 255
and every other label drops by one, as mmseg's LoadAnnotations does. The classes are named by an
optional ``classes.txt`` (one name a line); without it they are 0 to the largest label of any mask,
after the reduction (every mask is then read once, when the task is opened).
"""

from __future__ import annotations

import hashlib
import os
import stat
from dataclasses import dataclass, field
from pathlib import Path
from typing import Optional

import numpy as np
import torch
from PIL import ExifTags
from torch.utils.data import Dataset

from tieta.data.transforms import _DECODE_ERRORS, _open_checked, load_rgb
from tieta.data.vtab import IMAGE_SUFFIXES, _listdir, _shown
from tieta.dense.transforms import evaluation_image, training_pair
from tieta.errors import TietaError
from tieta.data.text_lines import list_lines, shown_line
from tieta.files import read_regular

ADE_SPLITS = {"train": "training", "val": "validation"}  # the test split falls back to val
LIST_FILES = {"train": "train.txt", "val": "val.txt", "test": "test.txt"}
SPLIT_FALLBACK = {"train": ("train",), "test": ("test", "val"), "val": ("val",)}
CLASSES_FILE = "classes.txt"
MASK_SUFFIX = ".png"
MASK_MODES = {"L", "P"}  # one 8-bit label a pixel; a palette PNG's indices are its labels
IGNORE_INDEX = 255
MAX_LIST_BYTES = 256 * 2**20
MAX_CLASSES = 255  # labels 0-254: 255 is the ignore index
_HEAD_BYTES = 64 * 1024  # what detection reads of a list file
_ORIENTATION_TURNS = {5, 6, 7, 8}  # EXIF orientations that swap width and height


@dataclass
class SegmentationDataConfig:
    """How segmentation images are resized, cropped and augmented (the ``segmentation_data:`` section
    of a run's config). The defaults are mmseg's ADE20K pipeline, which DyT's dense-task configs use."""

    crop_size: int = 512  # training crops are crop_size x crop_size (padded where the image is smaller)
    # (long, short) edge limits of the resize, before the ratio (lists: a run's config.yaml holds them)
    scale: list[int] = field(default_factory=lambda: [2048, 512])
    ratio_range: list[float] = field(default_factory=lambda: [0.5, 2.0])  # training: the scale times a ratio
    cat_max_ratio: float = 0.75  # a training crop's largest class may cover at most this share (1: off)
    flip_prob: float = 0.5  # training: horizontal flips
    photometric: bool = True  # training: mmseg's PhotoMetricDistortion
    reduce_zero_label: bool = True  # label 0 -> ignore, the others minus 1 (ADE20K)
    ignore_index: int = IGNORE_INDEX

    def check(self, prefix: str = "segmentation.") -> None:
        """Raise a TietaError, in one sentence, for settings that cannot work. ``prefix`` names the
        fields as the user wrote them."""
        if not isinstance(self.crop_size, int) or self.crop_size < 1:
            raise TietaError(f"{prefix}crop_size must be a positive integer, got {self.crop_size!r}")
        scale = tuple(self.scale) if isinstance(self.scale, (list, tuple)) else ()
        if len(scale) != 2 or not all(isinstance(edge, int) and edge >= 1 for edge in scale):
            raise TietaError(f"{prefix}scale must be two positive integers (long and short edge), got {self.scale!r}")
        ratios = tuple(self.ratio_range) if isinstance(self.ratio_range, (list, tuple)) else ()
        if len(ratios) != 2 or not all(isinstance(r, (int, float)) and 0 < r < 100 for r in ratios) \
                or ratios[0] > ratios[1]:
            raise TietaError(f"{prefix}ratio_range must be two ratios 0 < low <= high < 100, got {self.ratio_range!r}")
        if not isinstance(self.cat_max_ratio, (int, float)) or not 0 < self.cat_max_ratio <= 1:
            raise TietaError(f"{prefix}cat_max_ratio must be in (0, 1] (1 turns the check off), "
                             f"got {self.cat_max_ratio!r}")
        if not isinstance(self.flip_prob, (int, float)) or not 0 <= self.flip_prob <= 1:
            raise TietaError(f"{prefix}flip_prob must be in [0, 1], got {self.flip_prob!r}")
        if not isinstance(self.photometric, bool) or not isinstance(self.reduce_zero_label, bool):
            raise TietaError(f"{prefix}photometric and {prefix}reduce_zero_label must be true or false")
        if not isinstance(self.ignore_index, int) or not 0 <= self.ignore_index <= 255:
            raise TietaError(f"{prefix}ignore_index must be a label value 0-255, got {self.ignore_index!r}")
        if self.reduce_zero_label and self.ignore_index != IGNORE_INDEX:
            raise TietaError(f"{prefix}ignore_index must be {IGNORE_INDEX} with {prefix}reduce_zero_label (the "
                             f"reduction marks label 0 with {IGNORE_INDEX}, as mmseg's), got {self.ignore_index}")


@dataclass
class SegmentationTask:
    """A segmentation task: its (image, mask) pairs per split ("train", "test", "val"), read up front,
    and its classes."""

    root: Path
    layout: str  # "ade20k" or "lists"
    num_classes: int
    items: dict[str, list[tuple[Path, Path]]]
    class_names: Optional[list[str]] = None
    reduce_zero_label: bool = True
    ignore_index: int = IGNORE_INDEX

    @property
    def data_path(self) -> str:
        """What data.path must say to open this task again."""
        return str(self.root)

    def split(self, name: str) -> list[tuple[Path, Path]]:
        """The (image, mask) pairs of a split; "test" falls back to "val" where there is no test split.

        Raises:
            TietaError: the split is unknown or missing.
        """
        if name not in SPLIT_FALLBACK:
            raise TietaError(f"a segmentation task has the splits {', '.join(SPLIT_FALLBACK)}, not {name!r}")
        found = next((self.items[other] for other in SPLIT_FALLBACK[name] if other in self.items), None)
        if found is None:
            raise TietaError(f"{_shown(self.root)} has no {' or '.join(SPLIT_FALLBACK[name])} split")
        return found


def segmentation_fingerprint(task: SegmentationTask, splits: tuple[str, ...]) -> str:
    """A short fingerprint of what a run reads from ``task`` (as tieta.data.vtab.fingerprint for image
    tasks): per split, every pair's paths relative to the task folder, and the classes, the reduction
    and the ignore index; it changes when a list, a folder's files or classes.txt change (not when
    an image or a mask is edited in place)."""
    digest = hashlib.sha256(f"{task.layout}|{task.num_classes}|{task.reduce_zero_label}|{task.ignore_index}|"
                            .encode())
    digest.update("\n".join(task.class_names or []).encode() + b"|")
    count = 0
    for name in splits:
        pairs = task.split(name)
        count += len(pairs)
        digest.update(f"{name}|{len(pairs)}|".encode())
        for image, mask in pairs:
            digest.update(os.fsencode(os.path.relpath(image, task.root)) + b"|"
                          + os.fsencode(os.path.relpath(mask, task.root)) + b"|")
    return f"{task.num_classes} classes, {count} images, sha256 {digest.hexdigest()[:16]}"


def is_segmentation_task(path: str | Path) -> bool:
    """Whether ``path`` is a segmentation task folder: images/training/ beside annotations/training/,
    or a train.txt whose first line names an image and a .png mask. False for anything else, never an
    error."""
    root = Path(path)
    try:
        if not root.is_dir():
            return False
        if (root / "images" / ADE_SPLITS["train"]).is_dir() and (root / "annotations" / ADE_SPLITS["train"]).is_dir():
            return True
        if (root / LIST_FILES["train"]).is_file():
            head = read_regular(root / LIST_FILES["train"], "list file", _HEAD_BYTES, head=True)
            first = next((line.split() for line in head.decode("utf-8", "replace").splitlines() if line.strip()), [])
            return len(first) == 2 and Path(first[0]).suffix.lower() in IMAGE_SUFFIXES \
                and Path(first[1]).suffix.lower() == MASK_SUFFIX
    except (OSError, TietaError):
        return False
    return False


def open_segmentation_task(path: str | Path, reduce_zero_label: bool = True,
                           ignore_index: int = IGNORE_INDEX) -> SegmentationTask:
    """The segmentation task at ``path``, every pair checked: the paths stay inside the task, every
    image has a mask of its size (compared on the files' headers, an EXIF turn applied), and the class
    count is known (see the module's docstring).

    Raises:
        TietaError: naming the file (and line): a missing folder, neither layout, a malformed line, a
            path that leaves the task, an image without its mask, a mask of another size than its
            image, a mask that is not an image file, a classes.txt that names no classes or too many,
            or a split with no pairs (a label beyond classes.txt, and a colour mask, are refused when
            the pair is read: :func:`read_pair`).
    """
    SegmentationDataConfig(reduce_zero_label=reduce_zero_label, ignore_index=ignore_index).check(prefix="")
    root = Path(path)
    if not root.is_dir():
        raise TietaError(f"segmentation task folder {_shown(path)} "
                         + ("is a file" if root.exists() else "does not exist"))
    root = root.resolve()
    if (root / "images" / ADE_SPLITS["train"]).is_dir():
        items = {split: _read_ade_split(root, folder) for split, folder in ADE_SPLITS.items()
                 if (root / "images" / folder).is_dir()}
        layout = "ade20k"
    elif (root / LIST_FILES["train"]).exists():  # (read_regular refuses a FIFO or a folder in its place)
        items = {split: _read_pair_list(root, root / name) for split, name in LIST_FILES.items()
                 if (root / name).exists()}
        layout = "lists"
    else:
        raise TietaError(f"{_shown(root)} is not a segmentation task folder: it has neither images/training/ with "
                         "annotations/training/ nor train.txt ('<image path> <mask path>' lines)")
    for pairs in items.values():
        for image, mask in pairs:
            check_sizes(image, mask)
    names = _read_classes(root)
    if names is not None:
        count = len(names)
    else:  # every mask read once: the classes are 0 to the largest label
        largest = max(_largest_label(mask, reduce_zero_label, ignore_index)
                      for pairs in items.values() for _, mask in pairs)
        if largest < 0:
            raise TietaError(f"no mask of {_shown(root)} has a label other than the ignore index {ignore_index}")
        count = largest + 1
    return SegmentationTask(root, layout, count, items, names, reduce_zero_label, ignore_index)


def _read_classes(root: Path) -> Optional[list[str]]:
    """The class names of classes.txt (one a line, blank lines skipped), or None without one."""
    file = root / CLASSES_FILE
    if not file.exists():
        return None
    data = read_regular(file, "class list", 1 << 20)
    try:
        names = [line.strip() for line in data.decode("utf-8-sig").splitlines() if line.strip()]
    except UnicodeDecodeError as error:
        raise TietaError(f"class list {_shown(file)} is not UTF-8 text") from error
    if not names:
        raise TietaError(f"class list {_shown(file)} names no classes")
    if len(names) > MAX_CLASSES:
        raise TietaError(f"class list {_shown(file)} names {len(names)} classes, more than the {MAX_CLASSES} an "
                         "8-bit mask can label besides the ignore index")
    return names


def _inside(root: Path, name: str, where: str, what: str) -> Path:
    """``root / name``, refused where the text climbs out (absolute, ``..``). Checked on the text, not
    with resolve(): a task's images/ is often a link to other storage, as for image tasks."""
    if not name.isprintable():
        raise TietaError(f"{where}: {what} path {name!r} has an unprintable character")
    if os.path.isabs(name) or os.pardir in Path(os.path.normpath(name)).parts:
        raise TietaError(f"{where}: {what} path {name} leaves the task folder")
    return root / name


def _read_ade_split(root: Path, folder: str) -> list[tuple[Path, Path]]:
    """The (image, mask) pairs of images/<folder>/ and annotations/<folder>/, paired by file stem."""
    pairs = []
    for image in _listdir(root / "images" / folder):
        if image.suffix.lower() not in IMAGE_SUFFIXES or image.name.startswith("."):
            continue
        mask = root / "annotations" / folder / (image.stem + MASK_SUFFIX)
        if not mask.exists():  # (anything but a regular file is refused when its header is read)
            raise TietaError(f"image {_shown(image)} has no mask {_shown(mask)}")
        pairs.append((image, mask))
    if not pairs:
        raise TietaError(f"{_shown(root / 'images' / folder)} has no images ({', '.join(sorted(IMAGE_SUFFIXES))})")
    return pairs


def _read_pair_list(root: Path, file: Path) -> list[tuple[Path, Path]]:
    """The pairs of a list file ("<image path> <mask path>" lines; blank lines skipped)."""
    pairs = []
    for where, line, parts in list_lines(file, MAX_LIST_BYTES):
        if len(parts) != 2:
            raise TietaError(f"{where}: expected '<image path> <mask path>', got {shown_line(line)!r}")
        image, mask = _inside(root, parts[0], where, "image"), _inside(root, parts[1], where, "mask")
        if image.suffix.lower() not in IMAGE_SUFFIXES:
            raise TietaError(f"{where}: {parts[0]} is not an image ({', '.join(sorted(IMAGE_SUFFIXES))})")
        if mask.suffix.lower() != MASK_SUFFIX:
            raise TietaError(f"{where}: mask {parts[1]} is not a .png label map")
        pairs.append((image, mask))
    if not pairs:
        raise TietaError(f"list file {_shown(file)} names no images")
    return pairs


def _check_regular(path: Path, what: str) -> None:
    """Refuse anything but a regular file (a FIFO would block, a folder is no image), and a path the
    system cannot look up (a name too long), in one sentence."""
    try:
        found = path.stat()
    except FileNotFoundError:
        raise TietaError(f"{what} {_shown(path)} does not exist") from None
    except (OSError, RuntimeError) as error:  # a name too long, a loop of links
        raise TietaError(f"cannot read {what} {_shown(path)}: {getattr(error, 'strerror', None) or error}") from None
    if not stat.S_ISREG(found.st_mode):
        raise TietaError(f"{what} {_shown(path)} is not a regular file")


def _header_size(path: Path, what: str) -> tuple[int, int]:
    """(width, height) of an image file as it is shown (an EXIF turn applied), from its header."""
    _check_regular(path, what)
    try:
        with _open_checked(path) as image:
            width, height = image.size
            try:
                turned = image.getexif().get(ExifTags.Base.Orientation, 1) in _ORIENTATION_TURNS
            except _DECODE_ERRORS:
                turned = False
    except TietaError:
        raise
    except _DECODE_ERRORS as error:
        raise TietaError(f"cannot read {what} {_shown(path)}: it is not an image file PIL knows, or it is "
                         "corrupt") from error
    return (height, width) if turned else (width, height)


def check_sizes(image: Path, mask: Path) -> None:
    """Refuse, in one sentence naming both files, a mask whose size is not its image's."""
    image_size, mask_size = _header_size(image, "image"), _header_size(mask, "mask")
    if image_size != mask_size:
        raise TietaError(f"mask {_shown(mask)} is {mask_size[0]} x {mask_size[1]} pixels but its image "
                         f"{_shown(image)} is {image_size[0]} x {image_size[1]}")


def mask_labels(path: Path, reduce_zero_label: bool) -> np.ndarray:
    """The label map of a mask PNG, (H, W) uint8, reduced as mmseg's LoadAnnotations does where
    ``reduce_zero_label`` (0 -> 255, the others minus 1, so 255 stays 255).

    Raises:
        TietaError: the file is missing, corrupt, too large, or not a single-channel label map.
    """
    _check_regular(path, "mask")
    try:
        with _open_checked(path) as image:
            if image.mode not in MASK_MODES:
                raise TietaError(f"mask {_shown(path)} has the pixel type {image.mode!r}: a mask is a single-channel "
                                 "8-bit label map (PNG mode L, or P read as its indices)")
            labels = np.array(image, dtype=np.uint8)  # reads the pixels
    except TietaError:
        raise
    except _DECODE_ERRORS as error:
        raise TietaError(f"cannot read mask {_shown(path)}: it is corrupt or truncated ({error})") from error
    if reduce_zero_label:  # mmseg: seg[seg == 0] = 255; seg = seg - 1; seg[seg == 254] = 255
        labels[labels == 0] = 255
        labels = labels - 1
        labels[labels == 254] = 255
    return labels


def read_pair(image: Path, mask: Path, task: SegmentationTask) -> tuple[np.ndarray, np.ndarray]:
    """(image (H, W, 3) uint8 RGB, labels (H, W) uint8) of one pair, checked: the same size, and no
    label beyond the task's classes other than the ignore index.

    Raises:
        TietaError: naming the file(s).
    """
    pixels = np.array(load_rgb(image), dtype=np.uint8)
    labels = mask_labels(mask, task.reduce_zero_label)
    if pixels.shape[:2] != labels.shape:
        raise TietaError(f"mask {_shown(mask)} is {labels.shape[1]} x {labels.shape[0]} pixels but its image "
                         f"{_shown(image)} is {pixels.shape[1]} x {pixels.shape[0]}")
    stray = labels[(labels != task.ignore_index) & (labels >= task.num_classes)]
    if stray.size:
        raise TietaError(f"mask {_shown(mask)} has label {int(stray.max())}, beyond the task's {task.num_classes} "
                         f"classes (0-{task.num_classes - 1}, and {task.ignore_index} ignored)")
    return pixels, labels


def _largest_label(mask: Path, reduce_zero_label: bool, ignore_index: int) -> int:
    """The largest label of a mask other than the ignore index, or -1 where it has none."""
    labels = mask_labels(mask, reduce_zero_label)
    labelled = labels[labels != ignore_index]
    return int(labelled.max()) if labelled.size else -1


class SegmentationDataset(Dataset):
    """(image, mask) pairs of a segmentation task, decoded when read.

    Training (``training=True``): mmseg's pipeline (tieta.dense.transforms), its draws from a
    RandomState seeded from torch's generator (so a run's seed, and each DataLoader worker's own seed,
    decide them): image (3, C, C) float32 on the 0-255 scale, padded with ``mean`` (so that it
    normalises to 0), and mask (C, C) int64 padded with the ignore index. Evaluation: the image
    rescaled to fit ``config.scale``, (3, H', W') float32, and the mask at its own size, (H, W) int64.

    Args:
        items: (image, mask) pairs, e.g. ``task.split("train")``.
        task: the task they come from (its classes, reduction and ignore index).
        config: checked here.
        mean: the normalisation's mean on the 0-1 scale (tieta.data.transforms.normalization_numbers).
    """

    def __init__(self, items: list[tuple[Path, Path]], task: SegmentationTask, config: SegmentationDataConfig,
                 training: bool, mean: tuple[float, float, float] = (0.485, 0.456, 0.406)) -> None:
        config.check()
        if not items:
            raise TietaError("the split has no images")
        if config.reduce_zero_label != task.reduce_zero_label or config.ignore_index != task.ignore_index:
            raise TietaError("the task was opened with another reduce_zero_label or ignore_index than the "
                             "segmentation settings say: open it with the settings' values")
        self.items, self.task, self.config, self.training = items, task, config, training
        self.fill = torch.tensor(mean, dtype=torch.float32) * 255

    def __len__(self) -> int:
        return len(self.items)

    def __getitem__(self, index: int) -> tuple[torch.Tensor, torch.Tensor]:
        pixels, labels = read_pair(*self.items[index], self.task)
        if self.training:
            rng = np.random.RandomState(int(torch.randint(2**31, ())))
            return training_pair(pixels, labels, self.config, rng, self.fill)
        return evaluation_image(pixels, self.config.scale), torch.from_numpy(labels).long()
