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

from tieta.ops.attention import policy_attention
from tieta.ops.rope import rotate


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
    out = policy_attention(q, k, v, attn.scale, policy, bias, eps, attn.attn_drop)  # (B, H, N, hd)
    out = out.transpose(1, 2).reshape(batch, tokens, attn.attn_dim)
    out = attn.norm(out)
    if gate is not None:
        out = out * gate
    return attn.proj_drop(attn.proj(out))


def eva_qkv(attn: nn.Module, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """q, k, v (B, H, N, hd) of a timm ``EvaAttention`` or ``AttentionRope``, before q/k norm and rope.

    Restates timm 1.0's projection step of both (fused ``qkv`` with or without the separate
    ``q_bias``/``v_bias``, or ``q_proj``/``k_proj``/``v_proj``; grouped key/value heads repeated),
    calling the modules so that LoRA on them counts; pinned by the parity tests.
    """
    batch, tokens, _ = x.shape
    heads, kv_heads = attn.num_heads, getattr(attn, "num_kv_heads", attn.num_heads)
    if attn.qkv is not None:
        qkv = attn.qkv(x)
        if getattr(attn, "q_bias", None) is not None:
            qkv = qkv + torch.cat((attn.q_bias, attn.k_bias, attn.v_bias))
        q, k, v = qkv.reshape(batch, tokens, 3, heads, -1).permute(2, 0, 3, 1, 4).unbind(0)
    else:
        q = attn.q_proj(x).reshape(batch, tokens, heads, -1).transpose(1, 2)
        k = attn.k_proj(x).reshape(batch, tokens, kv_heads, -1).transpose(1, 2)
        v = attn.v_proj(x).reshape(batch, tokens, kv_heads, -1).transpose(1, 2)
    return q, k, v


def masked_eva_attention(attn: nn.Module, x: torch.Tensor, policy: torch.Tensor, bias: Optional[torch.Tensor] = None,
                         rope: Optional[torch.Tensor] = None, eps: float = 1e-6) -> torch.Tensor:
    """:func:`masked_attention` for timm's Eva attention (``EvaAttention``, ``AttentionRope``): the
    same masked softmax, with Eva's projections, rotary embedding, sub-LayerNorm and gate.

    Args:
        attn: the block's attention module.
        x: (B, N, D) normalised tokens; policy: (B, N) keep mask; bias: optional (B, 1, 1, N).
        rope: the rope rows of the non-prefix tokens, or None.

    Returns:
        (B, N, D) the attention module's output.
    """
    batch, tokens, _ = x.shape
    gate = attn.gate(x).sigmoid() if getattr(attn, "gate", None) is not None else None
    q, k, v = eva_qkv(attn, x)
    q, k = attn.q_norm(q), attn.k_norm(k)
    if rope is not None:
        half = getattr(attn, "rotate_half", False)
        q, k = rotate(q, rope, attn.num_prefix_tokens, half), rotate(k, rope, attn.num_prefix_tokens, half)
    groups = getattr(attn, "num_kv_groups", 1)
    if groups > 1:
        k, v = k.repeat_interleave(groups, dim=1), v.repeat_interleave(groups, dim=1)
    out = policy_attention(q, k, v, attn.scale, policy, bias, eps, attn.attn_drop)  # (B, H, N, hd)
    out = out.transpose(1, 2).reshape(batch, tokens, -1)
    out = attn.norm(out)
    if gate is not None:
        out = out * gate
    return attn.proj_drop(attn.proj(out))
