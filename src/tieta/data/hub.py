"""Image classification datasets of the ``datasets`` library: a DatasetDict saved with
``save_to_disk`` (a folder with dataset_dict.json), or one loaded from the hub by name (``hf:NAME``).

The splits are "train", and "test" (else "validation") for testing. The image column is ``image`` or
``img``, else the one Image feature; the label column ``label`` or ``labels``, else the one ClassLabel
feature. A ClassLabel gives the class names; integer labels must number the classes from 0. Images are
read from the dataset's stored bytes through the same decoder as image files (tieta.data.transforms).

``datasets`` is an optional dependency (``pip install 'tieta[datasets]'``), imported only here, when
such a source is opened.
"""

from __future__ import annotations

import io
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, BinaryIO, Optional

from tieta.data.sources import hold_out, integer_classes, need_holdout, refuse_holdout
from tieta.data.vtab import Task, _shown
from tieta.errors import TietaError

HUB_PREFIX = "hf:"
DATASET_DICT = "dataset_dict.json"
IMAGE_COLUMNS = ("image", "img")
LABEL_COLUMNS = ("label", "labels")
# tieta's split -> the dataset's split names it reads, first found
SPLIT_NAMES = {"train": ("train",), "test": ("test", "validation"), "val": ("validation",)}


@dataclass(frozen=True)
class StoredImage:
    """An image stored in a row of a dataset split: opened by load_resized like a file (its
    ``open_binary``), named in messages and fingerprints by its split and row."""

    where: str  # the dataset's name or folder
    split: str
    row: int
    column: str
    dataset: Any = field(compare=False, repr=False)  # the split with the image column undecoded

    def __str__(self) -> str:
        return f"{self.where}[{self.split}][{self.row}]"

    @property
    def key(self) -> str:
        """Its name within the dataset, wherever the dataset lies (fingerprints, the hold-out)."""
        return f"{self.split}[{self.row}]"

    @property
    def name(self) -> str:
        """What a picture's caption shows, as a file's name would be shown."""
        return self.key

    def open_binary(self) -> BinaryIO:
        value = self.dataset[self.row][self.column]
        if value and value.get("bytes"):
            return io.BytesIO(value["bytes"])
        if value and value.get("path"):  # images stored by reference, as some hub datasets are
            return open(value["path"], "rb")
        raise TietaError(f"row {self.row} of the {self.split!r} split of {self.where} has no image")


def _datasets():
    try:
        import datasets
    except ImportError:
        raise TietaError("reading a datasets dataset needs the datasets library: pip install 'tieta[datasets]'") \
            from None
    return datasets


def open_saved(root: Path, holdout: Optional[float]) -> Task:
    """A DatasetDict saved with ``save_to_disk`` in ``root``."""
    datasets = _datasets()
    try:
        loaded = datasets.load_from_disk(str(root))
    except Exception as error:  # datasets raises many kinds (FileNotFoundError, JSON, arrow errors)
        raise TietaError(f"cannot load the dataset saved in {_shown(root)}: {_first_line(error)}") from error
    return _task(loaded, str(root), root, None, holdout)


def open_hub(name: str, holdout: Optional[float]) -> Task:
    """A hub dataset by name, with ``datasets.load_dataset`` (downloaded once into its cache)."""
    if not name or not name.isprintable():
        raise TietaError(f"{HUB_PREFIX}NAME needs a dataset name, e.g. {HUB_PREFIX}beans; got {HUB_PREFIX + name!r}")
    datasets = _datasets()
    try:
        loaded = datasets.load_dataset(name)
    except Exception as error:  # offline, unknown, gated or malformed: datasets has no common base class
        raise TietaError(f"cannot load the hub dataset {name}: {_first_line(error)}") from error
    return _task(loaded, name, Path(HUB_PREFIX + name), HUB_PREFIX + name, holdout)


def _first_line(error: Exception) -> str:
    text = str(error).strip().splitlines()
    return text[0] if text else type(error).__name__


def _task(loaded: Any, where: str, root: Path, source: Optional[str], holdout: Optional[float]) -> Task:
    datasets = _datasets()
    if not isinstance(loaded, datasets.DatasetDict):
        raise TietaError(f"{where} is a single dataset, not a DatasetDict with a train split")
    names = {split: next((name for name in wanted if name in loaded), None) for split, wanted in SPLIT_NAMES.items()}
    if names["train"] is None:
        raise TietaError(f"{where} has no train split (it has {', '.join(loaded) or 'none'})")
    train = loaded[names["train"]]
    image_column = _column(train, where, IMAGE_COLUMNS, datasets.Image, "image")
    label_column = _column(train, where, LABEL_COLUMNS, datasets.ClassLabel, "label")
    label_feature = train.features[label_column]
    class_names = list(label_feature.names) if isinstance(label_feature, datasets.ClassLabel) else None
    items, identity = {}, []
    for split, name in names.items():
        if name is None:
            continue
        part = loaded[name]
        if image_column not in part.features or label_column not in part.features:
            raise TietaError(f"the {name!r} split of {where} has no {image_column!r} or {label_column!r} column")
        undecoded = part.select_columns([image_column]).cast_column(image_column, datasets.Image(decode=False))
        labels = part[label_column]
        items[split] = [(StoredImage(where, name, row, image_column, undecoded), _label(label, where, name, row))
                        for row, label in enumerate(labels)]
        identity.append(f"{name}:{getattr(part, '_fingerprint', '')}")
    if "test" in items:
        refuse_holdout(root, holdout)
    else:
        fraction = need_holdout(f"{where} (splits {', '.join(loaded)})", holdout)
        items.update(hold_out(items["train"], fraction, lambda image: image.key))
        identity.append(f"holdout {fraction!r}")
    if class_names is None:
        num_classes = integer_classes({split: [(str(image), label) for image, label in pairs]
                                       for split, pairs in items.items()})
    else:  # the ClassLabel's classes, trained on or not
        num_classes = len(class_names)
        for image, label in (pair for pairs in items.values() for pair in pairs):
            if label >= num_classes:
                raise TietaError(f"{image} has the label {label}, but the {label_column!r} feature names "
                                 f"{num_classes} classes")
    for split, pairs in items.items():
        if not pairs:
            raise TietaError(f"the {split!r} split of {where} has no rows")
    return Task(root, "datasets", num_classes, class_names, items, " ".join(identity), source)


def _column(dataset: Any, where: str, names: tuple[str, ...], kind: type, what: str) -> str:
    """The column named one of ``names``, else the one feature of type ``kind``."""
    found = next((name for name in names if name in dataset.features), None)
    if found is not None:
        return found
    typed = [name for name, feature in dataset.features.items() if isinstance(feature, kind)]
    if len(typed) != 1:
        have = ", ".join(f"{name} ({type(feature).__name__})" for name, feature in dataset.features.items())
        raise TietaError(f"cannot tell the {what} column of {where}: name it {' or '.join(names)}, or give the "
                         f"dataset one {kind.__name__} feature (it has {have})")
    return typed[0]


def _label(value: Any, where: str, split: str, row: int) -> int:
    if isinstance(value, bool) or not isinstance(value, int):
        raise TietaError(f"row {row} of the {split!r} split of {where} has the label {value!r}, not a class number")
    if value < 0:
        raise TietaError(f"row {row} of the {split!r} split of {where} has the label {value} (unlabelled): "
                         "every image needs a class")
    return value
