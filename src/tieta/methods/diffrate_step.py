"""DiffRate's ``reduce`` step: rank the tokens, sort them, prune and merge (one per block).

The step either holds fixed kept numbers (tokens leave the tensor, in training too) or the two
rate logits of a search, whose masked forward keeps the tokens and removes them through the
token state's running keep mask (``TokenState.policy``). The tensor code is ``tieta.ops.diffrate``;
the scores, ``tieta.ops.attention``. The choices this makes are listed in ``tieta.methods.diffrate``.
"""

from __future__ import annotations

from typing import Callable, Optional

import torch
from torch import nn

from tieta.errors import TietaError
from tieta.methods.blocks import TietaBlock, TokenState, follow_tokens, rotated, take_output
from tieta.methods.tome import size_bias_mask
from tieta.ops.attention import class_attention, received_attention
from tieta.ops.diffrate import (RateLogits, merge_training, prune_merge, prune_merge_destinations, prune_merge_source,
                                sort_by_importance)

# the smallest token size at evaluation, so that log(size) stays finite (see tieta.methods.diffrate)
SIZE_EPS = 1e-6
CRITERIA = ("class", "received")


def masked_class_attention(q: torch.Tensor, k: torch.Tensor, scale: float, num_prefix: int, policy: torch.Tensor,
                           bias: Optional[torch.Tensor] = None) -> torch.Tensor:
    """The class token's row of the search-time masked softmax, averaged over heads.

    ``class_attention`` under the running keep mask (its gradient is not used here).

    Args:
        q, k: (B, H, N, d) after ``q_norm`` / ``k_norm``; index 0 is the class token.
        scale: the attention's logit scale.
        num_prefix: prefix tokens, left out of the result.
        policy: (B, N) keep mask.
        bias: optional additive (B, 1, 1, N) logit bias (log size).

    Returns:
        float32 scores (B, N - num_prefix).
    """
    return class_attention(q, k, scale, num_prefix, bias, policy=policy.detach())


def token_importance(q: torch.Tensor, k: torch.Tensor, scale: float, num_prefix: int, criterion: str,
                     bias: Optional[torch.Tensor] = None, policy: Optional[torch.Tensor] = None) -> torch.Tensor:
    """DiffRate's ranking score of the non-prefix tokens.

    Args:
        q, k: (B, H, N, d) after ``q_norm`` / ``k_norm``.
        scale: the attention's logit scale.
        num_prefix: prefix tokens.
        criterion: "class" (the class token's attention, DiffRate) or "received".
        bias: optional (B, 1, 1, N) log-size bias.
        policy: (B, N) running keep mask of a search, or None.

    Returns:
        float32 scores (B, N - num_prefix); tokens the policy removed score -inf (ranked last).
    """
    score = class_attention if criterion == "class" else received_attention
    if policy is None:
        return score(q, k, scale, num_prefix, bias)
    scores = score(q, k, scale, num_prefix, bias, policy=policy.detach())
    return scores.masked_fill(policy[:, num_prefix:].detach() <= 0, float("-inf"))


# the ranking a step calls: (q, k, scale, num_prefix, criterion, bias, policy) -> (B, N - num_prefix)
Importance = Callable[..., torch.Tensor]


class DiffRateReduce(nn.Module):
    """A block's ``reduce`` step: sort by importance, prune, merge.

    Either fixed kept numbers, or the two rate logits of a search (whose kept numbers are then
    read from the logits until ``fix_rates`` fixes them).

    Args:
        kept_prune: tokens kept by pruning, prefix included (fixed rates).
        kept_merge: tokens kept by merging, prefix included (fixed rates).
        prune_rate: the searchable pruning rate (instead of fixed numbers).
        merge_rate: the searchable merging rate.
        criterion: "class" or "received" (see :func:`token_importance`).
        importance: the ranking it calls (``add_diffrate`` passes the one its module names, so a
            test can watch the queries and keys it is given).

    Attributes:
        searching: while the block is in ``train()`` mode, run the search's masked forward instead
            of gathering tokens.
    """

    prune_rate: Optional[RateLogits]
    merge_rate: Optional[RateLogits]

    def __init__(self, kept_prune: Optional[int] = None, kept_merge: Optional[int] = None,
                 prune_rate: Optional[RateLogits] = None, merge_rate: Optional[RateLogits] = None,
                 criterion: str = "class", importance: Importance = token_importance) -> None:
        super().__init__()
        if (kept_prune is None) != (prune_rate is not None) or (kept_merge is None) != (merge_rate is not None):
            raise ValueError("give either both kept numbers or both rate logits")
        self.kept_prune, self.kept_merge = kept_prune, kept_merge
        self.prune_rate, self.merge_rate = prune_rate, merge_rate
        self.criterion = criterion
        self.importance = importance
        self.searching = prune_rate is not None

    def extra_repr(self) -> str:
        if self.kept_prune is None:
            return f"searched, criterion={self.criterion}"
        return f"kept_prune={self.kept_prune}, kept_merge={self.kept_merge}, criterion={self.criterion}"

    def kept_numbers(self) -> tuple[int, int]:
        """(kept_prune, kept_merge) used when tokens are gathered: the fixed numbers, else the logits'.

        The logits are read on every call (a device sync per block), so that a change to them,
        by a step or by hand, is always seen; ``fix_rates`` ends that.
        """
        if self.kept_prune is not None:
            return self.kept_prune, self.kept_merge
        return self.prune_rate.kept_number(), self.merge_rate.kept_number()

    def forward(self, x: torch.Tensor, block: TietaBlock) -> torch.Tensor:
        """Args: x: (B, N, D) after the attention residual.
        Returns: (B, min(N, kept_prune, kept_merge), D); during a search (B, N, D)."""
        # (B, H, N, hd), rotated as attention used them on a model with rope
        q, k = rotated(block, take_output(block.attn.q_norm)), rotated(block, take_output(block.attn.k_norm))
        if block.training and self.searching:  # the block's mode: a step attached later may not share it yet
            return self._search(x, block, q, k)
        return self._gather(x, block, q, k)

    def _gather(self, x: torch.Tensor, block: TietaBlock, q: torch.Tensor, k: torch.Tensor) -> torch.Tensor:
        """Evaluation (and fixed-rate training): tokens leave the tensor."""
        state, prefix = block.token_state, block.num_prefix_tokens
        kept_prune, kept_merge = self.kept_numbers()
        scores = self.importance(q, k, block.attn.scale, prefix, self.criterion, state.attn_bias)
        tokens = x.shape[1]
        x, size, order = sort_by_importance(x, _sizes(state, x), scores, prefix)
        merges = kept_merge < min(x.shape[1], kept_prune)
        if state.trace_source:  # the input patches each token holds, for pictures (nothing computed changes)
            state.source = prune_merge_source(_sorted_source(state, order), x, kept_prune, kept_merge, prefix)
        into = None
        if state.dense is not None:  # a merged position takes its destination's value on the grid
            sorted_into = prune_merge_destinations(x, kept_prune, kept_merge, prefix)  # (B, N) in sorted order
            into = torch.empty_like(order).scatter_(1, order, sorted_into)
            into = torch.where(into >= 0, into - prefix, -1)[:, prefix:]
        x, size = prune_merge(x, size, kept_prune, kept_merge, prefix)
        # the kept tokens (merge destinations among them) keep their positions
        follow_tokens(block, order[:, prefix:x.shape[1]] - prefix, tokens - prefix, into)
        if merges:
            size = size.clamp(min=SIZE_EPS)  # keeps log(size) finite (module docstring)
        _store_sizes(state, size, x, merges)
        return x

    def _search(self, x: torch.Tensor, block: TietaBlock, q: torch.Tensor, k: torch.Tensor) -> torch.Tensor:
        """The search's forward: tokens stay, the running keep mask (B, N) removes them."""
        state, prefix = block.token_state, block.num_prefix_tokens
        batch, tokens, _ = x.shape
        policy = state.policy
        scores = self.importance(q, k, block.attn.scale, prefix, self.criterion, state.attn_bias, policy)
        x, size, order = sort_by_importance(x, _sizes(state, x), scores, prefix)
        follow_tokens(block, order[:, prefix:] - prefix, tokens - prefix)  # tokens stay, sorted
        active = tokens
        if policy is not None:
            policy = policy.gather(1, order)
            # the mask keeps the same positions in every image; round: it is a float sum
            active = int(round(float(policy[0].detach().sum())))
        kept_prune = self.prune_rate.expected_kept()
        if float(kept_prune.detach()) < active:
            policy = _mask_positions(policy, self.prune_rate.keep_mask(kept_prune, active), batch, tokens)
        left = min(active, int(kept_prune.detach()))
        kept_merge = self.merge_rate.expected_kept()
        merges = float(kept_merge.detach()) < left
        if merges:
            policy = _mask_positions(policy, self.merge_rate.keep_mask(kept_merge, left), batch, tokens)
            x, size = merge_training(x, size, left, int(kept_merge.detach()), prefix)
        state.policy = policy
        _store_sizes(state, size, x, merges)
        return x


def _sizes(state: TokenState, x: torch.Tensor) -> torch.Tensor:
    """The tokens' sizes (B, N, 1): the state's, or ones before the first merge."""
    return state.size if state.size is not None else x.new_ones(x.shape[0], x.shape[1], 1)


def _sorted_source(state: TokenState, order: torch.Tensor) -> torch.Tensor:
    """The traced (B, N, N0) membership in the sorted ``order`` (B, N); the identity before any block traced it."""
    batch, tokens = order.shape
    source = state.source
    if source is None:
        source = torch.eye(tokens, device=order.device)[None].expand(batch, -1, -1)
    return source.gather(1, order[..., None].expand(-1, -1, source.shape[2]))


def _store_sizes(state: TokenState, size: torch.Tensor, x: torch.Tensor, merged: bool) -> None:
    """Give the next blocks the sizes and their log bias; before any merge they are all 1 and stay None."""
    if not merged and state.size is None:
        return
    state.size = size
    state.attn_bias = size_bias_mask(size, x) if state.prop_attn else None


def _mask_positions(policy: Optional[torch.Tensor], mask: torch.Tensor, batch: int, tokens: int) -> torch.Tensor:
    """The running (B, N) policy times a keep mask over its first ``len(mask)`` sorted positions.

    Positions after the mask's length are already 0 in the policy (they were removed earlier), so
    padding the mask with ones there changes neither the product nor its gradient.
    """
    padded = torch.cat([mask, mask.new_ones(tokens - mask.shape[0])])  # (N,)
    if policy is None:
        return padded.expand(batch, tokens).contiguous()
    return policy * padded


def diffrate_steps(model: nn.Module) -> list[DiffRateReduce]:
    """The model's DiffRate steps, one per block."""
    steps = [block.reduce for block in getattr(model, "blocks", ()) if isinstance(block.reduce, DiffRateReduce)]
    if not steps:
        raise TietaError("this model has no DiffRate; call add_diffrate first")
    return steps
