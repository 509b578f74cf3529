"""ToFu: Token Fusion, pruning then norm-preserving merging (Kim et al., WACV 2024).

A ToMe relative with ToMe's schedule (the config section "merge"): each block with r > 0 matches
its tokens by ToMe's bipartite soft matching on the keys its attention used, after the attention
residual, and removes r of them. Blocks up to ``depth // 2`` prune them (drop the matched A
tokens); the later blocks fuse them into their matches with MLERP (``tieta.ops.tofu``), the mean
rescaled to the largest norm. Training-free; it adds no parameters and computes the same in
training and evaluation.

The authors published no code; this follows OpenToMe's ``opentome/timm/tofu.py``. As there, token
sizes are not tracked, so there is no proportional attention and average pooling is uniform
(``merge.prop_attn`` does not apply). Every prefix token is protected (the reference protects the
class and distillation tokens only).
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from tieta.errors import TietaError
from tieta.methods.blocks import (TietaBlock, Unchanged, claim_reduction, follow_matching, keep_output, patch_blocks,
                                  rotated, take_output, token_state)
from tieta.methods.kept_patches import kept_patch_masks
from tieta.methods.knob import Knob, flops_schedule
from tieta.methods.method import Method
from tieta.methods.schedules import MergeConfig, resolve_schedule, schedule_setting, token_counts, validate_merge, vit_shape
from tieta.ops.merging import bipartite_soft_matching
from tieta.ops.tofu import mlerp_merge, prune, strategy_blocks


class TokenFusion(nn.Module):
    """A ToFu block's ``reduce`` step: remove ``r`` tokens (fewer where the tokens run short).

    Args:
        r: tokens this block removes.
        fuse: merge them with MLERP; False: prune them.
    """

    def __init__(self, r: int, fuse: bool) -> None:
        super().__init__()
        self.r, self.fuse = r, fuse

    def extra_repr(self) -> str:
        return f"r={self.r}, fuse={self.fuse}"

    def forward(self, x: torch.Tensor, block: TietaBlock) -> torch.Tensor:
        """Args: x: (B, N, D) after the attention residual. Returns: (B, N - r, D)."""
        if block.token_state.trace_source:
            raise TietaError("ToFu prunes tokens in its early blocks, so no merge groups cover the image; merge "
                             "figures are for ToMe, PYRA and PiToMe")
        keys = rotated(block, take_output(block.attn.k_norm))  # (B, H, N, hd), rotated as attention used them
        prefix = block.num_prefix_tokens
        # the sum over heads is the reference's mean up to a factor that the cosine similarity ignores
        matching = bipartite_soft_matching(keys.sum(dim=1), self.r, prefix)
        if block.token_state.follows_tokens():  # pruned sources are dropped, fused ones go into their destinations
            follow_matching(block, matching, x.shape[0], x.shape[1], prefix, merged=self.fuse)
        if self.fuse:
            return mlerp_merge(x, matching.kept_rows, matching.source_rows, matching.destination_rows)
        return prune(x, matching.kept_rows)


def add_tofu(model: nn.Module, r: Any = "low") -> nn.Module:
    """ToFu in every block of a timm ViT, in place: prune up to block ``depth // 2``, fuse after.

    Args:
        model: a timm VisionTransformer or Eva (LoRA and adapters compose before or after).
        r: the schedule, as for ``add_tome``: an int, (r, inflection), a per-block list, or
            "low" / "high" (``tieta.methods.schedules``).

    Returns:
        The same model; each block's ``reduce`` step holds its r.
    """
    schedule = resolve_schedule(model, r)
    if any(schedule):  # refuse before changing anything
        claim_reduction(model, "ToFu")
    blocks = patch_blocks(model)
    token_state(model)  # the per-pass reset and rope bookkeeping that reduced models share
    for block, merges, fuse in zip(blocks, schedule, strategy_blocks(len(blocks))):
        if merges > 0:
            block.reduce = TokenFusion(int(merges), fuse)
            keep_output(block.attn.k_norm)
        else:
            block.reduce = Unchanged()
    return model


def schedule_of(model: nn.Module) -> list[int]:
    """r per block, read from the blocks' steps."""
    return [block.reduce.r if isinstance(block.reduce, TokenFusion) else 0 for block in model.blocks]


def describe_tofu(model: nn.Module) -> dict[str, Any]:
    """The schedule, the tokens entering each block (then leaving the last), and which blocks fuse."""
    schedule = schedule_of(model)
    return {"schedule": schedule, "token_counts": token_counts(vit_shape(model), schedule),
            "fusing_blocks": [index for index, fuse in enumerate(strategy_blocks(len(schedule))) if fuse]}


def evaluation_masks(model: nn.Module, images: torch.Tensor) -> list[torch.Tensor]:
    """ToFu's decisions for ``images``: one (B, P) bool tensor per block with r > 0, True where the
    patch is still a token of its own (False: pruned in an early block, or fused into its match in a
    later one).

    Drawn here, not by ``show-merges``: the early blocks prune, so no merge groups cover the image.
    """
    steps = [block.reduce for block in model.blocks if isinstance(block.reduce, TokenFusion)]
    if not steps:
        raise TietaError("this model has no ToFu blocks with r > 0; call add_tofu with a schedule that removes tokens")
    return kept_patch_masks(model, images, steps)


METHOD = Method(
    name="tofu",
    sections={"merge": MergeConfig},
    attach=lambda model, config: add_tofu(model, schedule_setting(config.merge)),
    describe=describe_tofu,
    validate=validate_merge,
    reduces_tokens=True,
    token_masks=evaluation_masks,
    picture_note=lambda config: "grey: pruned (early blocks) or fused away (later blocks)",
    knob=Knob("merge.schedule", 0.05, 1.0, "low", flops_schedule,
              doc="FLOPs ratio its decreasing schedule reaches ({flops, inflection: -0.9})"),
)
