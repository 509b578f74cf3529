"""ToFu: prune in early blocks, fuse with a norm-preserving merge in later ones (Kim et al., WACV 2024).

ToFu keeps ToMe's bipartite soft matching (``tieta.ops.merging``): the r A tokens whose best B
match is most similar are the ones that go. What happens to them depends on the block:

- pruning (the first half of the blocks): they are dropped, their destinations stay as they were;
- MLERP merging (the later blocks): each destination becomes the mean of itself and the tokens
  matched to it, rescaled to the largest norm among them:

      mean = (x_dst + sum of x_src) / (1 + count)
      x_dst <- mean / ||x_dst|| * max(||x_dst||, ||x_src||, ...)

    m = bipartite_soft_matching(metric, r, num_prefix)                      # tieta.ops.merging
    x = prune(x, m.kept_rows)                                               # (B, N - r, C)
    x = mlerp_merge(x, m.kept_rows, m.source_rows, m.destination_rows)     # (B, N - r, C)

The rescaling divides by the norm the destination had before the merge, as the reference code
(OpenToMe's ``merge(x, mode="tofu")``; the authors published none) does; the paper's MLERP
divides by the norm of the mean itself. Token sizes are not tracked (the reference merges with
that plain mean, never with ToMe's size-weighted one), so no proportional attention follows.
Output order as ``merge``: [prefix, unmerged A, B].
"""

from __future__ import annotations

import torch


def prune(x: torch.Tensor, kept_rows: torch.Tensor) -> torch.Tensor:
    """Drop the matched A tokens.

    Args:
        x: (B, N, C).
        kept_rows: (B * (N - r),) the rows of x (seen as (B * N, C)) that stay, in output order
            (a ``Matching``'s, ``tieta.ops.merging``).

    Returns:
        (B, N - r, C) in the order [prefix, unmerged A, B].
    """
    batch, num_tokens, channels = x.shape
    kept = x.reshape(batch * num_tokens, channels).index_select(0, kept_rows)
    return kept.view(batch, -1, channels)


def mlerp_merge(x: torch.Tensor, kept_rows: torch.Tensor, source_rows: torch.Tensor,
                destination_rows: torch.Tensor) -> torch.Tensor:
    """Merge each matched A token into its B token by the reference's norm-preserving mean.

    Args:
        x: (B, N, C).
        kept_rows: (B * (N - r),) rows of x (as (B * N, C)) that stay, in output order.
        source_rows: (B * r,) rows of x merged away.
        destination_rows: (B * r,) the output row each of them is merged into.

    Returns:
        (B, N - r, C) in the order [prefix, unmerged A, B]; tokens that received nothing are
        unchanged, bit for bit.
    """
    batch, num_tokens, channels = x.shape
    rows = x.reshape(batch * num_tokens, channels)
    out = rows.index_select(0, kept_rows)  # (B * (N - r), C)
    src = rows.index_select(0, source_rows)  # (B * r, C)
    dst = destination_rows
    out_norm = out.norm(dim=-1)  # (B * (N - r),) each destination's norm before the merge
    # the mean of a destination and its sources, as scatter_reduce(mean, include_self) computes it
    total = out.index_add(0, dst, src)
    count = torch.ones_like(out_norm).index_add(0, dst, torch.ones_like(src[:, 0]))
    largest = out_norm.scatter_reduce(0, dst, src.norm(dim=-1), reduce="amax")
    fused = total / count[:, None] / out_norm[:, None] * largest[:, None]
    # a token that received nothing stays itself exactly (x / n * n is not always x in floating point)
    out = torch.where((count > 1)[:, None], fused, out)
    return out.view(batch, -1, channels)


def strategy_blocks(depth: int) -> list[bool]:
    """Which blocks merge (True) rather than prune: the reference's ``i > depth // 2``."""
    return [index > depth // 2 for index in range(depth)]
