"""FPET's differentiable checkerboard merge and its binary weights (Kim et al., CVPR 2025).

Pure tensor functions, testable on random tensors:

    split = checkerboard(height, width, device)              # which patches are A, which are B
    matching = diff_matching(metric, split, num_prefix)       # (B, Na, Nb) 0/1, straight-through
    x, size = merge_wavg(matching, x, size, split, num_prefix) # every A token into its best B token
    weight = binary_weight(w)                                 # 1-bit weights, straight-through

Rules: the patch grid is split like a checkerboard; A holds the patches at (even row, even column)
then those at (odd, odd), B those at (odd, even) then (even, odd), each group in row-major order.
Each A token scores every B token by the cosine of the metric (the refined keys); a score passes
when its sigmoid against the mean of the token's two best scores is above 0.5, which only the best
can do (and only when it beats the second strictly). The hard 0/1 matrix is used forward, the
sigmoid's gradient backward. Every A token that passes is added into its B token (size-weighted),
so one merge halves the patch tokens: the output is [prefix, B], in B's order.

Prefix tokens (class, distillation, registers) are never scored, merged away nor merged into, and
stay in front (the reference sets the class column to -inf; leaving them out of the score matrix
is the same).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

import torch

# the 1-bit code of the reference's quantiser: cells split at 0, each value the median of its half
# of a standard normal, +-Phi^-1(3/4)
BINARY_LEVEL = 0.6744897501960817
# the reference's guard against a constant weight
STD_EPS = 1e-5


@dataclass
class Checkerboard:
    """The A and B sets of a patch grid, as indices among the patch tokens (prefix not counted).

    Attributes:
        a: (Na,) patches merged away: (even row, even column), then (odd, odd), row-major.
        b: (Nb,) patches that stay and receive: (odd row, even column), then (even, odd), row-major.
    """

    a: torch.Tensor
    b: torch.Tensor


def checkerboard(height: int, width: int, device: Optional[torch.device] = None) -> Checkerboard:
    """The checkerboard split of a ``height`` x ``width`` patch grid (row-major patch order)."""
    grid = torch.arange(height * width, device=device).view(height, width)
    a = torch.cat([grid[::2, ::2].flatten(), grid[1::2, 1::2].flatten()])
    b = torch.cat([grid[1::2, ::2].flatten(), grid[::2, 1::2].flatten()])
    return Checkerboard(a=a, b=b)


def reference_grid(num_patches: int) -> tuple[int, int]:
    """The grid the reference assumes for ``num_patches`` tokens: 14 wide for 196, else
    floor(sqrt(N)) wide; (height, width). It fits only if height * width == N."""
    width = 14 if num_patches == 196 else int(num_patches ** 0.5)
    return num_patches // width, width


def split_tokens(x: torch.Tensor, split: Checkerboard, num_prefix: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Args: x: (B, prefix + P, C). Returns: A (B, Na, C) and B (B, Nb, C) patch tokens."""
    patches = x[:, num_prefix:]
    return patches.index_select(1, split.a), patches.index_select(1, split.b)


def diff_matching(metric: torch.Tensor, split: Checkerboard, num_prefix: int) -> torch.Tensor:
    """FPET's differentiable bipartite matching.

    Args:
        metric: (B, prefix + P, C) similarity features (the refined keys, mean over heads).

    Returns:
        (B, Na, Nb) matching matrix: 1 where an A token merges into a B token, else 0 (each row
        has at most one 1); its gradient is the sigmoid's (straight-through).
    """
    metric = metric / metric.norm(dim=-1, keepdim=True)
    a, b = split_tokens(metric, split, num_prefix)
    scores = a @ b.transpose(-1, -2)  # (B, Na, Nb) cosine
    best_two = scores.topk(2, dim=-1).values  # (B, Na, 2)
    soft = torch.sigmoid(scores - best_two.mean(dim=-1, keepdim=True))
    hard = (soft > 0.5).to(soft.dtype)
    return soft + (hard - soft).detach()


def merge(matching: torch.Tensor, x: torch.Tensor, split: Checkerboard, num_prefix: int) -> torch.Tensor:
    """Add each A token into the B token it matched.

    Args:
        matching: (B, Na, Nb) from :func:`diff_matching`.
        x: (B, prefix + P, C).

    Returns:
        (B, prefix + Nb, C): the prefix tokens, then ``B + matching^T A``.
    """
    a, b = split_tokens(x, split, num_prefix)
    merged = b + matching.transpose(1, 2).to(x.dtype) @ a
    return torch.cat([x[:, :num_prefix], merged], dim=1)


def merge_wavg(matching: torch.Tensor, x: torch.Tensor, size: Optional[torch.Tensor], split: Checkerboard,
               num_prefix: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Merge as a size-weighted average: ``x <- merge(x * size) / merge(size)``.

    Tokens and sizes go through one product as a (B, N, C + 1) tensor.

    Args:
        x: (B, prefix + P, C) tokens.
        size: (B, prefix + P, 1) input patches per token; None means all ones.

    Returns:
        ((B, prefix + Nb, C) tokens, (B, prefix + Nb, 1) sizes).
    """
    channels = x.shape[-1]
    if size is None:
        size = torch.ones_like(x[..., :1])
    merged = merge(matching, torch.cat([x * size, size], dim=-1), split, num_prefix)
    size = merged[..., channels:]
    return merged[..., :channels] / size, size


def binary_weight(weight: torch.Tensor) -> torch.Tensor:
    """The reference's 1-bit fake quantisation of a weight matrix (``QLinear`` with bits=1).

    The weight is standardised, replaced by +-BINARY_LEVEL by its sign (0 stays 0), and scaled
    back; forward uses the binary values, backward passes the gradient straight through to the
    standardised weight (and through its mean and unbiased standard deviation).

    Args: weight: (out, in). Returns: (out, in).
    """
    mean, std = weight.mean(), weight.std()
    standard = (weight - mean) / (std + STD_EPS)
    binary = torch.sign(standard) * BINARY_LEVEL
    return (binary.detach() + standard - standard.detach()) * std + mean
