"""Attentive pooling: one learned query token attends to every token of every frame (DyT's video
head, after VideoMAE v2's ``AttentiveBlock``).

    q = W_q LN_q(query) + b_q            (1 query token, learned, zero at the start)
    k = W_k LN_k(tokens)                 (the key bias is zero: no parameter)
    v = W_v LN_v(tokens) + b_v
    pooled = W_o softmax(q k^T / sqrt(d)) v + b_o     per head, heads concatenated

Three separate LayerNorms (eps 1e-6) for query, keys and values, projections of their own and no
residual: the pooled vector is the attention's output alone.
"""

from __future__ import annotations

from typing import Optional

import torch
import torch.nn.functional as F
from torch import nn

from tieta.errors import TietaError

NORM_EPS = 1e-6  # the ViT's LayerNorm eps, which DyT's code gives the pooling's norms


class AttentivePooling(nn.Module):
    """A learned query token attends to a sequence of tokens; the result is one vector per sequence.

    Args:
        dim: token width C.
        num_heads: attention heads (C must divide by it).
        qkv_bias: learned query and value biases (zero at the start).

    Attributes:
        query: (1, 1, C) the learned query token, zero at the start.
        norm_q, norm_k, norm_v: the LayerNorms of query, keys and values.
        q, k, v: the projections, without bias (``q_bias`` and ``v_bias`` hold theirs).
        proj: the output projection, with bias.
    """

    def __init__(self, dim: int, num_heads: int, qkv_bias: bool = True) -> None:
        super().__init__()
        if num_heads < 1 or dim % num_heads:
            raise TietaError(f"the attentive pooling's {num_heads} heads must divide the backbone's width {dim}")
        self.num_heads = num_heads
        self.query = nn.Parameter(torch.zeros(1, 1, dim))
        self.norm_q = nn.LayerNorm(dim, eps=NORM_EPS)
        self.norm_k = nn.LayerNorm(dim, eps=NORM_EPS)
        self.norm_v = nn.LayerNorm(dim, eps=NORM_EPS)
        self.q = nn.Linear(dim, dim, bias=False)
        self.k = nn.Linear(dim, dim, bias=False)
        self.v = nn.Linear(dim, dim, bias=False)
        self.q_bias: Optional[nn.Parameter] = nn.Parameter(torch.zeros(dim)) if qkv_bias else None
        self.v_bias: Optional[nn.Parameter] = nn.Parameter(torch.zeros(dim)) if qkv_bias else None
        self.proj = nn.Linear(dim, dim)
        for linear in (self.q, self.k, self.v, self.proj):  # DyT's init of every new Linear
            nn.init.trunc_normal_(linear.weight, std=0.02)
        nn.init.zeros_(self.proj.bias)

    def extra_repr(self) -> str:
        return f"num_heads={self.num_heads}"

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        """Args: tokens: (B, M, C). Returns: (B, C), the query token's attention output."""
        batch, count, width = tokens.shape
        heads = self.num_heads
        # one query per sequence, as DyT's code expands it (so a count of FLOPs per clip is exact)
        q = F.linear(self.norm_q(self.query.expand(batch, -1, -1)), self.q.weight, self.q_bias)  # (B, 1, C)
        q = q.reshape(batch, 1, heads, -1).transpose(1, 2)  # (B, H, 1, d)
        k = F.linear(self.norm_k(tokens), self.k.weight)  # zero key bias: none added
        v = F.linear(self.norm_v(tokens), self.v.weight, self.v_bias)
        k = k.reshape(batch, count, heads, -1).transpose(1, 2)  # (B, H, M, d)
        v = v.reshape(batch, count, heads, -1).transpose(1, 2)
        pooled = F.scaled_dot_product_attention(q, k, v)  # (B, H, 1, d), scale 1/sqrt(d)
        return self.proj(pooled.transpose(1, 2).reshape(batch, width))
