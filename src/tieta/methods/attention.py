"""timm's attention with a pruning policy's masked softmax, for methods that train with masks.

DynamicViT (and DiffRate's search) keep pruned tokens in the tensor during training and mask them
out of attention with a multiplicative mask on exp(logits), through which the straight-through
gradient reaches the policy. timm's fused attention takes only additive masks (log 0 has no
gradient), so this restates timm's ``Attention.forward`` with that one change, calling the
module's own ``qkv``, ``q_norm``, ``k_norm``, ``attn_drop``, ``norm``, ``gate``, ``proj`` and
``proj_drop``. With an all-ones policy it equals timm's attention up to the eps term.
"""

from __future__ import annotations

from typing import Optional

import torch
from torch import nn

from tieta.ops.attention import softmax_with_policy


def masked_attention(attn: nn.Module, x: torch.Tensor, policy: torch.Tensor, bias: Optional[torch.Tensor] = None,
                     eps: float = 1e-6) -> torch.Tensor:
    """Self-attention in which tokens with policy 0 are seen only by themselves.

    Args:
        attn: a timm ``Attention`` module.
        x: (B, N, D) normalised tokens.
        policy: (B, N) keep mask (0/1, may carry a straight-through gradient).
        bias: optional additive (B, 1, 1, N) logits bias (log size).

    Returns:
        (B, N, D) the attention module's output.
    """
    batch, tokens, _ = x.shape
    gate = attn.gate(x).sigmoid() if getattr(attn, "gate", None) is not None else None
    qkv = attn.qkv(x).reshape(batch, tokens, 3, attn.num_heads, attn.head_dim).permute(2, 0, 3, 1, 4)
    q, k, v = qkv.unbind(0)
    q, k = attn.q_norm(q), attn.k_norm(k)
    logits = (q * attn.scale) @ k.transpose(-2, -1)  # (B, H, N, N)
    if bias is not None:
        logits = logits + bias
    weights = attn.attn_drop(softmax_with_policy(logits, policy, eps))
    out = (weights @ v).transpose(1, 2).reshape(batch, tokens, attn.attn_dim)
    out = attn.norm(out)
    if gate is not None:
        out = out * gate
    return attn.proj_drop(attn.proj(out))
