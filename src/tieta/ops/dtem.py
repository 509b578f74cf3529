"""DTEM's soft token merging for training (Lee & Hong, NeurIPS 2024).

DTEM merges tokens by the cosine similarity of a learned, decoupled embedding (the "metric") rather
than of the attention keys. At evaluation it merges as ToMe does (``tieta.ops.merging``); in
training it keeps every token and merges softly, so that the merge decisions pass a gradient to the
embedding:

    assign = soft_assignment(scores, r, candidates, tau_score, tau_select)   # (B, Na, Nb) in [0, 1]
    x, size, active = soft_merge(x, size, metric, r, active, num_prefix, ...)

Rules (the reference's ``DTEMBlock._merge_train`` and ``_select``):
- Only the first ``active`` tokens take part; the prefix tokens (class, distillation, registers)
  are protected, the tokens behind ``active`` (merged away by earlier blocks) pass unchanged.
- The active tokens after the prefix split by position into A (first, third, ...) and B (second,
  fourth, ...): the parity opposite to ToMe's hard split, which counts the class token into A.
- Each A token keeps its ``candidates`` most similar B tokens; r rounds of a softmax over all
  (A token, candidate) pairs pick r pairs softly, each round damping the rows already picked.
- A token's share ``assign[i, j]`` of its size moves into B token j: B tokens become size-weighted
  averages, A tokens keep their features and lose that share of their size.
- The active tokens are then ordered by size, largest first: the r smallest (mostly the A tokens
  merged away) fall behind the new ``active`` count and take no further part in merging, though
  they stay in the sequence and attention sees them weighted by their (small) sizes.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

# the floor of the damping factor, as the reference's (float32 epsilon)
DAMPING_FLOOR = torch.finfo(torch.float32).eps


def default_metric_dim(width: int, heads: int) -> int:
    """The reference's embedding width: one head's width, two heads' from width 1024 on."""
    head_dim = width // heads
    return head_dim if width < 1024 else 2 * head_dim


def soft_merges(active: int, r: int, num_prefix: int) -> int:
    """The merges a soft step makes among ``active`` tokens: at most half the unprotected ones."""
    return max(0, min(r, (active - num_prefix) // 2))


def soft_assignment(scores: torch.Tensor, r: int, candidates: int, tau_score: float,
                    tau_select: float) -> torch.Tensor:
    """A differentiable choice of about r (A, B) pairs to merge: r rounds of a softmax.

    Args:
        scores: (B, Na, Nb) similarity of each A token to each B token.
        r: rounds (pairs chosen).
        candidates: B tokens each A token may merge into (its most similar).
        tau_score: temperature dividing the scores.
        tau_select: temperature of each round's softmax over all candidate pairs.

    Returns:
        (B, Na, Nb) float32 share of each A token assigned to each B token; each row sums to at
        most 1 (a row that the rounds picked more than once is scaled back to 1).

    The rounds run as a Python loop over r: each round's softmax depends on the one before (it
    damps the rows already picked), so they cannot run at once; each round covers the whole batch.
    """
    batch, num_a, num_b = scores.shape
    with torch.autocast(device_type=scores.device.type, enabled=False):  # float32, as the reference
        scores = scores.float()
        index = scores.argsort(dim=-1, descending=True, stable=True)[..., :candidates]  # (B, Na, M)
        logits = scores.gather(dim=-1, index=index) / tau_score
        picked = torch.zeros_like(logits)
        for _ in range(r):
            round_pick = F.softmax(logits.view(batch, -1) / tau_select, dim=-1).view_as(logits)
            picked = picked + round_pick
            # a row picked with weight p is damped by log(1 - p) for the next rounds
            damping = torch.clamp(1 - round_pick.sum(dim=-1, keepdim=True), min=DAMPING_FLOOR)
            logits = logits + torch.log(damping)
    # rows picked more than once in total are scaled back to 1 (the scale carries no gradient)
    picked = picked / (torch.clamp(picked.sum(dim=-1, keepdim=True).detach() - 1, min=0.0) + 1.0)
    return torch.zeros_like(scores).scatter_add(-1, index, picked)


def size_weighted_softmax(logits: torch.Tensor, size: torch.Tensor) -> torch.Tensor:
    """Proportional attention with the sizes multiplying ``exp(logits)``, in float32 (the reference's
    training attention): ``A = exp(L - m) * s / sum_j exp(L - m) * s``.

    It is ``softmax(L + log s)``, except where a soft size is 0: log 0 would cut the gradient that
    the reference's product passes to that size.

    Args:
        logits: (B, H, N, N) scaled attention logits.
        size: (B, N) size of each key token.

    Returns:
        (B, H, N, N) float32 probabilities.
    """
    logits = logits.float()
    weights = (logits - logits.max(dim=-1, keepdim=True).values).exp() * size[:, None, None, :].float()
    return weights / weights.sum(dim=-1, keepdim=True)


def soft_merge(x: torch.Tensor, size: torch.Tensor, metric: torch.Tensor, r: int, active: int, num_prefix: int,
               candidates: int = 3, tau_score: float = 0.1, tau_select: float = 0.1,
               ) -> tuple[torch.Tensor, torch.Tensor, int]:
    """One training block's soft merge (see the module docstring); the token count stays N.

    Args:
        x: (B, N, C) tokens after the attention residual.
        size: (B, N, 1) how much of the input each token holds (ones before the first merge).
        metric: (B, N, M) the decoupled embedding of each token.
        r: merges wanted; clipped to :func:`soft_merges`.
        active: leading tokens (prefix included) that take part.
        num_prefix: leading tokens that are never merged.

    Returns:
        ((B, N, C) tokens, (B, N, 1) sizes, the active count for the next block: active - r).
    """
    r = soft_merges(active, r, num_prefix)
    if r == 0:
        return x, size, active
    metric = metric / metric.norm(dim=-1, keepdim=True)
    a_part, b_part = slice(num_prefix, active, 2), slice(num_prefix + 1, active, 2)
    xa, xb = x[:, a_part], x[:, b_part]  # (B, Na, C), (B, Nb, C)
    wa, wb = size[:, a_part], size[:, b_part]  # (B, Na, 1), (B, Nb, 1)
    scores = metric[:, a_part] @ metric[:, b_part].transpose(-1, -2)  # (B, Na, Nb) cosine
    assign = soft_assignment(scores, r, candidates, tau_score, tau_select)
    moved = assign.transpose(-1, -2).to(x.dtype)  # (B, Nb, Na)
    xb = wb * xb + moved @ (wa * xa)
    wb = wb + moved @ wa
    left = (1 - assign.sum(dim=-1, keepdim=True)).to(size.dtype)  # (B, Na, 1) share an A token keeps
    # forward: clipped to [0, 1] (rounding can leave it just below 0); backward: as if unclipped
    wa = wa * (left + (left.clamp(0.0, 1.0) - left).detach())
    xb = xb / wb
    weights = torch.cat([wa, wb], dim=1)  # (B, Na + Nb, 1)
    tokens = torch.cat([xa, xb], dim=1)
    # largest first; ties keep their order (the reference's unstable sort, stable on the CPU)
    order = weights[..., 0].argsort(dim=-1, descending=True, stable=True)[..., None]
    weights = weights.gather(dim=1, index=order)
    tokens = tokens.gather(dim=1, index=order.expand_as(tokens))
    x = torch.cat([x[:, :num_prefix], tokens, x[:, active:]], dim=1)
    size = torch.cat([size[:, :num_prefix], weights, size[:, active:]], dim=1)
    return x, size, active - r
