"""A run on a segmentation task: its settings resolved, its image and mask pairs as datasets, its
objective, and its evaluation by mIoU.

``data.kind: segmentation`` (or a folder :func:`tieta.dense.dataset.is_segmentation_task` finds to
be one) trains the segmentation model (``segmentation.head``, UPerNet where the settings leave it
out) with :func:`tieta.dense.model.segmentation_step`: both heads' pixel losses and the methods' own
dense terms (DyT's rate loss). The pairs are read as ``segmentation_data`` says (mmseg's ADE20K
pipeline); each evaluation image is segmented as ``segmentation.eval_mode`` says (sliding windows
or the whole image), its logits resized to the mask's size, and scored by mmseg's metrics. A run's
headline score, ``acc`` in its metrics and summary, is then the mIoU (%), beside ``mIoU``,
``mAcc`` and ``aAcc``; the summary's ``metric`` says "mIoU".
"""

from __future__ import annotations

import copy
import math
from typing import Any, Optional

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.data import DataLoader, Dataset
from tqdm.auto import tqdm

from tieta.dense.config import SegmentationConfig, is_segmentation
from tieta.data.vtab import fingerprint
from tieta.dense.dataset import (SegmentationDataConfig, SegmentationDataset, SegmentationTask, open_segmentation_task,
                                 segmentation_fingerprint)
from tieta.dense.metrics import SegmentationMeter
from tieta.dense.model import slide_inference
from tieta.dense.uperhead import resize
from tieta.errors import TietaError
from tieta.train import distributed
from tieta.train.distributed import SINGLE, Processes
from tieta.train.loop import autocast
from tieta.video.config import is_video

SEGMENTATION = "segmentation"
HEAD = "upernet"  # the head a segmentation folder gets where the settings name none
METRIC = "mIoU"  # a segmentation run's headline score (its "acc")
SCORES = ("mIoU", "mAcc", "aAcc")  # recorded per evaluation, in %
MAX_COST_IMAGES = 8  # evaluation images the cost is counted on: a crop of each


def is_segmentation_run(config) -> bool:
    """Whether a run's settings train on image and mask pairs (``data.kind`` segmentation)."""
    return getattr(config.data, "kind", None) == SEGMENTATION


def with_segmentation_settings(config):
    """A copy of ``config`` for a segmentation task: ``segmentation.head`` UPerNet where unset.

    Raises:
        TietaError: in one sentence, settings of image or video runs (augmentation, a held-out
            fraction, label smoothing, video frames), ignore indices that differ, or a method whose
            own loss has no dense form.
    """
    config = copy.deepcopy(config)
    data = config.data
    if config.segmentation.head is None:
        config.segmentation.head = HEAD
    if is_video(config):
        raise TietaError(f"video.frames builds a video model, but {data.path} is a segmentation task; leave "
                         "video.frames out")
    if data.augment != "none":
        raise TietaError(f"data.augment {data.augment} is for images; a segmentation task's augmentation is "
                         "segmentation_data's (mmseg's resize, crop, flip and photometric distortion)")
    if data.holdout is not None:
        raise TietaError("data.holdout holds images out of a source without a test split; a segmentation task "
                         "names its test pairs (images/validation/, or val.txt or test.txt)")
    if config.optim.label_smoothing:
        raise TietaError("optim.label_smoothing smooths an image's label; a segmentation run's pixel loss has no "
                         "smoothing: leave it at 0")
    if config.segmentation.ignore_index != config.segmentation_data.ignore_index:
        raise TietaError(f"segmentation.ignore_index ({config.segmentation.ignore_index}) and "
                         f"segmentation_data.ignore_index ({config.segmentation_data.ignore_index}) differ: the "
                         "loss must skip the pixels the masks mark; set them to the same label")
    for method in config.method_list:
        if method.objective is not None and method.dense_loss is None:
            raise TietaError(f"{method.name} trains with its own loss, which has no form for segmentation; a "
                             "segmentation run trains with the pixel loss (and a method's own dense term): use another "
                             "method")
    return config


def refuse_head_on_images(config) -> None:
    """Refuse a segmentation model (``segmentation.head``) on a folder of images or clips."""
    if is_segmentation(config):
        raise TietaError(f"segmentation.head builds a segmentation model, but {config.data.path} is no segmentation "
                         "task (images/training/ beside annotations/training/, or train.txt of '<image> <mask>' "
                         "lines); leave segmentation.head out, or give a segmentation task")


def open_segmentation_run_task(config, path: Optional[str] = None) -> SegmentationTask:
    """The segmentation task at ``path`` (default: the run's data.path), opened with the run's
    reduction and ignore index."""
    settings = config.segmentation_data
    return open_segmentation_task(path or config.data.path, settings.reduce_zero_label, settings.ignore_index)


def task_fingerprint(task, splits: tuple[str, ...]) -> str:
    """The fingerprint of what a run reads from its task: a segmentation task's pairs
    (:func:`tieta.dense.dataset.segmentation_fingerprint`), or an image or video task's."""
    return segmentation_fingerprint(task, splits) if isinstance(task, SegmentationTask) else fingerprint(task, splits)


def open_planned_task(path, base: dict):
    """A sweep's segmentation task at ``path``, opened with the reduction and ignore index its base
    settings (dotted keys) give."""
    defaults = SegmentationDataConfig()
    return open_segmentation_task(path, base.get("segmentation_data.reduce_zero_label", defaults.reduce_zero_label),
                                  base.get("segmentation_data.ignore_index", defaults.ignore_index))


def check_crop(config, image_size: int) -> None:
    """Refuse training crops of another size than the model's input."""
    crop = config.segmentation_data.crop_size
    if crop != image_size:
        raise TietaError(f"segmentation_data.crop_size is {crop} but the model takes {image_size} px images; set "
                         "the crop to the input size (img_size), or img_size to the crop")


def segmentation_datasets(config, task: SegmentationTask, image_size: int, mean) -> tuple[Dataset, Dataset]:
    """(training pairs, evaluation pairs) of a segmentation run's task, each decoded when read.

    Args:
        mean: the run's normalisation mean (0-1 scale), the training crops' padding.
    """
    check_crop(config, image_size)
    config.segmentation.window(image_size)  # an evaluation window the model cannot take: before any training
    train = SegmentationDataset(task.split(config.data.train_split), task, config.segmentation_data, True,
                                tuple(mean))
    return train, segmentation_eval_dataset(config, task, config.data.eval_split, mean)


def segmentation_eval_dataset(config, task: SegmentationTask, split: str, mean) -> Dataset:
    """A split's pairs for evaluation: the image rescaled as ``segmentation_data.scale`` says
    (3, H', W'), the mask at its own size (H, W); ``mean``: the run's normalisation mean, what a
    window smaller than the crop is padded with where the cost is counted."""
    return SegmentationDataset(task.split(split), task, config.segmentation_data, False, tuple(mean))


def segment(model: nn.Module, images: torch.Tensor, settings: SegmentationConfig, size: tuple[int, int]
            ) -> torch.Tensor:
    """Logits for normalised ``images`` at ``size`` (the masks' size), as ``settings.eval_mode``
    says.

    "slide": the images padded with zeros (the normalised mean) at the bottom and right to at least
    one crop, the crops' logits averaged (:func:`tieta.dense.model.slide_inference`), the padding cut
    off. "whole": the images resized (bilinear) to the model's input. Then the logits resized
    (bilinear, align_corners False) to ``size``, as mmseg resizes to the original shape.

    Args:
        images: (B, 3, H', W') normalised. Returns: (B, K, *size).
    """
    side = int(model.patch_embed.img_size[0])
    height, width = images.shape[-2:]
    if settings.eval_mode == "whole":
        logits = model(resize(images, (side, side)))
    else:
        crop, stride = settings.window(side)
        padded = F.pad(images, (0, max(crop - width, 0), 0, max(crop - height, 0)))
        logits = slide_inference(model, padded, crop, stride)[..., :height, :width]
    return resize(logits, size)


@torch.inference_mode()
def evaluate_segmentation(model: nn.Module, loader: DataLoader, normalize: nn.Module, device: torch.device,
                          precision: Optional[str], settings: SegmentationConfig, description: str = "eval",
                          processes: Processes = SINGLE) -> dict[str, Optional[float]]:
    """mIoU, mAcc and aAcc (%) of ``model`` over ``loader``'s (image, mask) pairs (one pair a batch:
    the images have their own sizes), areas summed over the processes.

    Returns:
        {"acc": mIoU, "mIoU", "mAcc", "aAcc"}, each in % (None where no class has a value).
    """
    was_training = model.training
    model.eval()
    meter = SegmentationMeter(model.classes, model.ignore_index)
    for images, labels in tqdm(loader, desc=description, leave=False, disable=None if processes.main else True):
        with autocast(device, precision):
            logits = segment(model, normalize(images.to(device)), settings, tuple(labels.shape[-2:]))
        meter.update(logits.argmax(dim=1), labels)
    model.train(was_training)
    areas = distributed.sum_over_processes(meter.areas.reshape(-1).tolist(), processes)
    meter.areas = torch.tensor(areas, dtype=torch.float64).round().long().reshape(meter.areas.shape)
    scores = meter.scores()
    result = {name: _percent(scores[name]) for name in SCORES}
    return {"acc": result[METRIC], **result}


def _percent(value: float) -> Optional[float]:
    return None if math.isnan(value) else 100.0 * value


def cost_crops(dataset: Dataset, indices: list[int], crop: int, limit: int = MAX_COST_IMAGES) -> torch.Tensor:
    """What a segmentation run's cost is counted and timed on: the top-left crop x crop window of
    at most ``limit`` of the evaluation images at ``indices``, spread over them (padded with the
    mean where smaller: normalised, 0), one window being one pass of the model.

    Returns: (n, 3, crop, crop), 0-255 scale."""
    chosen = indices[:: max(1, len(indices) // limit)][:limit]
    crops = []
    for index in chosen:
        image = dataset[index][0][:, :crop, :crop]
        padded = dataset.fill.view(3, 1, 1).expand(3, crop, crop).clone()
        padded[:, :image.shape[1], :image.shape[2]] = image
        crops.append(padded)
    return torch.stack(crops)


def score_fields(result: dict[str, Any]) -> dict[str, Any]:
    """The scores of an evaluation to put in a run's summary: mIoU, mAcc, aAcc and the metric's
    name (nothing for a classifier's evaluation)."""
    if METRIC not in result:
        return {}
    return {"metric": METRIC, **{name: result[name] for name in SCORES}}
