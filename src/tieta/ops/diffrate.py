"""DiffRate (Chen et al., ICCV 2023): per-block prune and merge rates found by a differentiable search.

Every block first sorts its tokens by class-token attention, then prunes the least important ones and
merges the least important survivors into their most similar kept token. How many tokens each block
keeps is searched with the backbone frozen: per block and per operation, a softmax over candidate kept
numbers gives an expected kept number (rounded up with a straight-through ceil) that drives keep masks
in the attention and a differentiable FLOPs term of the loss ``lambda * (F / 1e9 - target)^2``. After
the search the kept numbers are fixed integers and tokens are gathered physically.

What lives here (pure tensor code, testable on random tensors):
    - :func:`sort_by_importance`: prefix tokens in front, the others by descending importance.
    - :func:`prune_merge`: the evaluation path (prune, then merge; fewer tokens leave than enter).
    - :func:`prune_merge_source`: which input tokens each token holds after it (for pictures).
    - :func:`merge_training`: the search-time merge (tensor length unchanged, masks do the removal).
    - :class:`RateLogits`: the candidates and logits of one block's prune or merge rate.
    - :func:`ceil_ste`, :func:`min_ste`: the straight-through helpers.
    - :func:`search_flops`: the differentiable GMAC count of the blocks.

The searched schedules of the reference ``compression_rate.json`` are plain data in
:mod:`tieta.ops.diffrate_rates` (``PUBLISHED_RATES``).

Choices where this code and the reference code (OpenGVLab/DiffRate) differ or leave room:
    - The reference protects one class token; here ``num_prefix`` leading tokens (class, register,
      distillation tokens) are never scored, pruned, merged or chosen as a merge destination.
    - Ties in the importance sort keep the original order (stable sort); the reference sort is not stable.
    - The keep mask is built as ``hard + (q - q.detach())``: the same value and gradient as the
      reference's ``hard - q.detach() + q``, but its forward is exactly 0 or 1 in floating point.
    - :meth:`RateLogits.keep_mask` covers positions ``[0, length)`` only; the reference mask covers all
      ``P + 1`` positions with hard value 1 beyond ``length``. Those positions are already 0 in the
      running mask, so padding with ones gives the same product and the same gradient.
    - :meth:`RateLogits.kept_number` reads the current logits; the reference keeps the value computed in
      the last training forward (one optimiser step behind).
    - :func:`search_flops` counts in float64 (exact for integer token counts) and leaves the patch
      embedding and the head to the caller (the reference adds ``(P + 1) * D * 3 * p^2`` and
      ``D * classes``).
    - Merge destinations are chosen on the detached, L2-normalised hidden states, as in the reference:
      no gradient flows through the similarities or the merged sizes' similarity factors.
    - At evaluation the merged sizes are not clamped (as in the reference): a negative similarity can
      make a size <= 0, so a caller taking ``log(size)`` for proportional attention must guard it.
"""

from __future__ import annotations

import math
from typing import Sequence, Tuple, Union

import torch
from torch import nn

Count = Union[torch.Tensor, float, int]


class _CeilSTE(torch.autograd.Function):
    """Forward ``ceil``; backward passes the gradient unchanged."""

    @staticmethod
    def forward(ctx, x: torch.Tensor) -> torch.Tensor:
        return torch.ceil(x)

    @staticmethod
    def backward(ctx, grad: torch.Tensor) -> torch.Tensor:
        return grad


class _MinSTE(torch.autograd.Function):
    """Forward ``min(a, b)``; backward sends the full gradient to both inputs."""

    @staticmethod
    def forward(ctx, a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
        return torch.minimum(a, b)

    @staticmethod
    def backward(ctx, grad: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor]:
        return grad, grad


def ceil_ste(x: torch.Tensor) -> torch.Tensor:
    """Straight-through ceil: ``ceil(x)`` forward, identity backward.

    Args:
        x: a tensor of any shape.

    Returns:
        ``ceil(x)``, same shape, with ``d out / d x = 1``.
    """
    return _CeilSTE.apply(x)


def min_ste(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """Straight-through minimum: ``min(a, b)`` forward, the gradient goes to both inputs.

    The reference uses it so that both the prune and the merge rate of a block are credited with the
    tokens the block's MLP sees, whichever of the two is smaller. To keep a third value out of the
    gradient (the reference's token count ``N``), pass it detached.

    Args:
        a: a tensor.
        b: a tensor of the same shape.

    Returns:
        ``torch.minimum(a, b)``, with ``d out / d a = d out / d b = 1``.
    """
    return _MinSTE.apply(a, b)


def sort_by_importance(
    x: torch.Tensor, size: torch.Tensor, scores: torch.Tensor, num_prefix: int
) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Put the prefix tokens first, then the other tokens by descending importance.

    Args:
        x: (B, N, C) tokens.
        size: (B, N, 1) how many patches each token stands for.
        scores: (B, N - num_prefix) importance of the non-prefix tokens (class-token attention).
        num_prefix: number of leading tokens that keep their place.

    Returns:
        ``(x, size, order)``: x (B, N, C) and size (B, N, 1) permuted, and order (B, N) long, the
        source position of each output position (to permute masks or source maps the same way).
    """
    batch, tokens, _ = x.shape
    if scores.shape != (batch, tokens - num_prefix):
        raise ValueError(f"scores must have shape {(batch, tokens - num_prefix)}, got {tuple(scores.shape)}")
    ranked = torch.sort(scores, dim=1, descending=True, stable=True).indices + num_prefix
    prefix = torch.arange(num_prefix, device=x.device).expand(batch, num_prefix)
    order = torch.cat([prefix, ranked], dim=1)
    x = torch.gather(x, 1, order[..., None].expand_as(x))
    size = torch.gather(size, 1, order[..., None])
    return x, size, order


def _match_to_kept(
    x: torch.Tensor, kept_merge: int, num_prefix: int
) -> Tuple[torch.Tensor, torch.Tensor]:
    """Best destination among the first ``kept_merge`` tokens for each token after them.

    Args:
        x: (B, M, C) importance-sorted tokens, M > kept_merge.
        kept_merge: tokens that stay (prefix included); the rest are merged away.
        num_prefix: leading tokens that can never be a destination.

    Returns:
        ``(destination, similarity)``: both (B, M - kept_merge); destination indexes the first
        ``kept_merge`` tokens, similarity is the cosine to it (no gradient).
    """
    if kept_merge <= num_prefix:
        raise ValueError(f"kept_merge ({kept_merge}) must leave a non-prefix destination (num_prefix={num_prefix})")
    with torch.no_grad():
        metric = torch.nn.functional.normalize(x.detach(), dim=-1)
        similarity = metric[:, kept_merge:] @ metric[:, :kept_merge].transpose(1, 2)
        similarity[..., :num_prefix] = -math.inf
        best, destination = similarity.max(dim=-1)
    return destination, best


def prune_merge(
    x: torch.Tensor, size: torch.Tensor, kept_prune: int, kept_merge: int, num_prefix: int
) -> Tuple[torch.Tensor, torch.Tensor]:
    """DiffRate's evaluation-time reduction of importance-sorted tokens.

    Prunes to the first ``kept_prune`` tokens; then, if ``kept_merge`` is smaller than what is left,
    merges each token at positions ``kept_merge .. kept_prune - 1`` into its most similar token among
    the first ``kept_merge`` (cosine of the hidden states, prefix tokens excluded). A destination's
    features become the unweighted mean of itself and the tokens merged into it; its size grows by
    ``similarity * size`` of each of them (no clamp).

    Args:
        x: (B, N, C) tokens sorted by :func:`sort_by_importance`.
        size: (B, N, 1) token sizes in the same order.
        kept_prune: tokens kept by pruning, prefix included (no-op if >= N).
        kept_merge: tokens kept by merging, prefix included (no-op if >= the tokens left).
        num_prefix: leading tokens that are never pruned, merged or merged into.

    Returns:
        ``(x, size)``: (B, N', C) and (B, N', 1) with ``N' = min(N, kept_prune, kept_merge)``.
    """
    if kept_prune < num_prefix:
        raise ValueError(f"kept_prune ({kept_prune}) would drop prefix tokens (num_prefix={num_prefix})")
    x, size = x[:, :kept_prune], size[:, :kept_prune]
    if kept_merge >= x.shape[1]:
        return x, size
    destination, similarity = _match_to_kept(x, kept_merge, num_prefix)
    dst, src = x[:, :kept_merge], x[:, kept_merge:]
    index = destination[..., None]
    merged = dst.scatter_reduce(1, index.expand_as(src), src, reduce="mean", include_self=True)
    scaled = size[:, kept_merge:] * similarity[..., None].to(size.dtype)
    merged_size = size[:, :kept_merge].scatter_reduce(1, index, scaled, reduce="sum", include_self=True)
    return merged, merged_size


def prune_merge_source(
    source: torch.Tensor, x: torch.Tensor, kept_prune: int, kept_merge: int, num_prefix: int
) -> torch.Tensor:
    """Which input tokens each token holds after :func:`prune_merge` (for pictures, as ToMe's
    ``merge_source``): the pruned tokens' rows leave, and each merged token's row joins the row of
    the destination :func:`prune_merge` chooses for it.

    Args:
        source: (B, N, N0) 0/1 membership of the N0 input tokens, in the same (sorted) order as ``x``.
        x: (B, N, C) the sorted tokens :func:`prune_merge` is given (their similarity picks the destinations).
        kept_prune, kept_merge, num_prefix: as for :func:`prune_merge`.

    Returns:
        (B, N', N0) with ``N' = min(N, kept_prune, kept_merge)``; a pruned input token is in no row.
    """
    source, x = source[:, :kept_prune], x[:, :kept_prune]
    if kept_merge >= x.shape[1]:
        return source
    destination, _ = _match_to_kept(x, kept_merge, num_prefix)
    dst, src = source[:, :kept_merge], source[:, kept_merge:]
    return dst.scatter_reduce(1, destination[..., None].expand_as(src), src, reduce="amax", include_self=True)


def prune_merge_destinations(x: torch.Tensor, kept_prune: int, kept_merge: int, num_prefix: int) -> torch.Tensor:
    """Where :func:`prune_merge` puts each importance-sorted token (for dense outputs).

    Args: as :func:`prune_merge`, x: (B, N, C) sorted tokens.

    Returns:
        (B, N) long: the output token each token is or is merged into, -1 where it is pruned.
    """
    batch, tokens = x.shape[:2]
    kept = min(tokens, kept_prune)
    into = torch.full((batch, tokens), -1, dtype=torch.long, device=x.device)
    into[:, :kept] = torch.arange(kept, device=x.device)
    if kept_merge < kept:
        into[:, kept_merge:kept], _ = _match_to_kept(x[:, :kept], kept_merge, num_prefix)
    return into


def merge_training(
    x: torch.Tensor, size: torch.Tensor, active: int, kept_merge: int, num_prefix: int
) -> Tuple[torch.Tensor, torch.Tensor]:
    """DiffRate's search-time merge: same matching as :func:`prune_merge`, tensor length unchanged.

    Only the first ``active`` tokens take part (the ones left after this block's pruning mask). Each
    token at positions ``kept_merge .. active - 1`` is merged into its best destination among the first
    ``kept_merge``, as at evaluation, but it also stays in the tensor, unchanged, for the caller's keep
    mask to remove. Sizes follow the reference's training rule: ``[size_dst, similarity * size_src]``
    clamped to at least 1, then the source part summed into the destinations. Tokens from ``active``
    on are returned unchanged.

    Args:
        x: (B, N, C) tokens sorted by :func:`sort_by_importance`.
        size: (B, N, 1) token sizes in the same order.
        active: tokens still unmasked, prefix included (``min(N_active, int(kept_prune))``).
        kept_merge: tokens kept by merging, prefix included (no-op if >= active).
        num_prefix: leading tokens that are never merged or merged into.

    Returns:
        ``(x, size)``: (B, N, C) ``[merged destinations, untouched sources, inactive tokens]`` and
        (B, N, 1) ``[summed destination sizes, clamped scaled source sizes, inactive sizes]``.
    """
    if kept_merge >= active:
        return x, size
    head, tail = x[:, :active], x[:, active:]
    destination, similarity = _match_to_kept(head, kept_merge, num_prefix)
    dst, src = head[:, :kept_merge], head[:, kept_merge:]
    index = destination[..., None]
    merged = dst.scatter_reduce(1, index.expand_as(src), src, reduce="mean", include_self=True)
    # The clamp keeps log(size) finite in the masked attention; it applies to both parts, as in the reference.
    dst_size = size[:, :kept_merge].clamp(min=1)
    src_size = (size[:, kept_merge:active] * similarity[..., None].to(size.dtype)).clamp(min=1)
    merged_size = dst_size.scatter_reduce(1, index, src_size, reduce="sum", include_self=True)
    x = torch.cat([merged, src, tail], dim=1)
    size = torch.cat([merged_size, src_size, size[:, active:]], dim=1)
    return x, size


class RateLogits(nn.Module):
    """One block's searchable kept number (for pruning or for merging).

    A softmax over logits (initialised to 0: uniform) weights the candidate kept patch numbers
    ``patches, patches - granularity, ...``; the expected number, rounded up with a straight-through
    ceil, plus the prefix tokens is the kept token count. A fixed module (for blocks that never
    compress) has the single candidate ``patches``.

    Args:
        patches: patch tokens entering the first block (P, 196 at 224/16).
        granularity: gap between candidates.
        fixed: a single candidate ``patches`` (the block keeps everything).
        num_prefix: prefix tokens, always kept and added to the expected number.
    """

    candidates: torch.Tensor

    def __init__(self, patches: int, granularity: int = 4, fixed: bool = False, num_prefix: int = 1) -> None:
        super().__init__()
        if fixed:
            candidates = torch.tensor([float(patches)], dtype=torch.float32)
        else:
            candidates = torch.arange(patches, 0, -granularity, dtype=torch.float32)
        self.register_buffer("candidates", candidates)
        self.logits = nn.Parameter(torch.zeros_like(candidates))
        self.num_prefix = num_prefix

    def probabilities(self) -> torch.Tensor:
        """Returns: (C,) softmax of the logits over the candidates."""
        return self.logits.softmax(dim=-1)

    def expected_kept(self) -> torch.Tensor:
        """``ceil_ste(sum_i c_i p_i) + num_prefix``: the kept token count, differentiable in the logits.

        Returns:
            a 0-dim float tensor; its gradient is that of ``sum_i c_i p_i``.
        """
        return ceil_ste(self.candidates @ self.probabilities()) + self.num_prefix

    def keep_probability(self, length: int) -> torch.Tensor:
        """``q_t = sum_{i: c_i + num_prefix > t} p_i``: the probability that position t is kept.

        Args:
            length: number of positions.

        Returns:
            (length,) probabilities, 1 for the prefix positions.
        """
        positions = torch.arange(length, device=self.candidates.device, dtype=self.candidates.dtype)
        kept_by = (positions[:, None] < self.candidates[None, :] + self.num_prefix).to(self.logits.dtype)
        return kept_by @ self.probabilities()

    def keep_mask(self, kept: Count, length: int) -> torch.Tensor:
        """Straight-through keep mask over the first ``length`` sorted positions.

        Args:
            kept: kept token count (``int(kept)`` positions are kept), e.g. :meth:`expected_kept`.
            length: positions covered, the tokens still active before this operation.

        Returns:
            (length,) mask: forward exactly 1 on ``[0, int(kept))`` and 0 on ``[int(kept), length)``;
            gradient that of :meth:`keep_probability`.
        """
        cut = int(kept.detach()) if isinstance(kept, torch.Tensor) else int(kept)
        hard = torch.ones(length, device=self.logits.device, dtype=self.logits.dtype)
        hard[cut:] = 0
        soft = self.keep_probability(length)
        return hard + (soft - soft.detach())

    def kept_number(self) -> int:
        """The kept token count used at inference: ``ceil(sum_i c_i p_i) + num_prefix``."""
        with torch.no_grad():
            return int(self.expected_kept())


def _as_count(value: Count, like: torch.Tensor) -> torch.Tensor:
    """A kept number as a 0-dim tensor of ``like``'s dtype and device (keeps its gradient)."""
    return torch.as_tensor(value).to(dtype=like.dtype, device=like.device)


def search_flops(
    depth: int,
    width: int,
    mlp_hidden: int,
    patches: int,
    num_prefix: int,
    kept_prune: Sequence[Count],
    kept_merge: Sequence[Count],
) -> torch.Tensor:
    """Multiply-accumulates of the transformer blocks, differentiable in the kept numbers.

    Per block, with N tokens entering: attention ``4 N D^2 + 2 N^2 D``; MLP ``2 N' D hidden`` on
    ``N' = min(N, k_prune, k_merge)``; the next block gets ``N'``. The minimum is straight-through:
    its gradient goes to both kept numbers and not to N, so ``dF / dk`` of a block is
    ``2 D hidden + 4 D^2 + 4 N' D`` (its MLP and the next block's attention; the last block:
    ``2 D hidden``). Patch embedding and head are constants left to the caller.

    Args:
        depth: number of blocks.
        width: embedding width D.
        mlp_hidden: MLP hidden width (4 D in ViT).
        patches: patch tokens P.
        num_prefix: prefix tokens; the first block sees ``P + num_prefix`` tokens.
        kept_prune: ``depth`` kept counts of the pruning (tensors from
            :meth:`RateLogits.expected_kept`, or numbers), prefix included.
        kept_merge: ``depth`` kept counts of the merging, likewise.

    Returns:
        a 0-dim float64 tensor of MACs (divide by 1e9 for GMACs).
    """
    if len(kept_prune) != depth or len(kept_merge) != depth:
        raise ValueError(f"need {depth} prune and merge counts, got {len(kept_prune)} and {len(kept_merge)}")
    device = next((k.device for k in (*kept_prune, *kept_merge) if isinstance(k, torch.Tensor)), None)
    tokens = torch.tensor(float(patches + num_prefix), dtype=torch.float64, device=device)
    flops = torch.zeros((), dtype=torch.float64, device=device)
    for prune, merge in zip(kept_prune, kept_merge):
        flops = flops + 4 * tokens * width**2 + 2 * tokens**2 * width
        kept = min_ste(_as_count(prune, tokens), _as_count(merge, tokens))
        # N is detached inside the minimum: a block earns no credit for what later blocks drop.
        tokens = min_ste(tokens.detach(), kept)
        flops = flops + 2 * tokens * width * mlp_hidden
    return flops
