"""PiToMe: energy-score protected token merging (Tran et al., NeurIPS 2024).

Every block, after its attention residual, ranks its unprotected tokens by an energy score over
the cosine similarities of the keys its attention used, and merges ``floor(T - T * ratio)`` of
them by ToMe's size-weighted average (``tieta.ops.pitome``): the first ``ceil(depth / 2)`` blocks
by ToMe's bipartite matching on the energy-ranked tokens, the later ones pairwise among the 2r
most energetic tokens only, the rest protected. The margin of the energy falls with depth (the
reference's 0.75 - 0.75 * block / depth). Training-free; no parameters; the same in training and
evaluation.

As in the reference (``hchautran/PiToMe``, its ``algo/pitome`` timm patch), token sizes weight the
merges, but attention gets no log-size bias (its blocks call attention without the sizes);
average-pool heads weight tokens by size, as for ToMe. A block whose r comes out 0 leaves its
tokens as they are (the reference reorders them in its first half and fails in its second).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Optional, Sequence

import torch
from torch import nn

from tieta.errors import TietaError
from tieta.files import is_number
from tieta.methods.blocks import (TietaBlock, claim_reduction, follow_matching, keep_output, patch_blocks, rotated,
                                  take_output, token_state)
from tieta.methods.knob import Knob
from tieta.methods.method import Method
from tieta.ops.merging import Matching, merge_source, merge_wavg
from tieta.ops.pitome import bipartite_blocks, default_margins, merge_count, pitome_matching


class EnergyMerge(nn.Module):
    """A PiToMe block's ``reduce`` step.

    Args:
        ratio: share of the unprotected tokens that stay.
        margin: the energy's margin in this block.
        bipartite: ToMe's matching on the ranked tokens (first half); False: pairs among the 2r
            most energetic tokens (second half).
        alpha: the ELU's alpha in the energy.
    """

    def __init__(self, ratio: float, margin: float, bipartite: bool, alpha: float = 1.0) -> None:
        super().__init__()
        self.ratio, self.margin, self.bipartite, self.alpha = ratio, margin, bipartite, alpha

    def extra_repr(self) -> str:
        return f"ratio={self.ratio}, margin={self.margin:.4g}, bipartite={self.bipartite}, alpha={self.alpha}"

    def forward(self, x: torch.Tensor, block: TietaBlock) -> torch.Tensor:
        """Args: x: (B, N, D) after the attention residual. Returns: (B, N - r, D)."""
        keys = take_output(block.attn.k_norm)  # (B, H, N, hd)
        prefix = block.num_prefix_tokens
        if merge_count(x.shape[1] - prefix, self.ratio) == 0:
            return x
        keys = rotated(block, keys)  # as attention used them
        # the sum over heads is the reference's mean up to a factor that the normalisation removes
        rows = pitome_matching(keys.sum(dim=1), self.ratio, self.margin, prefix, self.bipartite, self.alpha)
        matching = Matching(*rows)
        state = block.token_state
        if state.trace_source:
            state.source = merge_source(matching, state.source, x.shape[1])
        if state.follows_tokens():  # a merged token keeps its destination's position
            follow_matching(block, matching, x.shape[0], x.shape[1], prefix)
        x, state.size = merge_wavg(matching, x, state.size)
        return x


def add_pitome(model: nn.Module, ratio: float = 0.9125, margins: Optional[Sequence[float]] = None,
               alpha: float = 1.0) -> nn.Module:
    """PiToMe in every block of a timm ViT, in place.

    Args:
        model: a timm VisionTransformer or Eva (LoRA and adapters compose before or after).
        ratio: share of the unprotected tokens each block keeps, in [0.5, 1]; 1 changes nothing.
            0.9125 is the reference's image-classification default.
        margins: the energy's margin per block; None: 0.75 - 0.75 * block / depth (the reference's).
        alpha: the ELU's alpha in the energy (the reference's 1.0).

    Returns:
        The same model; each block's ``reduce`` step holds its settings.
    """
    PiToMeConfig(ratio=ratio, margins=None if margins is None else list(margins), alpha=alpha).check(prefix="")
    depth = len(model.blocks) if hasattr(model, "blocks") else None
    if margins is not None and depth is not None and len(margins) != depth:
        raise TietaError(f"margins need one value per block ({depth}), got {len(margins)}")
    claim_reduction(model, "PiToMe")  # refuse before changing anything
    blocks = patch_blocks(model)
    token_state(model)  # sizes, the per-pass reset and the rope bookkeeping that reduced models share
    margins = default_margins(len(blocks)) if margins is None else [float(margin) for margin in margins]
    for block, margin, bipartite in zip(blocks, margins, bipartite_blocks(len(blocks))):
        block.reduce = EnergyMerge(float(ratio), margin, bipartite, float(alpha))
        keep_output(block.attn.k_norm)
    return model


def token_counts(model: nn.Module) -> list[int]:
    """Tokens entering each block, then the tokens leaving the last one (depth + 1 numbers)."""
    prefix = model.num_prefix_tokens
    counts = [model.patch_embed.num_patches + prefix]
    for block in model.blocks:
        step = block.reduce
        merged = merge_count(counts[-1] - prefix, step.ratio) if isinstance(step, EnergyMerge) else 0
        counts.append(counts[-1] - merged)
    return counts


@dataclass
class PiToMeConfig:
    """PiToMe settings (the config section "pitome"), the reference's for ViT-B/16 classification."""

    ratio: float = 0.9125  # share of the tokens each block keeps
    margins: Optional[list[float]] = None  # per block; None: 0.75 - 0.75 * block / depth
    alpha: float = 1.0  # the energy's ELU alpha

    def check(self, prefix: str = "pitome.") -> None:
        """Raise a TietaError, in one sentence, for settings the reference's matching cannot run.
        ``prefix`` names the fields as the user wrote them: the config section's, or nothing for
        add_pitome's arguments. (One margin per block needs the model: add_pitome checks that.)"""
        ratio, alpha, margins = self.ratio, self.alpha, self.margins
        if not is_number(ratio) or not 0.5 <= ratio <= 1:
            raise TietaError(f"{prefix}ratio is the share of tokens each block keeps, in [0.5, 1], got {ratio!r}")
        if not is_number(alpha) or alpha <= 0:
            raise TietaError(f"{prefix}alpha is the energy's ELU alpha, a number > 0, got {alpha!r}")
        if margins is not None and not all(is_number(margin) and -1 <= margin <= 1 for margin in margins):
            raise TietaError(f"{prefix}margins are cosine similarities, numbers in [-1, 1], got {list(margins)!r}")


def _validate(config: Any) -> None:
    config.pitome.check()


METHOD = Method(
    name="pitome",
    sections={"pitome": PiToMeConfig},
    attach=lambda model, config: add_pitome(model, config.pitome.ratio, config.pitome.margins, config.pitome.alpha),
    describe=lambda model: {"token_counts": token_counts(model)},
    validate=_validate,
    reduces_tokens=True,
    knob=Knob("pitome.ratio", 0.5, 1.0, "low", doc="share of tokens each block keeps"),
    shows_merges=True,
)
