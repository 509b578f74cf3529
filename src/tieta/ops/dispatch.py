"""DyT's token dispatch as pure tensor functions: which tokens are active, and running a module on
the active tokens only (real skipping), for token-wise modules and for attention.

    mask = dispatch_mask(logits, tau, training)       # (B, N) Gumbel-sigmoid, straight-through
    x = run_on_active(fn, x, active)                  # real skipping of a token-wise module
    x = attend_on_active(attn, x, active, bias)       # real skipping of attention (ragged batches)
"""

from __future__ import annotations

from typing import Callable, Optional

import torch


def dispatch_mask(logits: torch.Tensor, tau: float, training: bool, draw: Optional[Callable[..., torch.Tensor]] = None
                  ) -> torch.Tensor:
    """Which tokens are active.

    Args:
        logits: (B, N) dispatcher outputs.
        tau: temperature of the Gumbel-sigmoid in training.
        training: Gumbel noise, hard threshold and straight-through gradient
            (``hard - y.detach() + y``); otherwise ``sigmoid(logits) > 0.5``, no noise.
        draw: ``draw(shape, batch_dim=, device=, dtype=)`` gives the uniform noise (default
            ``torch.rand(shape)``); data-parallel training draws it for the global batch.

    Returns:
        (B, N) float mask of exact 0s and 1s (carrying y's gradient in training).
    """
    if not training:
        return (logits > 0).to(logits.dtype)  # sigmoid(l) > 0.5 <=> l > 0
    shape = (2, *logits.shape)
    uniform = (draw(shape, batch_dim=1, device=logits.device, dtype=logits.dtype) if draw is not None else
               torch.rand(*shape, device=logits.device, dtype=logits.dtype)).clamp_(1e-6, 1 - 1e-6)
    gumbel = -torch.log(-torch.log(uniform))
    soft = torch.sigmoid((logits + gumbel[0] - gumbel[1]) / tau)
    hard = (soft > 0.5).to(soft.dtype)
    return hard - soft.detach() + soft


def with_prefix(mask: torch.Tensor, num_prefix: int) -> torch.Tensor:
    """(B, N_patch) mask -> (B, N, 1) with the prefix tokens always active."""
    if num_prefix:
        mask = torch.cat([mask.new_ones(mask.shape[0], num_prefix), mask], dim=1)
    return mask[..., None]


def run_on_active(fn: Callable[[torch.Tensor], torch.Tensor], x: torch.Tensor, active: torch.Tensor) -> torch.Tensor:
    """``fn`` (token-wise) on the active tokens only, zeros elsewhere: all images' active tokens
    are packed into one (T, D) batch, so ragged counts cost nothing extra.

    Args:
        x: (B, N, D); active: (B, N) bool.

    Returns:
        (B, N, D'): fn's output at active tokens, 0 at the others.
    """
    batch, tokens, width = x.shape
    rows = active.reshape(-1).nonzero().squeeze(1)
    out = fn(x.reshape(batch * tokens, width).index_select(0, rows))
    full = out.new_zeros(batch * tokens, out.shape[-1])
    return full.index_copy_(0, rows, out).view(batch, tokens, -1)


def attend_on_active(attn: Callable[..., torch.Tensor], x: torch.Tensor, active: torch.Tensor,
                     bias: Optional[torch.Tensor] = None, with_order: bool = False) -> torch.Tensor:
    """Self-attention among each image's active tokens only; zeros at inactive tokens.

    Active tokens are packed to the front of a (B, L, D) tensor, L the largest active count;
    padding is masked out of the keys (batch 1 has no padding at all).

    Args:
        attn: the attention branch, called as ``attn(tokens, additive_mask_or_None)``.
        x: (B, N, D) normalised tokens; active: (B, N) bool.
        bias: optional (B, 1, 1, N) additive key bias (proportional attention).
        with_order: call ``attn(tokens, mask, order)``, order (B, L) the index in ``x`` of each
            packed token (attention with rotary embeddings needs the packed tokens' positions).
    """
    batch, tokens, width = x.shape
    counts = active.sum(dim=1)
    length = int(counts.max())
    if length == 0:
        return x.new_zeros(x.shape)
    order = active.to(torch.int8).argsort(dim=1, descending=True, stable=True)[:, :length]  # actives first
    packed = x.gather(1, order[..., None].expand(-1, -1, width))
    valid = torch.arange(length, device=x.device)[None] < counts[:, None]  # (B, L)
    mask = None
    if bias is not None:
        mask = bias.gather(3, order[:, None, None, :])
    if not bool(valid.all()):
        padding = key_mask(valid, x.dtype)
        mask = padding if mask is None else mask + padding
    out = attn(packed, mask, order) if with_order else attn(packed, mask)
    out = out * valid[..., None].to(out.dtype)
    return x.new_zeros(batch, tokens, out.shape[-1]).scatter_(1, order[..., None].expand(-1, -1, out.shape[-1]), out)


# excludes a key from attention: exp(-1e4) is 0 in every float type, yet a row with no active key
# at all gets uniform weights instead of NaN (its output is multiplied by 0 or dropped anyway)
EXCLUDED = -1e4


def key_mask(active: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """(B, N) bool -> (B, 1, 1, N) additive mask that excludes the inactive keys."""
    return torch.zeros(active.shape, dtype=dtype, device=active.device).masked_fill_(~active, EXCLUDED)[:, None, None, :]
