"""A video task folder, its settings, and the clips a model trains and is evaluated on.

Two layouts, as the public datasets ship once converted the way the reference code reads them::

    <task>/train.txt  val.txt or test.txt        # lines: "<clip path> <label>", paths inside the task
    <task>/train/<class name>/*.mp4  <task>/test/<class name>/*.mp4   (or val/ for test)

Clips are .mp4, .webm, .avi or .mkv files, decoded with PyAV (tieta.video.clips). A training item is
one clip sampled and augmented anew each time it is read, (T, 3, S, S); an evaluation item is all
of its views, (V, T, 3, S, S); both float32 on the 0-255 scale, normalised per batch as images are.
"""

from __future__ import annotations

import os
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch.utils.data import Dataset

from tieta.data.text_lines import list_lines, shown_line
from tieta.data.vtab import Task, _class_folders, _listdir, _shown
from tieta.errors import TietaError
from tieta.files import read_regular
from tieta.video.clips import CLIP_SUFFIXES, MAX_CLIP_PIXELS, clip_path, read_clip
from tieta.video.sampling import evaluation_indices, training_indices
from tieta.video.transforms import SPATIAL_VIEWS, Draws, evaluation_views, k400_training, ssv2_training

LIST_FILES = {"train": "train.txt", "val": "val.txt", "test": "test.txt"}
FOLDER_SPLITS = ("train", "val", "test")
STYLES = ("k400", "ssv2")
MAX_FRAMES = 256  # frames a model sees per clip, at most (the papers use 8)
_HEAD_BYTES = 64 * 1024  # what detection reads of a list file
MAX_LIST_BYTES = 256 * 2**20  # a list file, at most (Kinetics-400's training list is about 15 MB)
_LABEL = re.compile(r"[0-9]{1,18}")  # ASCII digits only: str.isdigit() also accepts "²", which int() refuses


@dataclass
class VideoDataConfig:
    """How clips are sampled, augmented and viewed (the ``video:`` section of a run's config).

    The defaults are the reference's Kinetics-400 settings; :meth:`preset` gives SSv2's.
    """

    # training augmentation: "k400" (scale jitter, crop, mirror) or "ssv2" (RandAugment, resized crop)
    style: str = "k400"
    frames: int = 8  # T, the frames the model sees per clip
    sampling_rate: int = 16  # the stride between them; 0: one frame per segment (SSv2)
    temporal_views: int = 3  # evaluation: views along time (1 with segments)
    spatial_views: int = 1  # evaluation: 1 (centre crop) or 3 (along the long side)
    max_pixels: int = MAX_CLIP_PIXELS  # frames x width x height of one decoded clip, at most

    @classmethod
    def preset(cls, style: str) -> "VideoDataConfig":
        """The reference's settings for "k400" (8 frames at a stride of 16, 3 temporal x 1 spatial
        views) or "ssv2" (8 segments, 1 temporal x 3 spatial views)."""
        if style == "ssv2":
            return cls(style="ssv2", frames=8, sampling_rate=0, temporal_views=1, spatial_views=3)
        if style == "k400":
            return cls()
        raise TietaError(f"video style must be one of {', '.join(STYLES)}, got {style!r}")

    @property
    def views(self) -> int:
        """V, the views of a clip at evaluation."""
        return self.temporal_views * self.spatial_views

    def check(self, prefix: str = "video.") -> None:
        """Raise a TietaError, in one sentence, for settings that cannot work. ``prefix`` names the
        fields as the user wrote them."""
        if self.style not in STYLES:
            raise TietaError(f"{prefix}style must be one of {', '.join(STYLES)}, got {self.style!r}")
        if not 1 <= self.frames <= MAX_FRAMES:
            raise TietaError(f"{prefix}frames must be between 1 and {MAX_FRAMES}, got {self.frames}")
        if self.sampling_rate < 0:
            raise TietaError(f"{prefix}sampling_rate must be at least 0 (0: one frame per segment), "
                             f"got {self.sampling_rate}")
        if self.temporal_views < 1:
            raise TietaError(f"{prefix}temporal_views must be at least 1, got {self.temporal_views}")
        if self.sampling_rate == 0 and self.temporal_views != 1:
            raise TietaError(f"{prefix}temporal_views must be 1 with {prefix}sampling_rate 0 (segments cover the "
                             f"whole clip once), got {self.temporal_views}")
        if self.spatial_views not in SPATIAL_VIEWS:
            raise TietaError(f"{prefix}spatial_views must be 1 or 3, got {self.spatial_views}")
        if self.max_pixels < 1:
            raise TietaError(f"{prefix}max_pixels must be at least 1, got {self.max_pixels}")


def is_video_task(path: str | Path) -> bool:
    """Whether ``path`` is a folder of clips: a train.txt whose first line names a clip, or a
    train/<class>/ folder holding one. False for anything else, never an error."""
    root = Path(path)
    try:
        if not root.is_dir():
            return False
        if (root / LIST_FILES["train"]).is_file():
            head = read_regular(root / LIST_FILES["train"], "list file", _HEAD_BYTES, head=True)
            first = next((line.split() for line in head.decode("utf-8", "replace").splitlines() if line.strip()), [])
            return bool(first) and Path(first[0]).suffix.lower() in CLIP_SUFFIXES
        if (root / "train").is_dir():
            return any(_is_clip(entry) for folder in _class_folders(root / "train") for entry in _listdir(folder))
    except (OSError, TietaError):
        return False
    return False


def open_video_task(path: str | Path) -> Task:
    """The video task at ``path``: its splits' (clip path, label) pairs, read up front (a Task whose
    layout is "video"; its splits are named train, test and val, test falling back to val).

    Labels of a list file number the classes from 0: the training list has a clip of each class up to
    its largest label, and every other list's labels are among its classes. Folder names are the
    classes, sorted, as for images.

    Raises:
        TietaError: naming the file and line (or folder): a missing folder, no training split, a
            malformed line, a path that leaves the task (absolute, ``..``, a symbolic link out), a
            file that is not a clip, a label outside the training classes, or a split with no clips.
    """
    root = Path(path)
    if not root.is_dir():
        raise TietaError(f"video task folder {_shown(path)} " + ("is a file" if root.exists() else "does not exist"))
    root = root.resolve()
    if (root / LIST_FILES["train"]).is_file():
        items = {split: _read_clip_list(root, root / name) for split, name in LIST_FILES.items()
                 if (root / name).is_file()}
        trained = {label for _, label in items["train"]}
        classes = 1 + max(trained)
        missing = sorted(set(range(classes)) - trained)
        if missing:  # a class the model could never learn: more likely a typo in a label
            raise TietaError(f"{_shown(root / LIST_FILES['train'])} has labels up to {classes - 1} but no clip of "
                             f"class {missing[0]}: labels must number the classes from 0 without gaps")
        for split, pairs in items.items():
            for clip, label in pairs:
                if label >= classes:
                    raise TietaError(f"{_shown(root / LIST_FILES[split])}: label {label} of {_shown(clip)} is not "
                                     f"a training class (train.txt has labels 0-{classes - 1})")
        return Task(root, "video", classes, items=items, identity="video lists")
    if (root / "train").is_dir():
        names = [folder.name for folder in _class_folders(root / "train")]
        items = {split: _read_clip_folder(root, split, names) for split in FOLDER_SPLITS if (root / split).is_dir()}
        return Task(root, "video", len(names), names, items=items, identity="video folders")
    raise TietaError(f"{_shown(root)} is not a video task folder: it has neither train.txt ('<clip path> <label>' "
                     f"lines) nor train/<class>/ folders of clips ({', '.join(CLIP_SUFFIXES)})")


def _is_clip(path: Path) -> bool:
    return path.suffix.lower() in CLIP_SUFFIXES and not path.name.startswith(".")


def _read_clip_list(root: Path, file: Path) -> list[tuple[Path, int]]:
    """The (clip, label) pairs of a list file ("<clip path> <label>" lines; blank lines skipped), every
    path checked to stay in ``root`` and name a clip, every label a non-negative integer."""
    pairs = []
    for where, line, parts in list_lines(file, MAX_LIST_BYTES):
        if len(parts) != 2 or not _LABEL.fullmatch(parts[1]):
            raise TietaError(f"{where}: expected '<clip path> <label>' with a label of 0 or more, "
                             f"got {shown_line(line)!r}")
        name, label = parts[0], int(parts[1])
        if not name.isprintable():
            raise TietaError(f"{where}: clip path {name!r} has an unprintable character")
        path = clip_path(root, name, where)
        if not _is_clip(path):
            raise TietaError(f"{where}: {name} is not a clip ({', '.join(CLIP_SUFFIXES)})")
        pairs.append((path, label))
    if not pairs:
        raise TietaError(f"list file {_shown(file)} names no clips")
    return pairs


def _read_clip_folder(root: Path, split: str, classes: list[str]) -> list[tuple[Path, int]]:
    """The (clip, label) pairs of ``root/split/<class>/``, the classes those of train/."""
    pairs = []
    for folder in _class_folders(root / split):
        if folder.name not in classes:
            raise TietaError(f"class folder {_shown(folder)} is not among the training classes")
        clips = [entry for entry in _listdir(folder) if _is_clip(entry)]
        if split == "train" and not clips:
            raise TietaError(f"class folder {_shown(folder)} has no clips ({', '.join(CLIP_SUFFIXES)})")
        label = classes.index(folder.name)
        where = _shown(folder)
        pairs += [(clip_path(root, os.path.relpath(clip, root), where), label) for clip in clips]
    if not pairs:
        raise TietaError(f"{_shown(root / split)} has no class folders of clips")
    return pairs


class VideoDataset(Dataset):
    """(clip, label) pairs, each clip decoded when it is read.

    Training (``training=True``): one clip, (T, 3, S, S), its frames sampled and augmented afresh as
    ``config.style`` says, with draws seeded from torch's generator (so a run's seed, and each
    DataLoader worker's own seed, decide them). Evaluation: its V = temporal x spatial views,
    (V, T, 3, S, S), the same every time. Both float32 on the 0-255 scale.

    Args:
        items: (clip path, label) pairs, e.g. ``open_video_task(path).split("train")``.
        num_classes: labels must lie in [0, num_classes).
        config: checked here.
        image_size: S, the model's input resolution.
    """

    def __init__(self, items: list[tuple[Any, int]], num_classes: int, config: VideoDataConfig, image_size: int,
                 training: bool) -> None:
        config.check()
        for path, label in items:
            if not 0 <= label < num_classes:
                raise TietaError(f"label {label} of {_shown(path)} is out of range for a model with {num_classes} "
                                 "classes")
            if not Path(path).is_file():
                raise TietaError(f"clip {_shown(path)} {'is not a file' if Path(path).exists() else 'does not exist'}")
        if not items:
            raise TietaError("the split has no clips")
        if image_size < 1:
            raise TietaError(f"the image size must be at least 1, got {image_size}")
        self.items, self.config, self.image_size, self.training = items, config, image_size, training
        self.labels = torch.tensor([label for _, label in items])

    def __len__(self) -> int:
        return len(self.items)

    def __getitem__(self, index: int) -> tuple[torch.Tensor, int]:
        path, label = self.items[index]
        config = self.config
        clip = read_clip(Path(path), config.max_pixels)
        if self.training:
            draws = Draws.from_seed(int(torch.randint(2**31, ())))
            frames = clip.rgb(training_indices(clip.count, config.frames, config.sampling_rate, draws.numpy))
            augment = k400_training if config.style == "k400" else ssv2_training
            return augment(frames, self.image_size, draws), label
        views = evaluation_indices(clip.count, config.frames, config.sampling_rate, config.temporal_views)
        return evaluation_views([clip.rgb(indices) for indices in views], self.image_size, config.spatial_views), label
