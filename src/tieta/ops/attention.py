"""Attention math that token-reduction methods need beside timm's fused attention.

timm's ``Attention`` calls ``F.scaled_dot_product_attention``, which never materialises the
attention probabilities. Two things the baselines need are therefore computed here, from the
``q``, ``k`` (and ``v``) that attention itself uses, i.e. after timm's ``q_norm``/``k_norm``:

- a token score from attention probabilities: the class token's attention row
  (:func:`class_attention`, EViT and DiffRate) or, for models without a class token, the
  attention each token receives (:func:`received_attention`, a labelled deviation);
- DynamicViT's masked softmax (:func:`softmax_with_policy`, :func:`policy_attention`), whose keep
  mask multiplies ``exp(logits)`` so that a straight-through gradient reaches the mask; both
  scores take the same keep mask (``policy``) for the masked forward of a search (DiffRate).

Shapes: B batch, H heads, N tokens including the prefix tokens (class, distillation, registers),
d head width. Prefix tokens sit at indices ``0 .. num_prefix - 1``; the class token, where there
is one, at index 0.
"""

from __future__ import annotations

from typing import Callable

import torch


def _first_query_row(bias: torch.Tensor) -> torch.Tensor:
    """The part of an additive attention bias that applies to query row 0.

    A (B, 1, 1, N) key bias applies to every row unchanged; a full (..., N, N) bias is cut to
    its first row so that it broadcasts against the (B, H, 1, N) class-row logits.
    """
    if bias.dim() >= 2 and bias.shape[-2] != 1:
        return bias[..., :1, :]
    return bias


def class_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    scale: float,
    num_prefix: int,
    bias: torch.Tensor | None = None,
    policy: torch.Tensor | None = None,
) -> torch.Tensor:
    """The class token's attention to the non-prefix tokens, averaged over heads.

    Computes ``softmax(scale * q[:, :, 0:1] @ k^T + bias)`` over all N keys, the row that the
    unfused attention would hold at query index 0, without the N x N matrix. The softmax runs
    in float32 whatever the input dtype, so that scores of half-precision models rank tokens
    as a float32 model would. The probabilities are taken before attention dropout (timm ViTs
    use ``attn_drop=0``).

    Args:
        q: queries (B, H, N, d), after ``q_norm``; index 0 must be the class token.
        k: keys (B, H, N, d), after ``k_norm``.
        scale: the attention's logit scale (timm: ``head_dim ** -0.5``).
        num_prefix: number of prefix tokens (class token first); they are left out of the
            result but stay in the softmax's normaliser.
        bias: optional additive logit bias broadcastable to (B, H, 1, N), e.g. a (B, 1, 1, N)
            ``log(size)`` term of proportional attention; a (..., N, N) bias is cut to row 0.
        policy: optional (B, N) keep mask: row 0 of :func:`softmax_with_policy` instead of the
            plain softmax (masked keys get only the ``eps / N`` share). The class token's own
            column is kept, so the masked softmax's diagonal term plays no part in this row.

    Returns:
        float32 scores (B, N - num_prefix). Together with the class token's attention to the
        prefix tokens they sum to 1, so they sum to less than 1 on their own.

    Raises:
        ValueError: if ``num_prefix < 1`` (there is no class token to take the row of).
    """
    if num_prefix < 1:
        raise ValueError(f"class attention needs a class token at index 0, got num_prefix={num_prefix}")
    # timm's unfused path scales q before the product; doing the same keeps the logits identical
    logits = (q[:, :, :1].float() * scale) @ k.float().transpose(-2, -1)  # (B, H, 1, N)
    if bias is not None:
        logits = logits + _first_query_row(bias).float()
    probs = logits.softmax(dim=-1) if policy is None else softmax_with_policy(logits, policy)
    return probs.mean(dim=1)[:, 0, num_prefix:]


def received_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    scale: float,
    num_prefix: int,
    bias: torch.Tensor | None = None,
    policy: torch.Tensor | None = None,
) -> torch.Tensor:
    """The attention each non-prefix token receives, averaged over heads and query rows.

    A labelled deviation for models without a class token (``class_token=False``, average
    pooling): the EViT/DiffRate criterion, the class token's attention row, is undefined there.
    This score replaces it by the mean of each key column of the attention matrix over all N
    query rows (prefix rows included) and all heads. Every row sums to 1, so the scores of all N
    tokens sum to 1, as a class row does; but the ranking can differ from any class row, and
    the N x N probabilities are materialised (float32, B * H * N * N values).

    Args:
        q: queries (B, H, N, d), after ``q_norm``.
        k: keys (B, H, N, d), after ``k_norm``.
        scale: the attention's logit scale (timm: ``head_dim ** -0.5``).
        num_prefix: number of prefix tokens (registers); they are left out of the result.
        bias: optional additive logit bias broadcastable to (B, H, N, N), e.g. (B, 1, 1, N).
        policy: optional (B, N) keep mask: the attention under :func:`softmax_with_policy`,
            averaged over heads and the query rows still kept (removed tokens' rows left out).

    Returns:
        float32 scores (B, N - num_prefix).
    """
    logits = (q.float() * scale) @ k.float().transpose(-2, -1)  # (B, H, N, N)
    if bias is not None:
        logits = logits + bias.float()
    if policy is None:
        return logits.softmax(dim=-1).mean(dim=(1, 2))[:, num_prefix:]
    keep = policy.float()
    probs = softmax_with_policy(logits, keep)
    rows = keep[:, None, :, None]  # (B, 1, N, 1): queries still in play
    received = (probs * rows).sum(dim=(1, 2)) / (rows.sum(dim=(1, 2)) * probs.shape[1])
    return received[:, num_prefix:]


def softmax_with_policy(logits: torch.Tensor, policy: torch.Tensor, eps: float = 1e-6) -> torch.Tensor:
    """DynamicViT's masked softmax: dropped tokens are hidden as keys, except from themselves.

    With the key mask ``G[b, i, j] = p[b, j] + (1 - p[b, j]) * [i == j]`` and the row maximum
    ``m[b, h, i] = max_j L[b, h, i, j]`` taken over all keys (masked ones included)::

        A = (exp(L - m) * G + eps / N) / (sum_j exp(L - m) * G + eps)

    The mask multiplies ``exp(L - m)`` instead of adding ``-inf`` to the logits, so a
    straight-through gradient of a hard policy reaches the policy. Each row sums to 1; a masked
    key gets only the ``eps / N`` share. Everything is computed in float32 (the reference takes
    the row maximum in the logits' dtype first, which differs only for half-precision logits)
    and returned in the logits' dtype.

    Args:
        logits: attention logits (B, H, N, N), scale and any bias already applied; or the first
            M < N query rows of them, (B, H, M, N) (the class row alone: M = 1).
        policy: keep mask (B, N) or (B, N, 1), 1 = keep, 0 = drop; may carry a gradient.
        eps: the stabiliser; DynamicViT, SPViT and DiffRate use 1e-6 in training.

    Returns:
        attention probabilities, the logits' shape and dtype.
    """
    batch, _, rows, tokens = logits.shape
    if policy.numel() != batch * tokens:
        raise ValueError(f"policy of shape {tuple(policy.shape)} does not fit logits {tuple(logits.shape)}")
    keep = policy.reshape(batch, 1, 1, tokens).float()
    eye = torch.eye(tokens, dtype=torch.float32, device=logits.device)[:rows]  # query i's own key is column i
    gate = keep + (1.0 - keep) * eye  # (B, 1, M, N): key columns masked, the diagonal always open
    logits32 = logits.float()
    shifted = logits32 - logits32.max(dim=-1, keepdim=True).values
    weights = shifted.exp() * gate
    probs = (weights + eps / tokens) / (weights.sum(dim=-1, keepdim=True) + eps)
    return probs.to(logits.dtype)


def policy_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    scale: float,
    policy: torch.Tensor,
    bias: torch.Tensor | None = None,
    eps: float = 1e-6,
    dropout: Callable[[torch.Tensor], torch.Tensor] | None = None,
) -> torch.Tensor:
    """Unfused attention whose softmax is :func:`softmax_with_policy`.

    Computes ``softmax_with_policy(scale * q @ k^T + bias, policy) @ v``: the training path of
    mask-based methods, where dropped tokens are still computed but hidden from the others.
    Evaluation runs on physically gathered tokens instead and can use fused attention.

    Args:
        q: queries (B, H, N, d), after ``q_norm``.
        k: keys (B, H, N, d), after ``k_norm``.
        v: values (B, H, N, d).
        scale: the attention's logit scale (timm: ``head_dim ** -0.5``).
        policy: keep mask (B, N) or (B, N, 1), 1 = keep, 0 = drop; may carry a gradient.
        bias: optional additive logit bias broadcastable to (B, H, N, N).
        eps: the stabiliser of :func:`softmax_with_policy`.
        dropout: applied to the probabilities before ``@ v`` (the attention's ``attn_drop``), or None.

    Returns:
        attention output (B, H, N, d) in the dtype of ``q @ k^T``.
    """
    logits = (q * scale) @ k.transpose(-2, -1)  # (B, H, N, N)
    if bias is not None:
        logits = logits + bias
    probs = softmax_with_policy(logits, policy, eps)
    if dropout is not None:
        probs = dropout(probs)
    return probs @ v
