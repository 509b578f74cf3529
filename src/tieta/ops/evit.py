"""EViT: keep the attentive tokens, fuse the inattentive ones (Liang et al., ICLR 2022).

In each reduction block, right after the attention residual (before ``norm2``/MLP), the
non-prefix tokens are scored by the class token's attention to them, averaged over heads
(``tieta.ops.attention.class_attention``). The ``ceil(keep_rate * n)`` best of the n scored
tokens are kept, ordered by descending score; the others are fused into one extra token, their
sum weighted by those same scores (not renormalised, so the weights sum to less than 1). The
MLP then runs on ``[prefix tokens, kept tokens, fused token]``. A fused token is an ordinary
token afterwards: the next reduction block scores it and may keep or fuse it again. EViT adds
no parameters and computes the same in training and evaluation; only the keep rate follows a
schedule.

    k = keep_count(n, keep_rate)                          # how many scored tokens stay
    x = evit_reduce(x, scores, keep_rate, num_prefix)     # [prefix, top-k, fused]
    keep_rate = keep_rate_at(epoch, base_rate, start_epoch, epochs)   # warm-up schedule

Deviations from the reference code (``youweiliang/evit``), which knows exactly one prefix
token (the class token at index 0):

- every prefix token (class, distillation, registers) is protected: never scored, kept or
  fused, always in front in its original order;
- in particular a distillation token is never scored; the reference treats everything after
  index 0 as a patch token, so it would score, and could prune or fuse, a distillation token.
"""

from __future__ import annotations

import math

import torch


def keep_count(tokens: int, keep_rate: float) -> int:
    """How many of ``tokens`` scored tokens a reduction block keeps: ``ceil(keep_rate * tokens)``.

    The product is taken in floating point exactly as the reference does, rounding included
    (``keep_count(100, 0.55)`` is 56 because ``0.55 * 100 == 55.00000000000001``), so that
    token counts match the published ones.

    Args:
        tokens: number of scored (non-prefix) tokens entering the block, a previous fused
            token included.
        keep_rate: the keep rate.

    Returns:
        the number of tokens kept (before the fused token is appended).
    """
    return math.ceil(keep_rate * tokens)


def evit_reduce(
    x: torch.Tensor,
    scores: torch.Tensor,
    keep_rate: float,
    num_prefix: int,
    fuse: bool = True,
) -> torch.Tensor:
    """Keep the top-scored tokens of ``x`` and (optionally) fuse the rest into one token.

    With n = N - num_prefix scored tokens and k = ``keep_count(n, keep_rate)``: if k >= n the
    block does nothing and ``x`` itself is returned (no fused token). Otherwise the output is
    ``[x_prefix, x_kept, x_fused]`` where ``x_kept`` are the k tokens of highest score in
    descending-score order (not spatial order) and ``x_fused = sum_j scores_j * x_j`` over the
    other n - k tokens, an un-normalised weighted sum. Gradients flow into ``scores`` through
    the fused token, as in the reference.

    Args:
        x: tokens (B, N, D) after the attention residual of the block.
        scores: per-token scores (B, N - num_prefix), e.g. from ``class_attention``.
        keep_rate: share of the scored tokens to keep, > 0.
        num_prefix: number of prefix tokens at the front of ``x``; they are passed through.
        fuse: append the fused token (EViT's ``--fuse_token``); without it the rest is dropped.

    Returns:
        ``x`` unchanged, or the reduced tokens (B, num_prefix + k + 1, D), or
        (B, num_prefix + k, D) when ``fuse`` is False.

    Raises:
        ValueError: if ``scores`` does not have one score per non-prefix token, or the keep
            rate keeps no token.
    """
    batch, tokens, width = x.shape
    scored = tokens - num_prefix
    if tuple(scores.shape) != (batch, scored):
        raise ValueError(
            f"scores of shape {tuple(scores.shape)} do not fit the {scored} scored tokens of x"
        )
    kept_count = keep_count(scored, keep_rate)
    if kept_count >= scored:
        return x
    if kept_count < 1:
        raise ValueError(f"keep rate {keep_rate} keeps no token out of {scored}")

    prefix, rest = x[:, :num_prefix], x[:, num_prefix:]
    order = kept_order(scores, kept_count)
    kept = rest.gather(1, order.unsqueeze(-1).expand(-1, -1, width))
    if not fuse:
        return torch.cat([prefix, kept], dim=1)

    # Zero weight on the kept tokens turns the sum over all scored tokens into the sum over
    # the complement; an elementwise product and sum (no matmul) keeps it free of TF32.
    is_kept = torch.zeros_like(scores, dtype=torch.bool).scatter(1, order, True)
    compute_dtype = torch.promote_types(x.dtype, torch.float32)
    weights = scores.to(compute_dtype).masked_fill(is_kept, 0.0)
    fused = (rest.to(compute_dtype) * weights.unsqueeze(-1)).sum(dim=1, keepdim=True)
    return torch.cat([prefix, kept, fused.to(x.dtype)], dim=1)


def kept_order(scores: torch.Tensor, kept_count: int) -> torch.Tensor:
    """(B, k) indices of the ``kept_count`` highest scores (B, n), best first: the kept tokens in
    the order :func:`evit_reduce` puts them."""
    return scores.topk(kept_count, dim=1, largest=True, sorted=True).indices


def keep_rate_at(epoch: float, base_rate: float, start_epoch: float = 0, epochs: float = 0) -> float:
    """EViT's keep-rate warm-up: 1 before ``start_epoch``, then a cosine down to ``base_rate``.

    ::

        keep_rate = 1                                                 epoch < start_epoch
                  = base_rate                                         epoch >= start_epoch + epochs
                  = base_rate + (1 - base_rate) * (cos(pi * t / epochs) + 1) / 2, t = epoch - start_epoch

    ``epochs == 0`` therefore means a constant ``base_rate`` from ``start_epoch`` on (the
    fine-tuning script's setting). The reference updates the rate every iteration with
    ``t`` counted in iterations; passing a fractional epoch (iterations done / iterations per
    epoch) gives those values, an integer epoch gives one value per epoch.

    Args:
        epoch: the current (possibly fractional) epoch, counted from 0.
        base_rate: the final keep rate.
        start_epoch: first epoch at which tokens are reduced (reference default 10).
        epochs: length of the cosine warm-up in epochs (reference default 0).

    Returns:
        the keep rate for this epoch.
    """
    if epochs < 0:
        raise ValueError(f"epochs must be >= 0, got {epochs}")
    if epoch < start_epoch:
        return 1.0
    if epoch >= start_epoch + epochs:
        return float(base_rate)
    progress = (epoch - start_epoch) / epochs
    return base_rate + (1.0 - base_rate) * (math.cos(progress * math.pi) + 1) * 0.5
