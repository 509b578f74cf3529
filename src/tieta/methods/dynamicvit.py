"""DynamicViT as a tieta method: learned token pruning before a few blocks (Rao et al., NeurIPS 2021).

Before the blocks at ``locations`` (3, 6, 9 for depth 12; the same fractions of depth elsewhere) a
prediction module scores the patch tokens (``tieta.ops.dynamicvit``). In training the decisions
are hard Gumbel samples with a straight-through gradient: tokens stay in the tensor, and from the
first stage on every block's attention masks the dropped ones out (``TokenState.policy``, run by
the block as the policy's masked softmax). At evaluation each stage keeps exactly
``int(P * ratio)`` of the original P patch tokens, the best scored, and physically drops the rest.

Its objective is ``CE + ratio_weight / S * sum_s mean_b (ratio_s - kept share)^2``; with
``distill_weight > 0`` it adds the KL divergence to the same network's all-tokens prediction
(detached), the self-distillation option for fine-tuning where no separate teacher exists.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Optional, Sequence

import torch
from torch import nn

from tieta import shard
from tieta.errors import TietaError
from tieta.methods.blocks import (PassState, TietaBlock, claim_reduction, follow_tokens, pass_state, patch_blocks,
                                  token_state)
from tieta.methods.kept_patches import kept_patch_masks
from tieta.methods.knob import Knob, geometric
from tieta.methods.method import Method
from tieta.methods.schedules import stage_blocks
from tieta.methods.state import method_setting, pass_state_named, set_method_setting
from tieta.ops.dynamicvit import (PredictorLG, distillation_loss, gather_tokens, keep_counts, ratio_loss, sample_keep,
                                  top_keep)


@dataclass
class PruningState(PassState):
    """What DynamicViT's stages share in one forward pass.

    Attributes:
        decisions: the training decisions of each stage so far, (B, P) each, for the ratio loss.
        full: keep every token (the all-tokens pass of the self-distillation term).
    """

    decisions: list[torch.Tensor] = field(default_factory=list)
    full: bool = False

    def reset(self) -> None:
        self.decisions = []


class DynamicViTSelect(nn.Module):
    """A stage block's ``select`` step: score the patch tokens, then mask (training) or drop (evaluation).

    Args:
        width: D.
        ratio: share of the model's original patch tokens kept from this stage on.
        patches: P, the original patch count.
    """

    def __init__(self, width: int, ratio: float, patches: int) -> None:
        super().__init__()
        self.predictor = PredictorLG(width)
        self.ratio, self.patches = ratio, patches

    def extra_repr(self) -> str:
        return f"ratio={self.ratio}, keeps={self.kept()} of {self.patches} patches"

    def kept(self) -> int:
        """Patch tokens this stage keeps at evaluation (``keep_counts``: of the original patch count)."""
        return keep_counts(self.patches, [self.ratio])[0]

    def forward(self, x: torch.Tensor, block: TietaBlock) -> torch.Tensor:
        """Args: x: (B, N, D) entering the block. Returns: x (training) or (B, prefix + K, D)."""
        pruning, tokens = block.pruning_state, block.token_state
        if pruning.full:
            return x
        prefix = block.num_prefix_tokens
        patches = x[:, prefix:]
        if block.training:
            previous = torch.ones_like(patches[..., :1]) if tokens.policy is None else tokens.policy[:, prefix:, None]
            keep = sample_keep(self.predictor(patches, previous), previous)  # (B, P, 1)
            pruning.decisions.append(keep[..., 0])
            tokens.policy = torch.cat([keep.new_ones(keep.shape[0], prefix), keep[..., 0]], dim=1)
            return x
        kept = min(self.kept(), patches.shape[1])
        log_probs = self.predictor(patches, torch.ones_like(patches[..., :1]))
        indices = top_keep(log_probs, kept)
        follow_tokens(block, indices, patches.shape[1])  # kept tokens keep their positions
        return gather_tokens(x, indices, prefix)


def add_dynamicvit(model: nn.Module, ratios: Sequence[float] = (0.9, 0.7, 0.5),
                   locations: Optional[Sequence[int]] = None) -> nn.Module:
    """DynamicViT's prediction modules before the blocks at ``locations`` of a timm ViT, in place.

    Args:
        model: a timm VisionTransformer (LoRA and adapters compose before or after).
        ratios: per stage, the share of the original patch tokens kept (cumulative, decreasing);
            (0.9, 0.7, 0.5) reproduces the DyT paper's 14.05 GFLOPs on ViT-B/16; the DynamicViT
            paper's own rho = 0.7 is (0.7, 0.49, 0.343).
        locations: block indices, one per ratio; None: 3, 6, 9 for depth 12, the same fractions
            of depth elsewhere.

    Returns:
        The same model; train it with :func:`dynamicvit_loss` (``tieta train`` does).
    """
    ratios = [float(ratio) for ratio in ratios]
    if not ratios or any(not 0 < ratio <= 1 for ratio in ratios):
        raise TietaError(f"DynamicViT ratios must be in (0, 1], got {ratios}")
    if any(later > earlier for earlier, later in zip(ratios, ratios[1:])):
        raise TietaError(f"DynamicViT ratios are cumulative and cannot grow from one stage to the next, got {ratios}")
    blocks = patch_blocks(model)
    chosen = stage_blocks(len(blocks), locations)
    if len(chosen) != len(ratios):
        raise TietaError(f"DynamicViT needs one ratio per location: {len(ratios)} ratios for blocks {chosen}")
    patches = model.patch_embed.num_patches
    try:
        keep_counts(patches, ratios)
    except ValueError as error:  # a ratio too small for this model's patch count
        raise TietaError(f"DynamicViT: {error} patches") from None
    claim_reduction(model, "DynamicViT")
    tokens = token_state(model)
    pruning = pass_state(model, "pruning_state", PruningState)
    for block in blocks:
        block.pruning_state = pruning
        block.token_state = tokens
    for index, ratio in zip(chosen, ratios):
        like = next(blocks[index].parameters())
        blocks[index].select = DynamicViTSelect(model.embed_dim, ratio, patches).to(like.device, like.dtype)
    set_method_setting(model, "dynamicvit", "dynamicvit_ratios", ratios)
    return model


def dynamicvit_loss(model: nn.Module, images: torch.Tensor, labels: torch.Tensor, ratio_weight: float = 2.0,
                    distill_weight: float = 0.0) -> torch.Tensor:
    """DynamicViT's training objective for one batch (runs the model).

    ``CE(logits) + ratio_weight / S * sum_s mean_b (ratio_s - mean_i keep_s)^2``, plus
    ``distill_weight * KL(all-tokens || pruned)`` when distill_weight > 0 (the teacher is the same
    network with every token kept, detached).
    """
    logits = model(images)
    pruning = pass_state_named(model, "pruning_state")
    decisions = list(pruning.decisions)
    ratios = method_setting(model, "dynamicvit", "dynamicvit_ratios")
    loss = shard.cross_entropy(logits, labels) + ratio_loss(decisions, ratios, ratio_weight, shard.batch_mean)
    if distill_weight > 0:
        pruning.full = True
        try:
            with torch.no_grad():
                teacher = model(images)
        finally:
            pruning.full = False
        loss = loss + distill_weight * distillation_loss(logits, teacher, shard.batch_mean if shard.current() else None)
    return loss


@dataclass
class DynamicViTConfig:
    """DynamicViT settings (the config section "dynamicvit")."""

    ratios: list[float] = field(default_factory=lambda: [0.9, 0.7, 0.5])
    locations: Optional[list[int]] = None  # None: 3, 6, 9 at depth 12, the same fractions of depth elsewhere
    ratio_weight: float = 2.0
    distill_weight: float = 0.0  # > 0: KL to the all-tokens pass of the same network


def _objective(config: Any):
    settings = config.dynamicvit

    def step(model: nn.Module, images: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        return dynamicvit_loss(model, images, labels, settings.ratio_weight, settings.distill_weight)

    return step


def _validate(config: Any) -> None:
    settings = config.dynamicvit
    if not settings.ratios or any(not 0 < ratio <= 1 for ratio in settings.ratios):
        raise TietaError(f"dynamicvit.ratios must be a list of shares in (0, 1], got {settings.ratios}")
    if settings.ratio_weight < 0 or settings.distill_weight < 0:
        raise TietaError("dynamicvit.ratio_weight and dynamicvit.distill_weight cannot be negative")


def token_counts(model: nn.Module) -> list[int]:
    """Tokens entering each block at evaluation."""
    counts, tokens = [], model.patch_embed.num_patches + model.num_prefix_tokens
    for block in model.blocks:
        if isinstance(block.select, DynamicViTSelect):
            tokens = model.num_prefix_tokens + min(block.select.kept(), tokens - model.num_prefix_tokens)
        counts.append(tokens)
    return counts


def evaluation_masks(model: nn.Module, images: torch.Tensor) -> list[torch.Tensor]:
    """DynamicViT's evaluation decisions for ``images`` (each stage keeps its best scored tokens): one
    (B, P) bool tensor per stage, True where the patch is still kept."""
    steps = [block.select for block in model.blocks if isinstance(block.select, DynamicViTSelect)]
    if not steps:
        raise TietaError("this model has no DynamicViT; call add_dynamicvit first")
    return kept_patch_masks(model, images, steps)


METHOD = Method(
    name="dynamicvit",
    sections={"dynamicvit": DynamicViTConfig},
    attach=lambda model, config: add_dynamicvit(model, config.dynamicvit.ratios, config.dynamicvit.locations),
    modules=("predictor",),
    objective=_objective,
    describe=lambda model: {"block_token_counts": token_counts(model)},
    validate=_validate,
    reduces_tokens=True,
    token_masks=evaluation_masks,
    picture_note=lambda config: f"keep ratios {list(config.dynamicvit.ratios)}; grey: dropped",
    knob=Knob("dynamicvit.ratios", 0.05, 1.0, "low", geometric(3), doc="geometric rho over the 3 stages"),
)
