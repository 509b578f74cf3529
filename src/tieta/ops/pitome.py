"""PiToMe: spectrum-preserving token merging by energy scores (Tran et al., NeurIPS 2024).

Each merging block scores its T unprotected tokens by an energy: with the cosine similarities
``sim`` of their keys (averaged over heads), ``energy_i = mean_j elu(sim_ij - margin, alpha)``; a
token with many close neighbours has a high energy and is redundant, a lone token (an object
part) has a low one. The tokens are ranked by energy, highest first, and
``r = floor(T - T * ratio)`` of them are merged away, with the size-weighted average of ToMe:

- in the first ``ceil(depth / 2)`` blocks (``pitome_bsm``), the ranked tokens are dealt
  alternately to sets A and B, and ToMe's bipartite matching runs on them: the r A tokens with the
  most similar B partners merge into those partners;
- in the later blocks (``pitome``), only the 2r most energetic tokens may merge: dealt alternately
  to A and B, every A token merges into its most similar B token, and the other T - 2r tokens are
  protected.

Output order, as the reference (``hchautran/PiToMe``, ``algo/pitome/merge.py``) writes it after
the prefix tokens: the unmerged A tokens in match order and then B in energy order (first half),
or the protected tokens and then B, both in energy order (second half).

    rows = pitome_matching(metric, ratio, margin, num_prefix, bipartite=True)
    x, size = merge_wavg(Matching(*rows), x, size)      # tieta.ops.merging

Deviation: every prefix token (class, distillation, registers) is protected; the reference
protects the class token only and would merge a distillation token like a patch.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F


def merge_count(tokens: int, ratio: float) -> int:
    """Tokens a block merges away from ``tokens`` unprotected ones: the reference's
    ``floor(T - T * ratio)``, in floating point as it computes it."""
    return math.floor(tokens - tokens * ratio)


def energy_scores(metric: torch.Tensor, margin: float, alpha: float = 1.0) -> tuple[torch.Tensor, torch.Tensor]:
    """Energy of each token and the cosine similarities it comes from.

    Args:
        metric: (B, T, C) keys of the unprotected tokens (any positive multiple of their head mean).
        margin: similarities below it count (almost) nothing.

    Returns:
        ((B, T) energy, (B, T, T) cosine similarity).
    """
    metric = F.normalize(metric, p=2, dim=-1)
    sim = metric @ metric.transpose(-1, -2)
    return F.elu(sim - margin, alpha=alpha).mean(dim=-1), sim


@torch.no_grad()
def pitome_matching(metric: torch.Tensor, ratio: float, margin: float, num_prefix: int = 1,
                    bipartite: bool = True, alpha: float = 1.0
                    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, int]:
    """Decide which tokens merge into which.

    Args:
        metric: (B, N, C) keys averaged (or summed) over heads.
        ratio: share of the unprotected tokens that stay, in [0.5, 1].
        margin: the energy's margin (the reference: 0.75 - 0.75 * block / depth).
        num_prefix: leading tokens that are never merged.
        bipartite: ToMe's matching on the energy-ranked tokens (the first half of the blocks);
            False: the 2r most energetic tokens merge pairwise, the rest are protected.

    Returns:
        The fields of a ``tieta.ops.merging.Matching`` for ``merge_wavg``, with x of shape (B, N, C)
        seen as (B * N, C) rows: kept_rows (B * (N - r),) in the output order [prefix, unmerged A
        or protected, B]; source_rows (B * r,); destination_rows (B * r,) output rows; r. The
        later blocks need r > 0 (their pairs are the 2r most energetic tokens).
    """
    batch, num_tokens, _ = metric.shape
    tokens = num_tokens - num_prefix
    r = merge_count(tokens, ratio)
    energy, sim = energy_scores(metric[:, num_prefix:], margin, alpha)
    order = energy.argsort(dim=-1, descending=True, stable=True)  # (B, T)
    if bipartite:
        a, b = order[:, ::2], order[:, 1::2]
    else:
        a, b = order[:, : 2 * r : 2], order[:, 1 : 2 * r : 2]
    scores = sim.gather(1, a[:, :, None].expand(-1, -1, tokens)).gather(2, b[:, None, :].expand(-1, a.shape[1], -1))
    best_score, best_match = scores.max(dim=-1)  # (B, Na): each A token's most similar B token
    if bipartite:
        edges = best_score.argsort(dim=-1, descending=True, stable=True)
        kept_a, sources = a.gather(1, edges[:, r:]), edges[:, :r]
    else:
        kept_a, sources = order[:, 2 * r :], torch.arange(r, device=metric.device).expand(batch, r)
    destinations = best_match.gather(1, sources)  # index into B
    image = torch.arange(batch, device=metric.device)[:, None]
    prefix = torch.arange(num_prefix, device=metric.device).expand(batch, num_prefix)
    kept = torch.cat([prefix, num_prefix + kept_a, num_prefix + b], dim=1)  # (B, N - r) input positions
    out_tokens = num_tokens - r
    return (
        (kept + image * num_tokens).flatten(),
        (num_prefix + a.gather(1, sources) + image * num_tokens).flatten(),
        (num_prefix + kept_a.shape[1] + destinations + image * out_tokens).flatten(),
        r,
    )


def bipartite_blocks(depth: int) -> list[bool]:
    """Which blocks use ToMe's matching on the ranked tokens: the first ``ceil(depth / 2)``."""
    first = math.ceil(depth * 0.5)
    return [index < first for index in range(depth)]


def default_margins(depth: int) -> list[float]:
    """The reference's margin per block: 0.75 - 0.75 * block / depth."""
    return [.75 - .75 * (index / depth) for index in range(depth)]
