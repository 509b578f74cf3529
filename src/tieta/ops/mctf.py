"""MCTF: multi-criteria token fusion with one-step-ahead attention (Lee et al., CVPR 2024).

Pure tensor functions, testable on random tensors:

    r = merge_count(N, r, num_prefix)                              # the reference's clamps
    scores = fusion_scores(x, attn, size, num_prefix, taus)        # similarity x informativeness x size
    fusion = bidirectional_matching(scores, r, N, num_prefix)      # who fuses into whom
    x, size, ahead = attention_weighted_fusion(fusion, x, size, attn)   # pooled tokens, fused attention

Rules (the reference, ``mlvlab/MCTF`` ``utils/mctf.py``):

- The tokens are split as in ToMe: A (even positions) and B (odd). Every A-B pair is scored by
  three criteria, each a product of two per-token factors or a cosine, raised to ``1 / tau``
  (``tau = 0`` leaves the criterion out):

      similarity       ((cos(x_a, x_b) + 1) / 2) ** (1 / tau_sim)        on the tokens themselves
      informativeness  (i_a * i_b) ** (1 / tau_info)      i = 1 / (attention received), / its max
      size             (s_a * s_b) ** (1 / tau_size)      s = 1 / size, / its max

  The attention received is the block's attention averaged over heads and queries; the maxima run
  over all tokens of an image, prefix tokens included (the reference's class token is among them).
- Bidirectional matching: the ``r // 2`` A tokens with the best scores fuse into their best B
  token; then the ``r - r // 2`` B tokens (holding what they received) with the best scores to
  the A tokens left fuse into their best one, by the same scores. Output order: the prefix, the A
  tokens left in their original order, then the B tokens left in descending order of their best
  score (the reference's order, which decides the next layer's A/B split).
- Fusion pools each group weighted by attention received x relative size (``a * s / max s``);
  sizes add up. The block's attention map is fused too (one-step-ahead attention): columns of a
  group add up (a softmax over the fused keys), rows are pooled with the tokens' weights.

Prefix tokens (class, distillation, registers) are left out of A and B: never fused, never fused
into, first in the output. With one class token this is the reference's -inf row.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

import torch

# the reference keeps at least this many tokens (prefix included) after a fusion
MIN_TOKENS = 10


def merge_count(num_tokens: int, r: float, num_prefix: int) -> int:
    """How many tokens one fusion removes, clamped as the reference clamps it.

    ``r >= 1`` is a count, ``0 <= r < 1`` a share of the non-prefix tokens (rounded down). At least
    ``MIN_TOKENS`` tokens stay, and at most half of the non-prefix tokens go.

    Args:
        num_tokens: N, prefix tokens included.
        r: the setting.
        num_prefix: leading tokens that are never fused.
    """
    if num_tokens - r < MIN_TOKENS:
        r = num_tokens - MIN_TOKENS
    scored = num_tokens - num_prefix
    count = int(scored * r) if r < 1 else int(r)
    return max(0, min(count, scored // 2))


def bipartite_positions(num_tokens: int, num_prefix: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Positions of the A and B tokens, ToMe's split (``tieta.ops.merging.bipartite_starts``):
    the non-prefix tokens alternate, the first of them going to B when the prefix is odd."""
    odd_prefix = num_prefix % 2
    a_start, b_start = num_prefix + odd_prefix, num_prefix + 1 - odd_prefix
    return torch.arange(a_start, num_tokens, 2), torch.arange(b_start, num_tokens, 2)


def _power(values: torch.Tensor, tau: float) -> torch.Tensor:
    return values ** (1 / tau)


@torch.no_grad()
def fusion_scores(x: torch.Tensor, attn: Optional[torch.Tensor], size: Optional[torch.Tensor], num_prefix: int,
                  tau_sim: float = 1.0, tau_info: float = 20.0, tau_size: float = 40.0) -> torch.Tensor:
    """The multi-criteria score of every A-B pair.

    Args:
        x: (B, N, C) the tokens (their similarity is the first criterion).
        attn: (B, H, N, N) the attention probabilities the tokens are about to use, or None
            (no informativeness).
        size: (B, N, 1) tokens per token, or None (all 1: no size criterion).
        num_prefix: leading tokens left out.
        tau_sim, tau_info, tau_size: temperatures; 0 leaves a criterion out.

    Returns:
        (B, Na, Nb) scores in [0, 1], higher fuses first.
    """
    a_pos, b_pos = (p.to(x.device) for p in bipartite_positions(x.shape[1], num_prefix))
    metric = x / x.norm(dim=-1, keepdim=True)
    if tau_sim:
        similarity = metric[:, a_pos] @ metric[:, b_pos].transpose(-1, -2)
        scores = _power((similarity + 1) / 2, tau_sim)
    else:
        scores = x.new_ones(x.shape[0], len(a_pos), len(b_pos))
    if tau_info > 0 and attn is not None:
        inverse = 1 / attn.mean(dim=(1, 2))  # (B, N)
        inverse = inverse / inverse.max(dim=1, keepdim=True).values
        scores = scores * _power(inverse[:, a_pos, None] * inverse[:, None, b_pos], tau_info)
    if tau_size and size is not None:
        inverse = 1 / size[..., 0]
        inverse = inverse / inverse.max(dim=1, keepdim=True).values
        scores = scores * _power(inverse[:, a_pos, None] * inverse[:, None, b_pos], tau_size)
    return scores


@dataclass
class Fusion:
    """One layer's fusion for a batch: where each input token goes.

    Attributes:
        group: (B, N) the output token each input token is pooled into.
        num_out: N - r, the tokens after the fusion.
    """

    group: torch.Tensor
    num_out: int


@torch.no_grad()
def bidirectional_matching(scores: torch.Tensor, r: int, num_tokens: int, num_prefix: int,
                           bidirectional: bool = True) -> Fusion:
    """Decide which ``r`` tokens fuse into which (see the module docstring).

    Args:
        scores: (B, Na, Nb) from :func:`fusion_scores`.
        r: tokens to remove, at most ``min(Na, Nb)`` (``merge_count`` keeps it there).
        num_tokens: N. num_prefix: leading tokens kept in front.
        bidirectional: A into B, then B into A (the reference's default); False: A into B only.
    """
    batch, num_a, num_b = scores.shape
    device = scores.device
    r1, r2 = (r // 2, r - r // 2) if bidirectional else (r, 0)
    a_pos, b_pos = (p.to(device) for p in bipartite_positions(num_tokens, num_prefix))
    best, best_b = scores.max(dim=-1)  # (B, Na)
    order = best.argsort(dim=-1, descending=True, stable=True)
    sources, left = order[:, :r1], order[:, r1:].sort(dim=1).values  # A indices
    num_left = num_a - r1
    a_out = torch.empty(batch, num_a, dtype=torch.long, device=device)
    a_out.scatter_(1, left, num_prefix + torch.arange(num_left, device=device).expand(batch, -1))
    b_places = num_prefix + num_left + torch.arange(num_b - r2, device=device).expand(batch, -1)
    order2 = torch.arange(num_b, device=device).expand(batch, -1)  # one direction: every B token stays
    if r2:  # second direction: each B token's best A token among those left, by the same scores
        best2, best_a = scores.gather(1, left[..., None].expand(-1, -1, num_b)).max(dim=1)  # (B, Nb)
        order2 = best2.argsort(dim=-1, descending=True, stable=True)
        b_places = torch.cat([num_prefix + best_a.gather(1, order2[:, :r2]), b_places], dim=1)
    b_out = torch.empty_like(b_places).scatter_(1, order2, b_places)
    a_out.scatter_(1, sources, b_out.gather(1, best_b.gather(1, sources)))
    group = torch.empty(batch, num_tokens, dtype=torch.long, device=device)
    group[:, :num_prefix] = torch.arange(num_prefix, device=device)
    group[:, a_pos], group[:, b_pos] = a_out, b_out
    return Fusion(group=group, num_out=num_tokens - r1 - r2)


def pool(fusion: Fusion, x: torch.Tensor, dim: int = 1) -> torch.Tensor:
    """Sum the tokens of each group along ``dim`` (tokens, or an attention map's keys or queries).

    Args:
        x: a tensor with N tokens along ``dim``; the batch along dim 0.

    Returns:
        the same shape with ``fusion.num_out`` along ``dim``.
    """
    dim = dim % x.dim()
    shape = [1] * x.dim()
    shape[0], shape[dim] = fusion.group.shape
    index = fusion.group.view(shape).expand(x.shape)
    out_shape = list(x.shape)
    out_shape[dim] = fusion.num_out
    return x.new_zeros(out_shape).scatter_add_(dim, index, x)


def attention_weighted_fusion(fusion: Fusion, x: torch.Tensor, size: Optional[torch.Tensor],
                              attn: torch.Tensor, ahead: bool = True
                              ) -> tuple[torch.Tensor, torch.Tensor, Optional[torch.Tensor]]:
    """Pool each group weighted by attention received x relative size (the reference's pooling 1).

    With ``w = mean_{h,q} attn * size / max size`` (no gradient)::

        x'    = sum_g w x / sum_g w          size' = sum_g size
        attn' = (sum_g over queries of w * (sum_g over keys of attn)) / sum_g w

    Args:
        x: (B, N, C) tokens; size: (B, N, 1) or None (all 1).
        attn: (B, H, N, N) the attention probabilities of the block the tokens enter.
        ahead: also fuse the attention map (one-step-ahead attention).

    Returns:
        ((B, N', C) tokens, (B, N', 1) sizes, (B, H, N', N') attention or None).
    """
    if size is None:
        size = x.new_ones(x.shape[0], x.shape[1], 1)
    with torch.no_grad():
        received = attn.mean(dim=(1, 2))[..., None]  # (B, N, 1)
        relative = size / size.amax(dim=-2, keepdim=True)
        norm = pool(fusion, received * relative)  # (B, N', 1)
        new_size = pool(fusion, size)
    fused_attn = None
    if ahead:
        fused_attn = pool(fusion, attn, dim=-1)  # keys: (B, H, N, N')
        fused_attn = pool(fusion, fused_attn * received[:, None] * relative[:, None], dim=2) / norm[:, None]
    x = pool(fusion, x * received * relative) / norm
    return x, new_size, fused_attn


def consistency_loss(teacher: torch.Tensor, student: torch.Tensor) -> torch.Tensor:
    """Per-image squared distance of the student's representation to the (detached) teacher's.

    Args: teacher, student: (B, D) final class tokens (after the last norm). Returns: (B,).
    """
    return ((teacher.detach() - student) ** 2).mean(dim=1)
