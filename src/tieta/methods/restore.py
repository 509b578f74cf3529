"""Dense outputs from merged and pruned models: every position of the patch grid gets a value again.

A merging or pruning method leaves fewer tokens than the image has patches, in its own order; a
dense head (segmentation) needs one feature per patch. ``forward_intermediates(...,
output_fmt="NCHW")`` of a model that reduces tokens records, for that pass only, where each
patch of the input grid went, and puts the tokens back on the grid:

    into = destinations(index, patches)          # after a reduction: old patch token -> new token, or -1
    restore.follow(into, count)                  # composed over the blocks
    grid = restore.restore(tokens, block_index)  # (B, N', C) -> (B, P, C)

Rules, per grid position:
- kept (pruning) or a merge destination: the value of the token it still is;
- merged into another token (ToMe, PYRA, PiToMe, DTEM, MCTF, ATC's clusters, FPET, DiffRate's
  merge, ToFu's fusing blocks): the value of the token it was merged into, as ToMe's own
  ``unmerge`` copies a destination back to its sources; composed over blocks, a position follows
  its token through every later merge;
- dropped (EViT, DynamicViT, DiffRate, SPViT, ToFu's pruning blocks): the value the token had at
  the step that dropped it (after the attention residual for steps between attention and MLP,
  the block input for DynamicViT's and SPViT's steps before the block), also where the method
  fuses the dropped tokens into one token (EViT's fused token, SPViT's package); that token
  stands for no position and is left out of the grid.

Why a map and not ToMe's (B, N', P) source matrix: the map "grid position -> current token" is
(B, P) integers, updated with one gather per reduction, and restoring is one gather per output;
the source matrix costs B * N' * P floats and a batched matrix product per merge, and for pruned
positions it holds nothing at all (they belong to no token). The values of dropped positions are
one (B, P, C) tensor, written where a position is dropped.

Nothing here runs unless a dense output is asked for: the methods report their reductions to
:func:`tieta.methods.blocks.follow_tokens`, which records only while ``TokenState.dense`` holds a
:class:`DenseRestore`, so classification speed and FLOPs are unchanged.
"""

from __future__ import annotations

from typing import Callable, Optional

import torch

from tieta.errors import TietaError
from tieta.ops.merging import Matching


def destinations(index: torch.Tensor, patches: int) -> torch.Tensor:
    """Old patch token -> new patch token after a reduction that keeps (and reorders) tokens.

    Args:
        index: (B, P') which of the ``patches`` old patch tokens each new patch token continues
            (``follow_tokens``' index); negative for a token that continues none (a fused token).
        patches: P, the patch tokens before the reduction.

    Returns:
        (B, P) long: the new patch token each old one continues, -1 where it was dropped.
    """
    batch, count = index.shape
    into = index.new_full((batch, patches + 1), -1)
    # tokens that continue no old token all write the spare last column, which is cut off
    into.scatter_(1, index.masked_fill(index < 0, patches), torch.arange(count, device=index.device).expand(batch, -1))
    return into[:, :patches]


def matching_destinations(matching: Matching, batch: int, tokens: int, prefix: int, merged: bool = True
                          ) -> torch.Tensor:
    """Old patch token -> new patch token after a bipartite matching (``tieta.ops.merging``).

    Args:
        matching: the layer's decision, as flattened rows of (B, N) tokens.
        tokens: N, tokens before the merge (prefix included).
        merged: sources go into their destinations (ToMe's merge); False: they are dropped (ToFu's prune).

    Returns:
        (B, N - prefix) long: the new patch token each old patch token is (or was merged into), -1 if dropped.
    """
    rows = matching.kept_rows.new_full((batch * tokens,), -1)
    rows[matching.kept_rows] = torch.arange(matching.kept_rows.shape[0], device=rows.device)
    if merged:
        rows[matching.source_rows] = matching.destination_rows
    rows = rows.view(batch, tokens)
    start = torch.arange(batch, device=rows.device)[:, None] * (tokens - matching.r) + prefix  # row of new patch 0
    return torch.where(rows >= 0, rows - start, -1)[:, prefix:]


class DenseRestore:
    """What one forward pass records to put its tokens back on the full patch grid.

    Attributes:
        prefix: leading tokens (class, distillation, registers), which are not on the grid.
        method: the reducing method's name, for messages.
        token_of: (B, P) long: the current patch token each grid position is (or was merged into),
            -1 once dropped; None while no reduction has happened (the identity).
        dropped: (B, P, C) the value each dropped position had when it was dropped (zeros elsewhere);
            None while nothing was dropped.
        count: patch tokens there are now (prefix not counted), None before the first block.
        entering: the (B, N, C) tokens entering the reduction step that runs now.
        grids: block index -> (token_of, dropped) as that block left them.
    """

    def __init__(self, prefix: int, method: str) -> None:
        self.prefix, self.method = prefix, method
        self.token_of: Optional[torch.Tensor] = None
        self.dropped: Optional[torch.Tensor] = None
        self.count: Optional[int] = None
        self.entering: Optional[torch.Tensor] = None
        self.grids: dict[int, tuple[Optional[torch.Tensor], Optional[torch.Tensor]]] = {}

    def enter(self, x: torch.Tensor) -> None:
        """A reduction step is about to run on ``x`` (B, N, C)."""
        self.entering = x
        if self.count is None:
            self.count = x.shape[1] - self.prefix

    def follow(self, into: torch.Tensor, count: int) -> None:
        """Compose one reduction into the map.

        Args:
            into: (B, P_old) the new patch token each patch token entering the step continues, -1 if dropped.
            count: patch tokens the step leaves (a fused token included).
        """
        x = self.entering
        batch, patches = into.shape
        held = self.token_of  # (B, P) the grid's tokens among those entering the step
        if held is None:
            held = torch.arange(patches, device=into.device).expand(batch, -1)
        alive = held >= 0
        now = into.gather(1, held.clamp(min=0)).masked_fill(~alive, -1)
        lost = alive & (now < 0)  # dropped by this step: keep their value as it is now
        values = x[:, self.prefix:].gather(1, held.clamp(min=0)[..., None].expand(-1, -1, x.shape[-1]))
        before = self.dropped if self.dropped is not None else torch.zeros_like(values)
        self.dropped = torch.where(lost[..., None], values, before)
        self.token_of, self.count = now, count

    def block_done(self, index: int, out: torch.Tensor) -> None:
        """Block ``index`` returned ``out`` (B, N', C): keep the map for its output.

        Raises:
            TietaError: if the block changed the tokens without reporting where they went.
        """
        if self.count is None:
            self.count = out.shape[1] - self.prefix
        if out.shape[1] - self.prefix != self.count:
            raise TietaError(f"{self.method} does not record where its tokens go, so its outputs cannot be put back on "
                             "the patch grid; use forward_intermediates(..., output_fmt='NLC')")
        self.grids[index] = (self.token_of, self.dropped)

    def restore(self, tokens: torch.Tensor, index: int,
                norm: Optional[Callable[[torch.Tensor], torch.Tensor]] = None) -> torch.Tensor:
        """The patch tokens after block ``index`` on the full grid.

        Args:
            tokens: (B, N', C) patch tokens (prefix removed) as block ``index`` left them.
            norm: what was applied to ``tokens`` per token (the final norm), applied to the dropped values too.

        Returns:
            (B, P, C).
        """
        token_of, dropped = self.grids[index]
        if token_of is None:
            return tokens
        channels = tokens.shape[-1]
        grid = tokens.gather(1, token_of.clamp(min=0)[..., None].expand(-1, -1, channels))
        if dropped is None:
            return grid
        if norm is not None:
            dropped = norm(dropped)
        return torch.where(token_of[..., None] >= 0, grid, dropped.to(grid.dtype))
