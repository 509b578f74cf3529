"""Pictures of token merging: each final token's group of patches painted over the input image
(ToMe's source tracing)."""

from __future__ import annotations

from pathlib import Path
from typing import Sequence

import numpy as np
import torch
from torch import nn

from tieta.errors import TietaError
from tieta.methods.state import pass_state_named
from tieta.methods import registry
from tieta.report.figure import pyplot, save


@torch.inference_mode()
def merge_groups(model: nn.Module, images: torch.Tensor) -> torch.Tensor:
    """Which final token holds each input patch.

    Args:
        model: a ViT with token merging attached (ToMe or PYRA).
        images: (B, 3, H, W) normalised inputs.

    Returns:
        (B, gh, gw) integer group ids over the patch grid.
    """
    state = pass_state_named(model, "token_state")
    if state is None:
        merging = [method.name for method in registry.METHODS.values() if method.shows_merges]
        raise TietaError(f"this model merges no tokens; attach one of {', '.join(merging)} first")
    was_training, tracing = model.training, state.trace_source
    model.eval()
    state.trace_source = True
    try:
        model(images)
        source = state.source  # (B, N_final, N0)
    finally:
        state.trace_source = tracing
        model.train(was_training)
    if source is None:
        raise TietaError("no block merged any token at this schedule")
    prefix = model.num_prefix_tokens
    if not bool(source[:, :, prefix:].amax(dim=1).all()):  # argmax would give a pruned patch to token 0
        raise TietaError("this model prunes some patches, which no merge group then holds; tieta show-tokens "
                         "draws its decisions")
    groups = source[:, :, prefix:].argmax(dim=1)  # (B, patches): index of the holding token
    grid_h, grid_w = model.patch_embed.grid_size
    return groups.view(-1, grid_h, grid_w)


def paint_groups(image: np.ndarray, groups: np.ndarray) -> np.ndarray:
    """Paint each group with its mean colour and darken the borders between groups.

    Args:
        image: (H, W, 3) uint8.
        groups: (gh, gw) group ids; H and W are multiples of gh and gw.

    Returns:
        (H, W, 3) uint8.
    """
    height, width, _ = image.shape
    cell_h, cell_w = height // groups.shape[0], width // groups.shape[1]
    pixel_groups = np.kron(groups, np.ones((cell_h, cell_w), dtype=groups.dtype))
    painted = np.zeros_like(image, dtype=np.float32)
    for group in np.unique(pixel_groups):
        where = pixel_groups == group
        painted[where] = image[where].mean(axis=0)
    border = np.zeros(pixel_groups.shape, dtype=bool)
    border[:-1] |= pixel_groups[:-1] != pixel_groups[1:]
    border[:, :-1] |= pixel_groups[:, :-1] != pixel_groups[:, 1:]
    painted[border] *= 0.35
    return painted.astype(np.uint8)


def save_merge_figure(images: torch.Tensor, groups: torch.Tensor, path: Path, titles: Sequence[str] = (),
                      caption: str = "") -> None:
    """Write a PNG: each image beside its merged groups.

    Args:
        images: (B, 3, S, S) uint8 images as the model saw them (resized, not normalised).
        groups: (B, gh, gw) from :func:`merge_groups`.
    """
    count = images.shape[0]
    figure, axes = pyplot().subplots(count, 2, figsize=(6, 3 * count), squeeze=False)
    for index in range(count):
        picture = images[index].permute(1, 2, 0).numpy()
        grid = groups[index].numpy()
        axes[index, 0].imshow(picture)
        axes[index, 0].set_title(titles[index] if index < len(titles) else "input", fontsize=8)
        axes[index, 1].imshow(paint_groups(picture, grid))
        axes[index, 1].set_title(f"{len(np.unique(grid))} patch groups", fontsize=8)
        for axis in axes[index]:
            axis.axis("off")
    save(figure, path, caption)


def save_rate_chart(rates: Sequence[float], path: Path, caption: str = "", decision: str = "dispatcher",
                    state: str = "active") -> None:
    """Bar chart of the share of active tokens per dispatcher (as the DyT paper's Figure 5), or of
    another decision's tokens (``decision="location", state="kept"`` for a pruning method)."""
    figure, axis = pyplot().subplots(figsize=(max(4, 0.45 * len(rates) + 1.5), 3))
    axis.bar(range(1, len(rates) + 1), rates, color="#4C72B0")
    axis.set_xlabel(f"{decision} (block order)")
    axis.set_ylabel(f"{state} tokens")
    axis.set_ylim(0, 1)
    axis.set_xticks(range(1, len(rates) + 1))
    save(figure, path, caption)


def save_active_tokens(images: torch.Tensor, masks: list[torch.Tensor], grid: tuple[int, int], path: Path,
                       layers: Sequence[int], caption: str = "", decision: str = "dispatcher",
                       state: str = "active") -> None:
    """Active tokens over sample images (as the DyT paper's Figure 6): inactive patches greyed out;
    or the patches a pruning method still keeps at each location (EViT's and DynamicViT's figures:
    ``decision="location", state="kept"``).

    Args:
        images: (B, 3, S, S) uint8; masks: per decision (B, gh * gw) bool; layers: which to show.
    """
    count = images.shape[0]
    figure, axes = pyplot().subplots(count, len(layers) + 1, figsize=(2.2 * (len(layers) + 1), 2.2 * count), squeeze=False)
    for row in range(count):
        picture = images[row].permute(1, 2, 0).numpy().astype(np.float32)
        axes[row, 0].imshow(picture.astype(np.uint8))
        axes[row, 0].set_title("input", fontsize=8)
        for column, layer in enumerate(layers, start=1):
            active = masks[layer][row].view(grid).numpy()
            cells = np.kron(active, np.ones((picture.shape[0] // grid[0], picture.shape[1] // grid[1]), dtype=bool))
            shown = picture.copy()
            shown[~cells] = shown[~cells] * 0.15 + 255 * 0.25
            axes[row, column].imshow(shown.astype(np.uint8))
            axes[row, column].set_title(f"{decision} {layer + 1}: {active.mean():.0%} {state}", fontsize=8)
    for axis in axes.flat:
        axis.axis("off")
    save(figure, path, caption, dpi=110)


def save_active_frames(frames: torch.Tensor, masks: list[torch.Tensor], grid: tuple[int, int], path: Path,
                       layers: Sequence[int], caption: str = "", decision: str = "dispatcher",
                       state: str = "active") -> None:
    """A strip of a clip's frames with the active tokens of a few decisions marked (the DyT paper's
    Figure 6 for video): the frames along the top row, then one row per decision in ``layers``,
    inactive patches greyed out.

    Args:
        frames: (T, 3, S, S) uint8, as the model saw them (not normalised).
        masks: per decision (T, gh * gw) bool (tieta.video.model.frame_token_masks).
    """
    count = frames.shape[0]
    figure, axes = pyplot().subplots(len(layers) + 1, count, figsize=(1.8 * count + 0.6, 1.9 * (len(layers) + 1)),
                                     squeeze=False)
    for column in range(count):
        picture = frames[column].permute(1, 2, 0).numpy().astype(np.float32)
        axes[0, column].imshow(picture.astype(np.uint8))
        axes[0, column].set_title(f"frame {column + 1}", fontsize=8)
        cell = (picture.shape[0] // grid[0], picture.shape[1] // grid[1])
        for row, layer in enumerate(layers, start=1):
            active = masks[layer][column].view(grid).numpy()
            cells = np.kron(active, np.ones(cell, dtype=bool))
            shown = picture.copy()
            shown[~cells] = shown[~cells] * 0.15 + 255 * 0.25
            axes[row, column].imshow(shown.astype(np.uint8))
            axes[row, column].set_title(f"{decision} {layer + 1}: {active.mean():.0%} {state}", fontsize=8)
    for axis in axes.flat:
        axis.axis("off")
    save(figure, path, caption, dpi=110)
