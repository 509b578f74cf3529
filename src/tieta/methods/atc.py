"""ATC as a tieta method: agglomerative clustering of the patch tokens (Haurum et al., ECCV 2024).

In the blocks at ``locations`` (3, 6, 9 for depth 12; the same fractions of depth elsewhere), right
after the attention residual, the patch tokens are clustered bottom-up by the cosine distance of
their keys averaged over heads (``tieta.ops.atc``) into ``int(patches * keep_rate ** stage)``
clusters, the keep rate compounding over the locations as in the reference (``JoakimHaurum/ATC``);
each cluster becomes one token, the size-weighted mean of its members. With proportional attention
the tokens carry their sizes and every later block adds log(size) to its attention logits; without
it, as in the reference, each reduction averages its tokens unweighted and no size is kept. The
clustering takes no gradient and adds no parameters; training and evaluation compute the same.

Models with rotary position embeddings are refused: a cluster gathers tokens from anywhere in the
image and has no position to rotate by. A keep rate that leaves no cluster at a location is refused
too (the reference would silently skip that location).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Optional, Sequence

import torch
from torch import nn

from tieta.errors import TietaError
from tieta.methods.blocks import (TietaBlock, claim_reduction, keep_output, patch_blocks, rotated, take_output,
                                  token_state)
from tieta.methods.knob import Knob
from tieta.methods.method import Method
from tieta.methods.schedules import stage_blocks
from tieta.methods.tome import size_bias_mask
from tieta.ops.atc import LINKAGES, agglomerative_labels, cluster_counts, cosine_distances, merge_clusters


class ATCReduce(nn.Module):
    """A reduction block's ``reduce`` step: cluster the patch tokens into ``clusters`` tokens.

    Args:
        clusters: patch tokens after the step (fewer tokens in: all kept, as the reference's min).
        linkage: "single", "complete" or "average".
        prop_attn: carry token sizes into the merge and add log(size) to later attention.
    """

    def __init__(self, clusters: int, linkage: str = "average", prop_attn: bool = True) -> None:
        super().__init__()
        self.clusters, self.linkage, self.prop_attn = clusters, linkage, prop_attn

    def extra_repr(self) -> str:
        return f"clusters={self.clusters}, linkage={self.linkage!r}, prop_attn={self.prop_attn}"

    def forward(self, x: torch.Tensor, block: TietaBlock) -> torch.Tensor:
        """Args: x: (B, N, D) after the attention residual. Returns: (B, prefix + clusters, D)."""
        keys = rotated(block, take_output(block.attn.k_norm))  # (B, H, N, hd), as attention used them
        prefix = block.num_prefix_tokens
        patches = x.shape[1] - prefix
        if self.clusters >= patches:
            return x  # every token its own cluster: nothing changes
        state = block.token_state
        labels = agglomerative_labels(cosine_distances(keys.mean(dim=1), prefix), self.clusters, self.linkage)
        if state.dense is not None:  # a clustered position takes its cluster's value on the grid
            state.dense.follow(labels, self.clusters)
        # the reference forgets the sizes after each block unless attention is proportional
        x, size = merge_clusters(x, labels, self.clusters, state.size if self.prop_attn else None, prefix)
        if self.prop_attn:
            state.size = size
            state.attn_bias = size_bias_mask(size, x)
        return x


def add_atc(model: nn.Module, keep_rate: float = 0.7, locations: Optional[Sequence[int]] = None,
            linkage: str = "average", clusters: Optional[Sequence[int]] = None, prop_attn: bool = True) -> nn.Module:
    """ATC in the blocks at ``locations`` of a timm ViT, in place.

    Args:
        model: a timm VisionTransformer without rotary embeddings (LoRA and adapters compose before
            or after).
        keep_rate: share of the patch tokens kept per location, compounding, in (0, 1]; 1 changes
            nothing.
        locations: block indices; None: 3, 6, 9 for depth 12, the same fractions of depth elsewhere.
        linkage: "single", "complete" or "average" (the reference's default).
        clusters: patch tokens after each location, one count per location, instead of the keep rate.
        prop_attn: proportional attention (the reference's ``--proportional_attn``).

    Returns:
        The same model.
    """
    ATCConfig(keep_rate=keep_rate, locations=locations, linkage=linkage, clusters=clusters,
              prop_attn=prop_attn).check(prefix="")
    if getattr(model, "rope", None) is not None:
        raise TietaError("ATC cannot run on a model with rotary position embeddings: a cluster gathers tokens "
                         "from anywhere in the image and has no position to rotate by")
    blocks = patch_blocks(model)
    chosen = stage_blocks(len(blocks), locations)
    patches = model.patch_embed.num_patches
    if clusters is None:
        counts = cluster_counts(patches, keep_rate, len(chosen))
    else:
        counts = [int(count) for count in clusters]
        if len(counts) != len(chosen):
            raise TietaError(f"clusters gives {len(counts)} counts for {len(chosen)} locations {chosen}")
    if min(counts) < 1:
        raise TietaError(f"ATC would keep no patch token at some location (clusters {counts}); raise the keep rate")
    claim_reduction(model, "ATC")
    token_state(model)  # the per-pass reset and size-weighted pooling that reduced models share
    for index, count in zip(chosen, counts):
        block = blocks[index]
        block.reduce = ATCReduce(count, linkage, prop_attn)
        keep_output(block.attn.k_norm)
    return model


def token_counts(model: nn.Module) -> list[int]:
    """Tokens entering each block's MLP (after its clustering)."""
    counts, tokens = [], model.patch_embed.num_patches + model.num_prefix_tokens
    prefix = model.num_prefix_tokens
    for block in model.blocks:
        step = block.reduce
        if isinstance(step, ATCReduce):
            tokens = prefix + min(step.clusters, tokens - prefix)
        counts.append(tokens)
    return counts


@dataclass
class ATCConfig:
    """ATC settings (the config section "atc")."""

    keep_rate: float = 0.7  # compounding per location: 137, 96, 67 of ViT-B/16's 196 patches
    locations: Optional[list[int]] = None  # None: 3, 6, 9 at depth 12, the same fractions of depth elsewhere
    linkage: str = "average"
    clusters: Optional[list[int]] = None  # patch tokens after each location, instead of keep_rate
    prop_attn: bool = True

    def check(self, prefix: str = "atc.") -> None:
        """Raise a TietaError, in one sentence, for settings that cannot work. ``prefix`` names the
        fields as the user wrote them: the config section's, or nothing for add_atc's arguments."""
        if not 0 < self.keep_rate <= 1:
            raise TietaError(f"{prefix}keep_rate must be in (0, 1], got {self.keep_rate}")
        if self.linkage not in LINKAGES:
            raise TietaError(f"{prefix}linkage must be one of {', '.join(LINKAGES)}, got {self.linkage!r}")
        if self.clusters is not None and any(count < 1 for count in self.clusters):
            raise TietaError(f"{prefix}clusters must be whole numbers of at least 1, got {list(self.clusters)}")


def _validate(config: Any) -> None:
    config.atc.check()


def _attach(model: nn.Module, config: Any) -> nn.Module:
    atc = config.atc
    return add_atc(model, atc.keep_rate, atc.locations, atc.linkage, atc.clusters, atc.prop_attn)


METHOD = Method(
    name="atc",
    sections={"atc": ATCConfig},
    attach=_attach,
    describe=lambda model: {"mlp_token_counts": token_counts(model)},
    validate=_validate,
    reduces_tokens=True,
    knob=Knob("atc.keep_rate", 0.05, 1.0, "low", doc="share of tokens kept at each location"),
)
