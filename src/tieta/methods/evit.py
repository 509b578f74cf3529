"""EViT as a tieta method: keep the attentive tokens, fuse the inattentive ones (Liang et al., ICLR 2022).

In the blocks at ``locations`` (3, 6, 9 for depth 12; the same fractions of depth elsewhere),
right after the attention residual, the class token's attention ranks the other tokens; the
``ceil(keep_rate * n)`` best stay, ordered by score, and the rest are fused into one token, their
attention-weighted sum (``tieta.ops.evit``). Training and evaluation compute the same; the keep
rate can warm up from 1 over the first epochs (the reference's cosine schedule, per epoch here).
No parameters are added.

Models without a class token (average-pool heads) have no class attention row; there the score is
the attention a token receives, averaged over heads and queries (a labelled deviation).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Optional, Sequence

import torch
from torch import nn

from tieta.errors import TietaError
from tieta.methods.blocks import (TietaBlock, claim_reduction, follow_tokens, keep_output, patch_blocks, rotated,
                                  take_output, token_state)
from tieta.methods.kept_patches import kept_patch_masks
from tieta.methods.knob import Knob
from tieta.methods.method import Method
from tieta.methods.schedules import stage_blocks
from tieta.methods.state import set_method_setting
from tieta.ops.attention import class_attention, received_attention
from tieta.ops.evit import evit_reduce, keep_count, keep_rate_at, kept_order
from tieta.ops.rope import NO_POSITION


class EViTReduce(nn.Module):
    """A reduction block's ``reduce`` step.

    Args:
        keep_rate: share of the scored tokens kept (the training schedule updates it).
        fuse: fuse the dropped tokens into one (the reference scripts' setting).
        class_token: rank by the class token's attention; False: by the attention received.
    """

    def __init__(self, keep_rate: float, fuse: bool = True, class_token: bool = True) -> None:
        super().__init__()
        self.keep_rate, self.fuse, self.class_token = keep_rate, fuse, class_token

    def extra_repr(self) -> str:
        return f"keep_rate={self.keep_rate}, fuse={self.fuse}, class_token={self.class_token}"

    def forward(self, x: torch.Tensor, block: TietaBlock) -> torch.Tensor:
        """Args: x: (B, N, D) after the attention residual. Returns: (B, prefix + k (+ 1), D)."""
        q, k = take_output(block.attn.q_norm), take_output(block.attn.k_norm)  # (B, H, N, hd)
        prefix = block.num_prefix_tokens
        scored = x.shape[1] - prefix
        kept = keep_count(scored, self.keep_rate)
        if kept >= scored:
            return x  # nothing to drop: skip the scoring too
        score = class_attention if self.class_token else received_attention
        scores = score(rotated(block, q), rotated(block, k), block.attn.scale, prefix).to(x.dtype)
        if block.token_state.follows_tokens():  # kept tokens keep their positions; the fused token has none
            order = kept_order(scores, kept)
            if self.fuse:
                order = torch.cat([order, order.new_full((order.shape[0], 1), NO_POSITION)], dim=1)
            follow_tokens(block, order, scored)
        return evit_reduce(x, scores, self.keep_rate, prefix, self.fuse)


def add_evit(model: nn.Module, keep_rate: float = 0.7, locations: Optional[Sequence[int]] = None,
             fuse: bool = True) -> nn.Module:
    """EViT in the blocks at ``locations`` of a timm ViT, in place.

    Args:
        model: a timm VisionTransformer (LoRA and adapters compose before or after).
        keep_rate: share of the tokens kept at each location, in (0, 1]; 1 changes nothing.
        locations: block indices; None: 3, 6, 9 for depth 12, the same fractions of depth elsewhere.
        fuse: fuse the dropped tokens into one extra token (EViT's default in its scripts).

    Returns:
        The same model; its state holds the base keep rate (``method_setting(model, "evit", "evit_keep_rate")``).
    """
    EViTConfig(keep_rate=keep_rate, locations=locations, fuse=fuse).check(prefix="")
    blocks = patch_blocks(model)
    chosen = stage_blocks(len(blocks), locations)
    claim_reduction(model, "EViT")
    token_state(model)  # the per-pass reset and pooling that reduced models share
    class_token = getattr(model, "cls_token", None) is not None
    for index in chosen:
        block = blocks[index]
        block.reduce = EViTReduce(keep_rate, fuse, class_token)
        keep_output(block.attn.q_norm)
        keep_output(block.attn.k_norm)
    set_method_setting(model, "evit", "evit_keep_rate", keep_rate)
    return model


def set_keep_rate(model: nn.Module, keep_rate: float) -> None:
    """Set the keep rate of every EViT block (the warm-up schedule's step)."""
    for block in model.blocks:
        if isinstance(block.reduce, EViTReduce):
            block.reduce.keep_rate = keep_rate


def token_counts(model: nn.Module) -> list[int]:
    """Tokens entering each block's MLP (after its reduction), at the current keep rates."""
    counts, tokens = [], model.patch_embed.num_patches + model.num_prefix_tokens
    prefix = model.num_prefix_tokens
    for block in model.blocks:
        step = block.reduce
        if isinstance(step, EViTReduce):
            kept = keep_count(tokens - prefix, step.keep_rate)
            if kept < tokens - prefix:
                tokens = prefix + kept + int(step.fuse)
        counts.append(tokens)
    return counts


def evaluation_masks(model: nn.Module, images: torch.Tensor) -> list[torch.Tensor]:
    """EViT's evaluation decisions for ``images``: one (B, P) bool tensor per location, True where the
    patch is still one of the kept tokens (False: fused into the extra token, or dropped)."""
    steps = [block.reduce for block in model.blocks if isinstance(block.reduce, EViTReduce)]
    if not steps:
        raise TietaError("this model has no EViT; call add_evit first")
    return kept_patch_masks(model, images, steps)


@dataclass
class EViTConfig:
    """EViT settings (the config section "evit")."""

    keep_rate: float = 0.7
    locations: Optional[list[int]] = None  # None: 3, 6, 9 at depth 12, the same fractions of depth elsewhere
    fuse: bool = True
    shrink_start_epoch: int = 0  # keep rate 1 before this epoch
    shrink_epochs: int = 0  # cosine from 1 to keep_rate over these epochs (0: constant, as fine-tuning)

    def check(self, prefix: str = "evit.") -> None:
        """Raise a TietaError, in one sentence, for settings that cannot work. ``prefix`` names the
        fields as the user wrote them: the config section's, or nothing for add_evit's arguments."""
        if not 0 < self.keep_rate <= 1:
            raise TietaError(f"{prefix}keep_rate must be in (0, 1], got {self.keep_rate}")
        if self.shrink_start_epoch < 0 or self.shrink_epochs < 0:
            raise TietaError(f"{prefix}shrink_start_epoch and {prefix}shrink_epochs cannot be negative")


def _epoch_update(model: nn.Module, config: Any, epoch: int, epochs: int) -> dict[str, Any]:
    evit = config.evit
    rate = keep_rate_at(epoch, evit.keep_rate, evit.shrink_start_epoch, evit.shrink_epochs)
    set_keep_rate(model, rate)
    return {"keep_rate": rate}


def _validate(config: Any) -> None:
    config.evit.check()


METHOD = Method(
    name="evit",
    sections={"evit": EViTConfig},
    attach=lambda model, config: add_evit(model, config.evit.keep_rate, config.evit.locations, config.evit.fuse),
    epoch_update=_epoch_update,
    describe=lambda model: {"mlp_token_counts": token_counts(model)},
    validate=_validate,
    reduces_tokens=True,
    token_masks=evaluation_masks,
    picture_note=lambda config: f"keep rate {config.evit.keep_rate}; grey: fused or dropped",
    knob=Knob("evit.keep_rate", 0.05, 1.0, "low", doc="share of tokens kept at each location"),
)
