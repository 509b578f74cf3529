"""``tieta show-tokens`` on a video run: the share of active tokens per layer over a clip (the DyT
paper's Figure 5) and a strip of the clip's frames with the active tokens marked (its Figure 6)."""

from __future__ import annotations

from pathlib import Path
from typing import Optional

import torch

from tieta.data.transforms import Normalize
from tieta.errors import TietaError
from tieta.methods.state import pass_state_named
from tieta.report.visualize import save_active_frames, save_rate_chart
from tieta.train.video_run import open_run_task
from tieta.video.dataset import VideoDataset
from tieta.video.model import frame_backbone, frame_token_masks

LAYERS_SHOWN = 4  # rows of decisions in the strip


def shown_layers(rates: list[float], count: int = LAYERS_SHOWN) -> list[int]:
    """The strip's rows, in layer order: the ``count`` decisions that skip the most of the clip's
    tokens (where DyT's picture has something to show: the paper's video figure is about what is
    skipped), the earlier first among equals; where fewer than ``count`` skip any, evenly spread
    ones from the first to the last fill the rest."""
    skipping = sorted((i for i, rate in enumerate(rates) if rate < 1.0), key=lambda i: (rates[i], i))
    spread = [round(i * (len(rates) - 1) / max(count - 1, 1)) for i in range(count)]
    return sorted(list(dict.fromkeys(skipping[:count] + spread))[:count])


def first_clip(config, data: Optional[str], split: str) -> Path:
    """The first clip of a split of the run's task (or of ``data``)."""
    if data is None and config.data.path is None:
        raise TietaError("the run names no task folder: give a clip with --clip")
    return Path(open_run_task(config, data).split(split)[0][0])


@torch.inference_mode()
def show_video_tokens(model, config, method, clip: Path, normalization: dict, device: torch.device,
                      rates_png: Path, tokens_png: Path, words: tuple[str, str]) -> list[Path]:
    """Write the two pictures for one clip (its first evaluation view, as the model sees it) and
    return the paths written (the strip only where the masks cover the frames' patch grid)."""
    backbone = frame_backbone(model)
    size = int(backbone.patch_embed.img_size[0])
    views = VideoDataset([(clip, 0)], 1, config.video_data, size, training=False)[0][0]  # (V, T, 3, S, S)
    frames = views[0]
    model = model.to(device).eval()
    inputs = Normalize(normalization).to(device)(frames.to(device))
    masks = [mask.cpu() for mask in frame_token_masks(model, inputs, method.token_masks)]  # per decision (T, N)
    rates = [float(mask.float().mean()) for mask in masks]
    caption = f"{config.model} + {config.method}, {clip.name}: {frames.shape[0]} frames"
    save_rate_chart(rates, rates_png, caption, *words)
    written = [rates_png]
    grid = tuple(backbone.patch_embed.grid_size)
    over_grid = all(mask.shape[1] == grid[0] * grid[1] for mask in masks)
    if over_grid or pass_state_named(backbone, "token_state") is None:
        layers = shown_layers(rates)
        shown = frames.round().clamp(0, 255).to(torch.uint8)
        save_active_frames(shown, masks, grid, tokens_png, layers, caption, *words)
        written.append(tokens_png)
    return written
