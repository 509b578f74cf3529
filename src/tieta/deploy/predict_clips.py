"""Classifying clips with a video run or its export: ``tieta predict RUN CLIP.mp4 ...``.

Each clip is prepared as the run evaluates its test clips: its views (``video_data``: temporal x
spatial, tieta.video.dataset), normalised as the run's images are, and scored by the mean of its
views' logits (the reference's multi-view evaluation). A clip that cannot be read is reported and
skipped, and the others are classified.
"""

from __future__ import annotations

from pathlib import Path
from typing import Callable, Optional

import torch
from tqdm.auto import tqdm

from tieta.data.transforms import Normalize
from tieta.device import resolve_device
from tieta.errors import TietaError
from tieta.files import files_named
from tieta.train.config import from_dict
from tieta.video.clips import CLIP_SUFFIXES
from tieta.video.dataset import VideoDataConfig, VideoDataset
from tieta.video.model import VideoModel
from tieta.video.views import mean_over_views


def clip_files(paths: list[str | Path], skip: Callable[[Path, str], None]) -> list[Path]:
    """The clip files named, and the clips inside the folders named (recursively, sorted)."""
    return files_named(paths, skip, CLIP_SUFFIXES)


def clip_views(path: Path, settings: VideoDataConfig, image_size: int) -> torch.Tensor:
    """One clip's evaluation views, (V, T, 3, S, S) float32 on the 0-255 scale.

    Raises:
        TietaError: the clip is corrupt, truncated, not a video or over ``settings.max_pixels``.
    """
    return VideoDataset([(path, 0)], 1, settings, image_size, training=False)[0][0]


@torch.inference_mode()
def predict_clips(predictor, paths: list[str | Path], top_k: int, batch_size: int, device: str,
                  skip: Callable[[Path, str], None], result):
    """Fill ``result`` (tieta.deploy.predict.Predictions) with each readable clip's ``top_k``
    (class name, probability) pairs, best first, ``batch_size`` clips a pass."""
    files = clip_files(paths, skip)
    if not files:
        raise TietaError("no clips to classify" + (f" ({len(result.skipped)} paths skipped)" if result.skipped else ""))
    target = resolve_device(device)
    model = predictor.model.to(target)
    normalize = Normalize(predictor.normalization).to(target)
    chunk: list[Path] = []
    views: list[torch.Tensor] = []

    def classify() -> None:
        logits = mean_over_views(model, normalize(torch.stack(views).to(target)))  # (b, classes)
        probabilities = logits.float().softmax(dim=-1)
        values, indices = probabilities.topk(min(top_k, probabilities.shape[-1]), dim=-1)
        for path, row_values, row_indices in zip(chunk, values.tolist(), indices.tolist()):
            result.rows.append((path, [(predictor.name(i), p) for i, p in zip(row_indices, row_values)]))

    for path in tqdm(files, desc="classifying", unit="clip", disable=None):
        try:
            views.append(clip_views(path, predictor.video, predictor.img_size))
            chunk.append(path)
        except TietaError as error:
            skip(path, str(error))
        if len(chunk) == batch_size:
            classify()
            chunk, views = [], []
    if chunk:
        classify()
    if not result.rows:
        raise TietaError(f"no clip could be read ({len(files)} tried, each named above with why)")
    return result


def video_settings_of(model, config: Optional[dict]) -> Optional[VideoDataConfig]:
    """A video model's clip settings (the run's ``video_data``; the defaults where an older run has
    none); None for an image model."""
    if not isinstance(model, VideoModel):
        return None
    settings = from_dict(VideoDataConfig, dict((config or {}).get("video_data") or {}), "video_data.")
    settings.check(prefix="video_data.")
    return settings
