"""Rotary position embeddings that follow the tokens merging and pruning keep (timm's ``Eva`` models).

An Eva model computes one rope tensor per pass for the full patch grid and hands it to every block;
once a block has merged or pruned tokens, row i of that tensor no longer belongs to token i. tieta
therefore tracks, per image, which grid position each remaining patch token stands at, and gives
each block the rope rows of those positions:

    positions = follow(positions, index, batch, patches)   # after a reduction: who stayed where
    rope = rope_at(rope, positions)                        # (B, H or 1, N', d) rows of the positions
    k = rotate(k, rope, prefix, half)                      # keys (or queries) as attention rotates them

Rules: a kept or pruned-and-kept token keeps its own position; a merged token keeps its
destination's (as the size-weighted average keeps the destination's place in the sequence); a token
that stands for many scattered tokens (EViT's fused token) has ``NO_POSITION``, whose rope row is
the identity rotation (sin 0, cos 1), as prefix tokens get none.

A rope tensor holds ``cat([sin, cos], -1)`` rows along its second-last dimension, in any of timm's
shapes: (N, d), (H, N, d) per block of mixed rope, or (B, 1 or H, N, d) after timm's patch dropout.
"""

from __future__ import annotations

from typing import Optional

import torch
from timm.layers.pos_embed_sincos import apply_rot_embed_cat

NO_POSITION = -1


def current_positions(positions: Optional[torch.Tensor], batch: int, patches: int, device: torch.device) -> torch.Tensor:
    """(B, P) grid positions of the patch tokens: ``positions``, or 0..P-1 before any reduction."""
    if positions is not None:
        return positions
    return torch.arange(patches, device=device).expand(batch, patches)


def follow(positions: Optional[torch.Tensor], index: torch.Tensor, patches: int) -> torch.Tensor:
    """The positions after a reduction.

    Args:
        positions: (B, P) positions of the patch tokens before it, None for the full grid in order.
        index: (B, P') which of those P patch tokens each new patch token continues (its own index,
            or its merge destination's); ``NO_POSITION`` for a token that stands at none.
        patches: P (used when ``positions`` is None).

    Returns:
        (B, P') long positions.
    """
    here = current_positions(positions, index.shape[0], patches, index.device)
    taken = here.gather(1, index.clamp(min=0))
    return taken.masked_fill(index < 0, NO_POSITION)


def rope_at(rope: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
    """The rope rows of ``positions``, per image.

    Args:
        rope: (N, d), (H, N, d) or (B, H', N, d) rows ``cat([sin, cos], -1)`` of the pass's grid.
        positions: (B, P) rows to take; ``NO_POSITION`` takes the identity rotation.

    Returns:
        (B, H', P, d), H' 1 for a shared rope, which broadcasts against (B, H, P, hd) queries and keys.
    """
    table = rope if rope.ndim == 4 else rope.reshape(1, -1, *rope.shape[-2:])  # (B or 1, H', N, d)
    rows, width = table.shape[-2], table.shape[-1]
    identity = torch.cat([table.new_zeros(width // 2), table.new_ones(width - width // 2)])  # sin 0, cos 1
    table = torch.cat([table, identity.expand(*table.shape[:2], 1, width)], dim=2)
    batch, count = positions.shape
    table = table.expand(batch, -1, -1, -1)
    index = positions.masked_fill(positions < 0, rows)[:, None, :, None].expand(batch, table.shape[1], count, width)
    return table.gather(2, index)


def rotate(t: torch.Tensor, rope: torch.Tensor, num_prefix: int, half: bool = False) -> torch.Tensor:
    """Queries or keys (B, H, N, hd) rotated as timm's Eva attention rotates them: the prefix tokens
    stay, the others get ``rope`` (of any shape that broadcasts against (B, H, N - prefix, hd))."""
    rotated = apply_rot_embed_cat(t[:, :, num_prefix:], rope, half=half)
    return torch.cat([t[:, :, :num_prefix], rotated], dim=2).type_as(t)
