"""A run on a video task: which kind of data a run's folder holds, and its clips as datasets.

``data.kind`` says "image", "video" or "segmentation"; left out, it is what ``data.path`` holds (a
folder of clips, :func:`tieta.video.dataset.is_video_task`, is a video task; images with label
masks, :func:`tieta.dense.dataset.is_segmentation_task`, a segmentation task:
:mod:`tieta.train.segmentation_run`), and the run's config.yaml records what it resolved to. A video run's model is the image backbone on every frame (``video.frames``, taken
from ``video_data.frames`` where unset); its clips are sampled, augmented and viewed as
``video_data`` says (:class:`tieta.video.dataset.VideoDataConfig`).
"""

from __future__ import annotations

import copy
from typing import Optional

import torch
from torch.utils.data import Dataset

from tieta.data.vtab import Task, open_task
from tieta.dense.dataset import is_segmentation_task
from tieta.errors import TietaError
from tieta.train.segmentation_run import (SEGMENTATION, is_segmentation_run, open_segmentation_run_task,
                                          refuse_head_on_images, with_segmentation_settings)
from tieta.video.config import is_video
from tieta.video.dataset import VideoDataset, is_video_task, open_video_task

VIDEO = "video"
IMAGE = "image"
# what a folder holds, for the sentence that refuses another kind: found -> asked -> words
HOLDS = {VIDEO: "is a folder of clips", SEGMENTATION: "is a segmentation task (images with label masks)"}
HOLDS_NO = {VIDEO: "holds no clips (a video task has train.txt naming clips, or train/<class>/ folders of them)",
            SEGMENTATION: "holds no label masks (a segmentation task has images/training/ beside "
                          "annotations/training/, or train.txt of '<image> <mask>' lines)"}
MAX_COST_CLIPS = 8  # clips FLOPs are counted on: each is T backbone passes


def with_data_kind(config):
    """``config`` with ``data.kind`` resolved from ``data.path`` where unset, and a video run's
    ``video.frames`` from ``video_data.frames`` (a copy where anything changes).

    Raises:
        TietaError: in one sentence, a data.kind other than what the folder holds (clips, a
            segmentation task, images), frames that disagree, or image-only settings on clips or a
            segmentation task.
    """
    data = config.data
    if data.path is None:  # datasets given to fit in Python: images
        if data.kind in (VIDEO, SEGMENTATION):
            raise TietaError(f"data.kind {data.kind} needs data.path, a task folder; datasets given to fit are "
                             "images")
        refuse_head_on_images(config)
        return config
    found = VIDEO if is_video_task(data.path) else SEGMENTATION if is_segmentation_task(data.path) else IMAGE
    if data.kind is not None and data.kind != found:
        holds = HOLDS[found] if found != IMAGE else HOLDS_NO[data.kind]
        raise TietaError(f"data.kind is {data.kind} but {data.path} {holds}; set data.kind: {found}, or leave it out")
    if found == SEGMENTATION:
        config = with_segmentation_settings(config)
        config.data.kind = found
        return config
    refuse_head_on_images(config)
    config = copy.deepcopy(config)
    config.data.kind = found
    if found == IMAGE:
        if is_video(config):
            raise TietaError(f"video.frames builds a video model, but {data.path} holds images; leave video.frames "
                             "out, or give a folder of clips")
        return config
    frames = config.video_data.frames
    if config.video.frames is None:
        config.video.frames = frames
    elif config.video.frames != frames:
        raise TietaError(f"video.frames ({config.video.frames}) and video_data.frames ({frames}) differ: the model "
                         "takes the clips' frames; set one of them")
    if data.augment != "none":
        raise TietaError(f"data.augment {data.augment} is for images; a video task's augmentation is "
                         f"video_data.style ({config.video_data.style})")
    if data.holdout is not None:
        raise TietaError("data.holdout holds images out of a source without a test split; a video task names its "
                         "test clips (test.txt, val.txt or test/<class>/ folders)")
    return config


def is_video_run(config) -> bool:
    """Whether a run's settings train on clips (``data.kind`` video)."""
    return getattr(config.data, "kind", None) == VIDEO


def open_run_task(config, path: Optional[str] = None) -> Task:
    """The task of a run (``path``, or its data.path): clips for a video run, image and mask pairs
    for a segmentation run, else images (with the run's held-out fraction where the data is its
    own)."""
    if is_segmentation_run(config):
        return open_segmentation_run_task(config, path)
    if is_video_run(config) or is_video(config):
        return open_video_task(path or config.data.path)
    return open_task(path or config.data.path, config.data.holdout if path in (None, config.data.path) else None)


def video_datasets(config, task: Task, image_size: int) -> tuple[Dataset, Dataset]:
    """(training clips, evaluation clips' views) of a video run's task, each clip decoded when read."""
    train = VideoDataset(task.split(config.data.train_split), task.num_classes, config.video_data, image_size, True)
    return train, video_eval_dataset(config, task, config.data.eval_split, image_size)


def video_eval_dataset(config, task: Task, split: str, image_size: int, num_classes: Optional[int] = None) -> Dataset:
    """A split's clips as their evaluation views, (V, T, 3, S, S) each; their labels within
    ``num_classes`` (a model's; default the task's)."""
    return VideoDataset(task.split(split), num_classes or task.num_classes, config.video_data, image_size, False)


def cost_inputs(dataset: Dataset, indices: list[int]) -> torch.Tensor:
    """The inputs a run's cost is measured on: images (n, 3, S, S), or for evaluation clips the
    first view of each of at most MAX_COST_CLIPS, (n, T, 3, S, S) (a clip costs what one view does)."""
    first = dataset[indices[0]][0]
    if first.ndim != 5:
        return torch.stack([first] + [dataset[i][0] for i in indices[1:]])
    chosen = indices[:: max(1, len(indices) // MAX_COST_CLIPS)][:MAX_COST_CLIPS]
    return torch.stack([dataset[i][0][0] for i in chosen])
