"""ToMe's bipartite soft matching and size-weighted merging (Bolya et al., ICLR 2023).

Pure tensor functions, testable on random tensors:

    matching = bipartite_soft_matching(metric, r, num_prefix)   # who merges into whom
    x, size = merge_wavg(matching, x, size)                     # size-weighted average
    source = merge_source(matching, source)                     # which input patches each token holds

Rules: the tokens are split by position into A (even
indices) and B (odd); each A token finds its most similar B token by the cosine of the metric
(attention keys averaged over heads); the r A tokens with the best matches are merged into them.
Prefix tokens (class, distillation, registers) are protected: never merged away nor merged into
(the spec's -inf rows and columns, done by leaving them out of the score matrix).

Output order: the prefix tokens first, in their original order, then the unmerged A tokens in
original order, then the B tokens. With a single class token this is ToMe's order exactly
([unmerged A, B] with the class token first); keeping every prefix token in front (the reference
code moves a distillation token behind the A tokens) is what lets timm's heads find them.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass
from typing import Callable, Optional

import torch
import torch.nn.functional as F

# PYRA's hook: (sources, their destinations) -> modulated sources, all (B, r, C)
Modulation = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]


@dataclass
class Matching:
    """One layer's merge decision for a batch, as rows of the flattened tokens.

    With x of shape (B, N, C) seen as (B * N, C) rows and the output as (B * (N - r), C) rows:

    Attributes:
        kept_rows: (B * (N - r),) the input row each output row starts from, in the output order
            [prefix, unmerged A, B].
        source_rows: (B * r,) the input rows merged away, best match first within each image.
        destination_rows: (B * r,) the output row each of them is added into.
        r: tokens merged away per image.
    """

    kept_rows: torch.Tensor
    source_rows: torch.Tensor
    destination_rows: torch.Tensor
    r: int


def max_merges(num_tokens: int, num_prefix: int) -> int:
    """The most tokens one layer can merge away: half of the unprotected tokens."""
    return max(0, (num_tokens - num_prefix) // 2)


def bipartite_starts(num_prefix: int) -> tuple[int, int]:
    """Positions of the first unprotected A (even) and B (odd) tokens.

    Leaving the prefix out of the sets is the same as giving its rows / columns a score of -inf:
    those tokens can neither be merged nor receive a merge.
    """
    odd_prefix = num_prefix % 2
    return num_prefix + odd_prefix, num_prefix + 1 - odd_prefix


@torch.no_grad()
def bipartite_soft_matching(metric: torch.Tensor, r: int, num_prefix: int = 1) -> Matching:
    """Decide which r tokens merge into which.

    Args:
        metric: (B, N, C) similarity features (keys averaged over heads).
        r: tokens to remove; clipped to ``max_merges(N, num_prefix)``.
        num_prefix: leading tokens that are never merged (class, distillation, registers).
    """
    batch, num_tokens, _ = metric.shape
    r = min(r, max_merges(num_tokens, num_prefix))
    a_start, b_start = bipartite_starts(num_prefix)
    metric = metric / metric.norm(dim=-1, keepdim=True)
    a, b = metric[:, a_start::2], metric[:, b_start::2]
    best_score, best_match = (a @ b.transpose(-1, -2)).max(dim=-1)  # cosine scores (B, Na, Nb) -> (B, Na)
    order = best_score.argsort(dim=-1, descending=True, stable=True)  # (B, Na); ties: lower index first
    sources = order[:, :r]
    unmerged = order[:, r:].sort(dim=1).values
    destinations = best_match.gather(dim=1, index=sources)  # index into B
    # traced (torch.compile, torch.export) the arithmetic goes into the graph; a cache would hand
    # the tracer's fake tensors to later eager calls, or eager tensors to a later trace
    layout = _row_layout.__wrapped__ if torch.compiler.is_compiling() else _row_layout
    rows = layout(batch, num_tokens, num_prefix, a.shape[1], b.shape[1], r, metric.device)
    return Matching(
        kept_rows=torch.cat([rows.prefix, 2 * unmerged + rows.a_offset, rows.b], dim=1).flatten(),
        source_rows=(2 * sources + rows.a_offset).flatten(),
        destination_rows=(destinations + rows.destination_offset).flatten(),
        r=r,
    )


@dataclass
class _RowLayout:
    prefix: torch.Tensor  # (B, P) rows of the prefix tokens
    b: torch.Tensor  # (B, Nb) rows of the B tokens
    a_offset: torch.Tensor  # (B, 1): row of A token i is 2 * i + a_offset
    destination_offset: torch.Tensor  # (B, 1): output row of B token j is j + destination_offset


@functools.lru_cache(maxsize=256)
def _row_layout(batch: int, num_tokens: int, num_prefix: int, num_a: int, num_b: int, r: int,
                device: torch.device) -> _RowLayout:
    """The index arithmetic that depends only on shapes, made once per shape: at batch 1 every
    small operation saved per block is time saved."""
    a_start, b_start = bipartite_starts(num_prefix)
    image = torch.arange(batch, device=device)[:, None]
    return _RowLayout(
        prefix=(torch.arange(num_prefix, device=device) + image * num_tokens),
        b=(b_start + 2 * torch.arange(num_b, device=device) + image * num_tokens),
        a_offset=a_start + image * num_tokens,
        destination_offset=num_prefix + num_a - r + image * (num_tokens - r),
    )


def merge(
    matching: Matching, x: torch.Tensor, modulation: Optional[Modulation] = None, features: Optional[int] = None,
) -> torch.Tensor:
    """Sum each merged token into its destination.

    Args:
        x: (B, N, C).
        modulation: optional PYRA re-activation of the sources (given their destinations) before
            they are added; it sees the first ``features`` channels (all if None), the rest pass.

    Returns:
        (B, N - r, C) in the order [prefix, unmerged A, B].
    """
    batch, num_tokens, channels = x.shape
    rows = x.reshape(batch * num_tokens, channels)
    out = rows.index_select(0, matching.kept_rows)  # (B * (N - r), C)
    src = rows.index_select(0, matching.source_rows)  # (B * r, C)
    if modulation is not None:
        features = features or channels
        dst = out.index_select(0, matching.destination_rows).view(batch, -1, channels)
        src = src.view(batch, -1, channels)
        moved = modulation(src[..., :features], dst[..., :features])
        src = moved if features == channels else torch.cat([moved, src[..., features:]], dim=-1)
        src = src.reshape(-1, channels)
    out.index_add_(0, matching.destination_rows, src)  # in place: out is a fresh copy from index_select
    return out.view(batch, num_tokens - matching.r, channels)


def merge_wavg(
    matching: Matching, x: torch.Tensor, size: Optional[torch.Tensor] = None,
    modulation: Optional[Modulation] = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Merge as a size-weighted average: ``x <- merge(x * size) / merge(size)``.

    Tokens and sizes travel together as one (B, N, C + 1) tensor, so that one set of gathers and
    one scatter serve both (at batch 1 the number of small operations is what costs).

    Args:
        x: (B, N, C) tokens.
        size: (B, N, 1) how many input patches each token stands for; None means all ones.
        modulation: PYRA's re-activation, applied to the size-weighted sources; sizes are not modulated.

    Returns:
        ((B, N - r, C) tokens, (B, N - r, 1) sizes).
    """
    channels = x.shape[-1]
    if size is None:
        weighted = F.pad(x, (0, 1), value=1.0)
    else:
        weighted = torch.cat([x * size, size], dim=-1)
    merged = merge(matching, weighted, modulation, features=channels)
    size = merged[..., channels:]
    return merged[..., :channels] / size, size


def merge_source(matching: Matching, source: Optional[torch.Tensor], num_tokens: int) -> torch.Tensor:
    """Track which input tokens each token holds (ToMe's source tracing, for visualisation).

    Args:
        source: (B, N, N0) 0/1 membership of the N0 input tokens; None means the identity (N = N0).
        num_tokens: N, used when source is None.

    Returns:
        (B, N - r, N0).
    """
    if source is None:
        batch = matching.kept_rows.shape[0] // (num_tokens - matching.r)
        source = torch.eye(num_tokens, device=matching.kept_rows.device)[None].expand(batch, -1, -1)
    return merge(matching, source)
