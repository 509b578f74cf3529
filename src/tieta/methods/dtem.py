"""DTEM: token merging by a learned, decoupled embedding (Lee & Hong, NeurIPS 2024).

Every block gets a small linear embedding of the tokens its attention sees (``norm1``'s output,
D -> ``metric_dim``, 64 on ViT-B), and merges ``r`` tokens after its attention residual by the
cosine similarity of that embedding instead of the attention keys:
- at evaluation exactly as ToMe does (``tieta.ops.merging``: bipartite matching, size-weighted
  average, proportional attention);
- in training softly (``tieta.ops.dtem``): every token stays, r rounds of a tempered softmax move
  shares of token sizes, and proportional attention weights each token by its soft size, so the
  merge decisions pass a gradient to the embeddings.

The embeddings are the method's trainable group (``dtem_embed``); the reference trains them alone
on a frozen backbone, and their input is detached in training, as there, so no gradient reaches
the backbone through them. As in the reference, each block's r is clipped to half of its
unprotected tokens, silently (r = 16 on ViT-B/16 merges 10 in the last block).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable, Optional

import torch
from torch import nn

from tieta.errors import TietaError
from tieta.methods.blocks import (PassState, TietaBlock, claim_reduction, follow_matching, keep_output, pass_state,
                                  patch_blocks, take_output, token_state)
from tieta.methods.knob import Knob, whole
from tieta.methods.method import Method
from tieta.methods.schedules import clip_schedule, token_counts, vit_shape
from tieta.methods.tome import size_bias_mask
from tieta.ops.dtem import default_metric_dim, size_weighted_softmax, soft_merge
from tieta.ops.merging import bipartite_soft_matching, merge_source, merge_wavg


@dataclass
class SoftMergeState(PassState):
    """What DTEM's training blocks share in one forward pass.

    Attributes:
        active: leading tokens that still take part in merging (None: all of them).
    """

    active: Optional[int] = None

    def reset(self) -> None:
        self.active = None


def size_weighted_attention(attn: nn.Module, x: torch.Tensor, size: torch.Tensor) -> torch.Tensor:
    """timm's ``Attention.forward`` with the reference's training softmax, sizes multiplying
    ``exp(logits)`` (``tieta.ops.dtem.size_weighted_softmax``), calling the module's own ``qkv``
    (LoRA included), ``q_norm``, ``k_norm``, ``attn_drop``, ``norm``, ``gate``, ``proj`` and ``proj_drop``.

    Args: x: (B, N, D) normalised tokens; size: (B, N). Returns: (B, N, D).
    """
    batch, tokens, _ = x.shape
    gate = attn.gate(x).sigmoid() if getattr(attn, "gate", None) is not None else None
    qkv = attn.qkv(x).reshape(batch, tokens, 3, attn.num_heads, attn.head_dim).permute(2, 0, 3, 1, 4)
    q, k, v = qkv.unbind(0)
    q, k = attn.q_norm(q), attn.k_norm(k)
    with torch.autocast(device_type=x.device.type, enabled=False):  # float32, as the reference
        weights = attn.attn_drop(size_weighted_softmax((q.float() * attn.scale) @ k.float().transpose(-2, -1), size))
        out = (weights @ v.float()).to(v.dtype)
    out = attn.norm(out.transpose(1, 2).reshape(batch, tokens, -1))
    if gate is not None:
        out = out * gate
    return attn.proj_drop(attn.proj(out))


class SoftSizeAttention(nn.Module):
    """A block's ``attn_gate`` in training: once sizes are soft, attention weights each key by its
    size as the reference does (a product on exp(logits), through which a size of 0 still gets its
    gradient); otherwise, and at evaluation, the branch as is (log size as an additive bias)."""

    def forward(self, x: torch.Tensor, branch: Callable, mask: Optional[torch.Tensor], block: TietaBlock
                ) -> torch.Tensor:
        size = block.token_state.size
        if not block.training or size is None:
            return branch(x, mask)
        out = size_weighted_attention(block.attn, block.norm1(x), size[..., 0])
        return block.drop_path1(block.ls1(out))


class DTEMMerge(nn.Module):
    """A block's ``reduce`` step: embed the tokens, then merge r of them (softly in training).

    Args:
        width: D.
        metric_dim: the embedding's width.
        r: tokens merged away per block (clipped where the tokens run short).
        candidates, tau_score, tau_select: the soft merge's settings (``tieta.ops.dtem``).
    """

    def __init__(self, width: int, metric_dim: int, r: int, candidates: int = 3, tau_score: float = 0.1,
                 tau_select: float = 0.1) -> None:
        super().__init__()
        self.dtem_embed = nn.Linear(width, metric_dim)
        self.r, self.candidates, self.tau_score, self.tau_select = r, candidates, tau_score, tau_select

    def extra_repr(self) -> str:
        return f"r={self.r}, candidates={self.candidates}, tau_score={self.tau_score}, tau_select={self.tau_select}"

    def forward(self, x: torch.Tensor, block: TietaBlock) -> torch.Tensor:
        """Args: x: (B, N, D) after the attention residual. Returns: (B, N, D) in training, else (B, N - r, D)."""
        normed = take_output(block.norm1)  # (B, N, D): what the block's attention saw
        if self.r == 0:
            return x
        state = block.token_state
        prefix = block.num_prefix_tokens
        if block.training:  # the block's mode: a step added to a model in eval mode follows it
            if state.dense is not None:
                raise TietaError("DTEM's training merge reorders tokens by soft size, which the patch grid cannot "
                                 "follow; take dense outputs in evaluation mode (model.eval())")
            soft = block.soft_merge_state
            size = torch.ones_like(x[..., :1]) if state.size is None else state.size
            active = x.shape[1] if soft.active is None else soft.active
            metric = self.dtem_embed(normed.detach())  # the embedding learns; the backbone gets no gradient here
            x, state.size, soft.active = soft_merge(x, size, metric, self.r, active, prefix, self.candidates,
                                                    self.tau_score, self.tau_select)
            state.attn_bias = None  # the next blocks' SoftSizeAttention weights by the sizes themselves
            return x
        matching = bipartite_soft_matching(self.dtem_embed(normed), self.r, prefix)
        if state.trace_source:
            state.source = merge_source(matching, state.source, x.shape[1])
        if state.dense is not None:  # a merged position takes its destination's value on the grid
            follow_matching(block, matching, x.shape[0], x.shape[1], prefix)
        x, state.size = merge_wavg(matching, x, state.size)
        state.attn_bias = size_bias_mask(state.size, x)
        return x


def add_dtem(model: nn.Module, r: int = 16, metric_dim: Optional[int] = None, candidates: int = 3,
             tau_score: float = 0.1, tau_select: float = 0.1) -> nn.Module:
    """DTEM's decoupled embedding and merging in every block of a timm ViT, in place.

    Args:
        model: a timm VisionTransformer (LoRA and adapters compose before or after).
        r: tokens each block merges away, clipped per block to half of its unprotected tokens
            (the reference's 16 on ViT-B/16: 197 tokens down to 11).
        metric_dim: the embedding's width; None: the head width (two heads' from width 1024 on).
        candidates: in training, the most similar B tokens each A token may merge into (k2).
        tau_score: in training, the temperature dividing the similarities (tau1).
        tau_select: in training, the temperature of each selection round's softmax (tau2).

    Returns:
        The same model; each block's ``reduce.dtem_embed`` is the trainable embedding.
    """
    DTEMConfig(r=r, metric_dim=metric_dim, candidates=candidates, tau_score=tau_score,
               tau_select=tau_select).check(prefix="DTEM's ")
    if getattr(model, "rope", None) is not None:
        raise TietaError("DTEM does not support models with rotary position embeddings: its training merge "
                         "reorders tokens by soft size, which rope positions cannot follow")
    blocks = patch_blocks(model)
    if any(isinstance(block.reduce, DTEMMerge) for block in blocks):
        raise TietaError("this model already has DTEM")
    claim_reduction(model, "DTEM")
    token_state(model)  # sizes and the attention bias; the reference weights attention by size in both modes
    soft = pass_state(model, "soft_merge_state", SoftMergeState)
    width = model.embed_dim
    metric_dim = metric_dim or default_metric_dim(width, blocks[0].attn.num_heads)
    for block in blocks:
        like = next(block.parameters())
        block.soft_merge_state = soft
        block.reduce = DTEMMerge(width, metric_dim, r, candidates, tau_score, tau_select).to(like.device, like.dtype)
        block.attn_gate = SoftSizeAttention()
        keep_output(block.norm1)
    return model


def merge_schedule(model: nn.Module) -> list[int]:
    """The merges each block makes at evaluation at the model's own image size."""
    return clip_schedule(vit_shape(model), [block.reduce.r if isinstance(block.reduce, DTEMMerge) else 0
                                            for block in model.blocks])


def describe(model: nn.Module) -> dict[str, Any]:
    """The merges per block and the tokens entering each block (then leaving the last), at evaluation."""
    schedule = merge_schedule(model)
    return {"schedule": schedule, "token_counts": token_counts(vit_shape(model), schedule)}


@dataclass
class DTEMConfig:
    """DTEM settings (the config section "dtem"); the defaults are the reference's for ViT-B/16."""

    r: int = 16  # tokens merged per block (clipped where too few are left)
    metric_dim: Optional[int] = None  # None: the head width (64 on ViT-B), two heads' from width 1024 on
    candidates: int = 3  # training: B tokens each A token may merge into (the reference's k2)
    tau_score: float = 0.1  # training: temperature of the similarities (tau1)
    tau_select: float = 0.1  # training: temperature of each selection round (tau2)

    def check(self, prefix: str = "dtem.") -> None:
        """Raise a TietaError, in one sentence, for settings that cannot work. ``prefix`` names the
        fields as the user wrote them: the config section's, or "DTEM's " for add_dtem's arguments."""
        for name, value in (("r", self.r), ("candidates", self.candidates)):
            if isinstance(value, bool) or not isinstance(value, int):
                raise TietaError(f"{prefix}{name} must be a whole number, got {value!r}")
        if self.r < 0:
            raise TietaError(f"{prefix}r is the tokens each block merges and cannot be negative, got {self.r}")
        if self.candidates < 1:
            raise TietaError(f"{prefix}candidates must be at least 1, got {self.candidates}")
        if not (self.tau_score > 0 and self.tau_select > 0):
            raise TietaError(f"{prefix}tau_score and {prefix}tau_select must be positive, got {self.tau_score} "
                             f"and {self.tau_select}")
        metric_dim = self.metric_dim
        if metric_dim is not None and (isinstance(metric_dim, bool) or not isinstance(metric_dim, int)
                                       or metric_dim < 1):
            raise TietaError(f"{prefix}metric_dim must be a whole number >= 1, got {metric_dim!r}")


def _attach(model: nn.Module, config: Any) -> nn.Module:
    dtem = config.dtem
    return add_dtem(model, dtem.r, dtem.metric_dim, dtem.candidates, dtem.tau_score, dtem.tau_select)


def _validate(config: Any) -> None:
    config.dtem.check()


METHOD = Method(
    name="dtem",
    sections={"dtem": DTEMConfig},
    attach=_attach,
    modules=("dtem_embed",),
    describe=describe,
    validate=_validate,
    reduces_tokens=True,
    knob=Knob("dtem.r", 0, 64, "high", whole, integer=True, doc="r: tokens merged per block"),
    shows_merges=True,
)
