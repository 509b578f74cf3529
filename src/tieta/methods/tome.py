"""ToMe: bipartite soft matching and size-weighted merging (Bolya et al., ICLR 2023).

Pure tensor functions, testable on random tensors:

    matching = bipartite_soft_matching(metric, r, num_prefix)   # who merges into whom
    x, size = merge_wavg(matching, x, size)                     # size-weighted average
    source = merge_source(matching, source)                     # which input patches each token holds

Rules (as ``docs/methods.md`` states them): the tokens are split by position into A (even
indices) and B (odd); each A token finds its most similar B token by the cosine of the metric
(attention keys averaged over heads); the r A tokens with the best matches are merged into them.
Prefix tokens (class, distillation, registers) are protected: their rows (in A) or columns (in B)
of the score matrix are -inf, so they are never merged away nor merged into.

Output order: the prefix tokens first, in their original order, then the unmerged A tokens in
original order, then the B tokens. With a single class token this is ToMe's order exactly
([unmerged A, B] with the class token first); keeping every prefix token in front (the reference
code moves a distillation token behind the A tokens) is what lets timm's heads find them.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Optional

import torch

# PYRA's hook: (sources, their destinations) -> modulated sources, all (B, r, C)
Modulation = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]


@dataclass
class Matching:
    """One layer's merge decision for a batch.

    Attributes:
        unmerged: (B, Na - r, 1) indices into A of the A tokens that stay (prefix ones excluded),
            in original order.
        sources: (B, r, 1) indices into A of the merged tokens, best match first.
        destinations: (B, r, 1) indices into B of each source's match.
        num_prefix: prefix tokens kept in front, untouched.
    """

    unmerged: torch.Tensor
    sources: torch.Tensor
    destinations: torch.Tensor
    num_prefix: int

    @property
    def r(self) -> int:
        return self.sources.shape[1]


def max_merges(num_tokens: int, num_prefix: int) -> int:
    """The most tokens one layer can merge away: half of the unprotected tokens."""
    return max(0, (num_tokens - num_prefix) // 2)


@torch.no_grad()
def bipartite_soft_matching(metric: torch.Tensor, r: int, num_prefix: int = 1) -> Matching:
    """Decide which r tokens merge into which.

    Args:
        metric: (B, N, C) similarity features (keys averaged over heads).
        r: tokens to remove; clipped to ``max_merges(N, num_prefix)``.
        num_prefix: leading tokens that are never merged (class, distillation, registers).
    """
    metric = metric / metric.norm(dim=-1, keepdim=True)
    a, b = metric[:, ::2], metric[:, 1::2]
    scores = a @ b.transpose(-1, -2)  # (B, Na, Nb) cosine similarities
    prefix_a, prefix_b = (num_prefix + 1) // 2, num_prefix // 2
    if prefix_a:
        scores[:, :prefix_a, :] = -torch.inf
    if prefix_b:
        scores[:, :, :prefix_b] = -torch.inf
    r = min(r, max_merges(metric.shape[1], num_prefix))
    best_score, best_match = scores.max(dim=-1)  # (B, Na)
    order = best_score.argsort(dim=-1, descending=True)[..., None]  # (B, Na, 1)
    # prefix A rows are -inf, so they sort last and stay; they are dropped here and re-added in front
    unmerged = order[:, r:].sort(dim=1).values[:, prefix_a:]
    sources = order[:, :r]
    destinations = best_match[..., None].gather(dim=1, index=sources)
    return Matching(unmerged, sources, destinations, num_prefix)


def merge(matching: Matching, x: torch.Tensor, modulation: Optional[Modulation] = None) -> torch.Tensor:
    """Sum each merged token into its destination.

    Args:
        x: (B, N, C).
        modulation: optional PYRA re-activation applied to the sources before they are added.

    Returns:
        (B, N - r, C) in the order [prefix, unmerged A, B].
    """
    batch, _, channels = x.shape
    prefix = matching.num_prefix
    a, b = x[:, ::2], x[:, 1::2]
    kept = a.gather(dim=1, index=matching.unmerged.expand(-1, -1, channels))
    src = a.gather(dim=1, index=matching.sources.expand(-1, -1, channels))
    destinations = matching.destinations.expand(-1, -1, channels)
    if modulation is not None:
        src = modulation(src, b.gather(dim=1, index=destinations))
    b = b.scatter_reduce(1, destinations, src, reduce="sum")
    return torch.cat([x[:, :prefix], kept, b[:, prefix // 2:]], dim=1)


def merge_wavg(
    matching: Matching, x: torch.Tensor, size: Optional[torch.Tensor] = None,
    modulation: Optional[Modulation] = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Merge as a size-weighted average: ``x <- merge(x * size) / merge(size)``.

    Args:
        x: (B, N, C) tokens.
        size: (B, N, 1) how many input patches each token stands for; None means all ones.
        modulation: PYRA's re-activation, applied to the size-weighted sources; sizes are not modulated.

    Returns:
        ((B, N - r, C) tokens, (B, N - r, 1) sizes).
    """
    if size is None:
        size = x.new_ones(x.shape[0], x.shape[1], 1)
    x = merge(matching, x * size, modulation)
    size = merge(matching, size)
    return x / size, size


def merge_source(matching: Matching, source: Optional[torch.Tensor], num_tokens: int) -> torch.Tensor:
    """Track which input tokens each token holds (ToMe's source tracing, for visualisation).

    Args:
        source: (B, N, N0) 0/1 membership of the N0 input tokens; None means the identity (N = N0).
        num_tokens: N, used when source is None.

    Returns:
        (B, N - r, N0).
    """
    if source is None:
        batch = matching.sources.shape[0]
        source = torch.eye(num_tokens, device=matching.sources.device)[None].expand(batch, -1, -1)
    return merge(matching, source)


def add_tome(model, r="low", prop_attn: bool = True):
    """Merge tokens inside every block of a timm ViT, in place (ToMe, used in training and evaluation).

    Each block with r > 0 merges r tokens after its attention residual and before its MLP.

    Args:
        model: a timm VisionTransformer (LoRA, adapters and PYRA can be attached before or after).
        r: the schedule: an int, (r, inflection), a per-block list, or "low" / "high"
            (see ``tieta.methods.schedules``).
        prop_attn: proportional attention, log(size) added to the attention logits (the PYRA code
            keeps it on in training and evaluation).

    Returns:
        The same model; ``model.token_schedule`` holds the r per block.
    """
    # imported here: blocks.py builds on the functions above
    from tieta.methods.blocks import enable_token_merging
    from tieta.methods.schedules import resolve_schedule

    schedule = resolve_schedule(model, r)
    enable_token_merging(model, schedule, prop_attn)
    model.token_schedule = schedule
    return model
