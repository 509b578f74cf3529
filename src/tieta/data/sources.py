"""Image sources beyond the VTAB-1k and train/test folder layouts: a class-per-folder tree, and
CSV/TSV list files. They open into the same Task (tieta.data.vtab), with their splits read up front.

Class-per-folder tree, without a split (``data.holdout`` takes the test images out of it)::

    <dir>/<class name>/*.jpg

List files: one ``<image path>,<label>`` row per image (tab-separated in a .tsv), an optional
header row (``path,label``), image paths relative to the list file's folder, labels either all
integers (the classes 0 to the largest) or class names (numbered in sorted order)::

    <dir>/train.csv  <dir>/test.csv  (or val.csv for test; or .tsv files)
    list.csv                          (a single file: data.holdout takes the test images out of it)
"""

from __future__ import annotations

import csv
import hashlib
import os
from pathlib import Path
from typing import Any, Optional

from tieta.data.vtab import (FOLDER_SPLITS, IMAGE_SUFFIXES, Task, _class_folders, _LABEL, _listdir,
                             _shown)
from tieta.errors import TietaError
from tieta.files import read_regular

LIST_SEPARATORS = {".csv": ",", ".tsv": "\t"}
# The held-out split is chosen by a fixed seed, not the run's: every seed and method of a sweep is
# evaluated on the same images.
HOLDOUT_SEED = 0
# A header row: its first field names the path column and its second the label column.
HEADER_PATHS = {"path", "image", "img", "file", "filename", "filepath", "image_path"}
HEADER_LABELS = {"label", "labels", "class", "target", "category"}
MAX_LIST_BYTES = 1 << 30


def refuse_holdout(root: Path, holdout: Optional[float]) -> None:
    """A source with its own test split takes no held-out fraction: one of the two would be ignored."""
    if holdout is not None:
        raise TietaError(f"{_shown(root)} has its own test split; data.holdout takes a test split out of a source "
                         "without one (a class-per-folder tree, a single list file): leave it unset")


def need_holdout(where: str, holdout: Optional[float]) -> float:
    if holdout is None:
        raise TietaError(f"{where} has no test split: set data.holdout (e.g. --set data.holdout=0.2) to hold out a "
                         "seeded, stratified fraction of its images for testing")
    return holdout


def hold_out(items: list[tuple[Any, int]], fraction: float, name: Any = str
             ) -> dict[str, list[tuple[Any, int]]]:
    """{"train": ..., "test": ...}: per class, round(fraction x its images) for testing (at least one,
    and never all, of a class with two images or more; a class with one image is only trained on).

    Which images are held out depends on a hash of the seed and each image's ``name(image)`` (its
    path in the folder, its row in a dataset), not on the order they were listed in: the same images
    are held out on every machine and in every run, and adding images to a class moves few others.
    """
    by_class: dict[int, list[int]] = {}  # label -> the indices of its images in items
    for index, (_, label) in enumerate(items):
        by_class.setdefault(label, []).append(index)
    chosen: set[int] = set()
    for members in by_class.values():
        count = min(max(round(len(members) * fraction), 1), len(members) - 1)
        ranked = sorted(members, key=lambda i: hashlib.sha256(f"{HOLDOUT_SEED}|{name(items[i][0])}".encode()).digest())
        chosen.update(ranked[:count])
    return {"train": [item for index, item in enumerate(items) if index not in chosen],
            "test": [item for index, item in enumerate(items) if index in chosen]}


def open_class_tree(root: Path, holdout: Optional[float]) -> Task:
    """A ``<class>/*.jpg`` tree: the classes are its sub-folders (sorted), the test split is held out."""
    fraction = need_holdout(f"the class-per-folder tree {_shown(root)}", holdout)
    classes = _class_folders(root)
    items = []
    for label, folder in enumerate(classes):
        images = [p for p in _listdir(folder) if p.suffix.lower() in IMAGE_SUFFIXES]
        if not images:
            raise TietaError(f"class folder {_shown(folder)} has no images ({', '.join(sorted(IMAGE_SUFFIXES))})")
        items += [(path, label) for path in images]
    splits = hold_out(items, fraction, lambda path: os.path.relpath(path, root))
    return Task(root, "classes", len(classes), [p.name for p in classes], splits, f"holdout {fraction!r}")


def list_files(root: Path) -> dict[str, Path]:
    """The list files of a folder by split name ("train", "test", "val"): train.csv, test.tsv..."""
    found = {}
    for split in FOLDER_SPLITS:
        for suffix in LIST_SEPARATORS:
            if (root / f"{split}{suffix}").is_file():
                found.setdefault(split, root / f"{split}{suffix}")
    return found if "train" in found else {}


def open_list_folder(root: Path, holdout: Optional[float]) -> Task:
    """A folder with train.csv and test.csv (or val.csv; or .tsv files)."""
    refuse_holdout(root, holdout)
    files = list_files(root)
    if "test" not in files and "val" not in files:
        raise TietaError(f"{_shown(root)} has {files['train'].name} but no test.csv, test.tsv, val.csv or val.tsv "
                         "for the test split")
    splits, names = _labelled({split: _read_rows(root, file) for split, file in files.items()})
    return Task(root, "lists", _class_count(splits, names), names, splits)


def open_list_file(file: Path, holdout: Optional[float]) -> Task:
    """A single list file, whose test split is held out."""
    fraction = need_holdout(f"the single list file {_shown(file)}", holdout)
    splits, names = _labelled({"train": _read_rows(file.parent, file)})
    count = _class_count(splits, names)  # before the hold-out, which leaves every class a training image
    splits = hold_out(splits["train"], fraction, lambda path: os.path.relpath(path, file.parent))
    return Task(file.parent, "lists", count, names, splits, f"holdout {fraction!r}", str(file))


def _read_rows(root: Path, file: Path) -> list[tuple[str, Path, str]]:
    """(where: "file:line", image path, label text) of each row of a list file.

    Raises:
        TietaError: naming the file and line, for a row that is not two fields, a path that is
            absolute or leaves the folder, and a file that cannot be read or is not UTF-8.
    """
    data = read_regular(file, "list file", MAX_LIST_BYTES)
    try:  # a BOM (from spreadsheet programs) would otherwise become part of the first path
        text = data.decode("utf-8-sig")
    except UnicodeDecodeError as error:
        line = data[:error.start].count(b"\n") + 1
        raise TietaError(f"{_shown(file)}:{line}: not UTF-8 text (byte 0x{data[error.start]:02x})") from error
    separator = LIST_SEPARATORS[file.suffix.lower()]
    shown_separator = "," if separator == "," else "<tab>"
    rows = []
    reader = csv.reader(text.splitlines(), delimiter=separator)
    try:
        for row in reader:
            fields = [field.strip() for field in row]
            where = f"{_shown(file)}:{reader.line_num}"
            if not any(fields):
                continue
            if not rows and len(fields) == 2 and fields[0].lower() in HEADER_PATHS \
                    and fields[1].lower() in HEADER_LABELS:
                rows.append(None)  # the header: not an image
                continue
            if len(fields) != 2 or not fields[0] or not fields[1]:
                got = separator.join(row)
                got = got if len(got) <= 80 else got[:77] + "..."
                raise TietaError(f"{where}: expected '<image path>{shown_separator}<label>', got {got!r}")
            name, label = fields
            if not name.isprintable():
                raise TietaError(f"{where}: image path {name!r} has an unprintable character")
            # Checked on the text, not with resolve(): the images may be a symlink to other storage.
            if os.path.isabs(name) or os.path.normpath(name).split(os.sep)[0] == os.pardir:
                raise TietaError(f"{where}: image path {name} leaves the folder of the list file")
            rows.append((where, root / name, label))
    except csv.Error as error:
        raise TietaError(f"{_shown(file)}:{reader.line_num}: {error}") from error
    rows = [row for row in rows if row is not None]
    if not rows:
        raise TietaError(f"list file {_shown(file)} names no images")
    return rows


def _labelled(rows: dict[str, list[tuple[str, Path, str]]]
              ) -> tuple[dict[str, list[tuple[Path, int]]], Optional[list[str]]]:
    """(the (path, label) pairs per split, the class names or None): labels are integers where every
    label of every file is one, else class names, numbered in sorted order from the training file's."""
    every = [row for split in rows.values() for row in split]
    if all(_LABEL.fullmatch(label) and len(label) <= 18 for _, _, label in every):
        for where, _, label in every:
            if int(label) < 0:
                raise TietaError(f"{where}: label {label} is negative")
        return {split: [(path, int(label)) for _, path, label in items] for split, items in rows.items()}, None
    names = sorted({label for _, _, label in rows["train"]})
    index = {name: number for number, name in enumerate(names)}
    for split, items in rows.items():
        for where, _, label in items:
            if label not in index:
                raise TietaError(f"{where}: class {label!r} is not among the training file's classes")
    return {split: [(path, index[label]) for _, path, label in items] for split, items in rows.items()}, names


def _class_count(splits: dict[str, list[tuple[Any, int]]], names: Optional[list[str]]) -> int:
    """The number of classes: the names', or 0 to the largest training label, each with a training
    image (a stray label would otherwise make a larger head), the other splits within them."""
    return integer_classes({split: [(str(path), label) for path, label in items] for split, items in splits.items()},
                           names)


def integer_classes(labelled: dict[str, list[tuple[str, int]]], names: Optional[list[str]] = None) -> int:
    """The number of classes of (where, label) pairs per split, "train" the training one: the
    number of ``names`` where given, else the training labels must number the classes 0 to n - 1.

    Raises:
        TietaError: a class without a training image, or a label of another split that is not a
            training class, naming where it is.
    """
    if names is not None:
        return len(names)
    trained = {label for _, label in labelled["train"]}
    count = max(trained) + 1
    missing = next((label for label in range(count) if label not in trained), None)
    if missing is not None:
        where = next(where for where, label in labelled["train"] if label == count - 1)
        raise TietaError(f"class {missing} has no training image (the largest training label is {count - 1}, "
                         f"at {where}): labels must number the classes from 0")
    for split, items in labelled.items():
        for where, label in items:
            if not 0 <= label < count:
                raise TietaError(f"{where}: label {label} is not a training class (the training labels are "
                                 f"{'0' if count == 1 else f'0-{count - 1}'})")
    return count
