"""Which patches a token-reducing method still carries after each of its token decisions, over the
patch grid (``tieta show-tokens``, as EViT's and DynamicViT's papers draw them).

Every reduction step already records, for rotary position embeddings, the grid position each of
its remaining patch tokens stands at (``TokenState.positions``, kept by ``tieta.ops.rope.follow``):
a kept token (or a merge destination) its own, a fused or package token none (``NO_POSITION``).
The positions are per image and map back through every earlier step, however pruning reordered
the tokens. A ViT without rope never reads them, so switching that bookkeeping on for one
evaluation pass changes nothing the model computes; a forward hook on each decision step copies
the positions the step leaves:

    masks = kept_patch_masks(model, images, steps)   # [(B, P) bool per step], P patches

A mask is True where the patch is still a token of its own after the step; a patch that was
pruned, fused into EViT's extra token, folded into an SPViT package or merged into another token
is False (and stays False: the masks are nested). Prefix tokens are never in a mask.

A method whose steps trace merge sources (``TokenState.source``, DiffRate's) can show instead which
patches some token still holds, merged ones included (``held_patch_masks``): False only where a
patch was pruned.
"""

from __future__ import annotations

from typing import Callable, Optional, Sequence

import torch
from torch import nn

from tieta.errors import TietaError
from tieta.methods.blocks import TokenState, token_state_of

# what a step leaves besides positions: (B, m) False for padding among its first m patch tokens
# (SPViT's argmax decisions pad each image to the batch's largest count), or None
Padding = Callable[[], Optional[torch.Tensor]]


def patch_mask(positions: Optional[torch.Tensor], patches: int, batch: int, device: torch.device,
               real: Optional[torch.Tensor] = None) -> torch.Tensor:
    """(B, P) True at the grid positions that ``positions`` (B, P') holds.

    Args:
        positions: grid position of each patch token, ``NO_POSITION`` (negative) for one that stands
            at none; None: the full grid, before any step changed it.
        patches: P.
        real: (B, m) False where one of the first m tokens is padding, not a token; None: all real.
    """
    if positions is None:
        return torch.ones(batch, patches, dtype=torch.bool, device=device)
    stands = positions >= 0
    if real is not None:
        stands[:, :real.shape[1]] &= real.to(device)
    index = positions.masked_fill(~stands, patches)  # the ones that stand nowhere go to a spare column
    mask = torch.zeros(batch, patches + 1, dtype=torch.bool, device=positions.device)
    return mask.scatter(1, index, True)[:, :patches]


def kept_patch_masks(model: nn.Module, images: torch.Tensor, steps: Sequence[nn.Module],
                     padding: Optional[Padding] = None) -> list[torch.Tensor]:
    """The patches still carried by a token of their own after each decision step, in evaluation.

    Args:
        model: a ViT with a token-reducing method attached.
        images: (B, 3, H, W) normalised inputs.
        steps: the method's decision steps (a block's ``select`` or ``reduce`` slot), in block order.
        padding: what tells padding from tokens after a step (SPViT's argmax decisions), or None.

    Returns:
        One (B, P) bool tensor per step, P the model's patches.
    """
    patches, batch = model.patch_embed.num_patches, images.shape[0]

    def read(state: TokenState, out: torch.Tensor) -> torch.Tensor:
        real = padding() if padding is not None else None
        return patch_mask(state.positions, patches, batch, out.device, real)

    return _after_each_step(model, images, steps, read, "rope_follows")


def held_patch_masks(model: nn.Module, images: torch.Tensor, steps: Sequence[nn.Module]) -> list[torch.Tensor]:
    """The patches some token still holds after each decision step (its own, or one it was merged
    into), in evaluation: False only where a patch was pruned. For a method whose steps trace merge
    sources (``TokenState.source``, as DiffRate's do at evaluation).

    Returns:
        One (B, P) bool tensor per step.
    """
    def read(state: TokenState, out: torch.Tensor) -> torch.Tensor:
        prefix = model.num_prefix_tokens
        if state.source is None:  # no step has changed the tokens yet
            return torch.ones(images.shape[0], model.patch_embed.num_patches, dtype=torch.bool, device=out.device)
        return state.source[:, :, prefix:].amax(dim=1) > 0  # (B, P), over every token, prefix ones hold none

    return _after_each_step(model, images, steps, read, "trace_source")


@torch.inference_mode()
def _after_each_step(model: nn.Module, images: torch.Tensor, steps: Sequence[nn.Module],
                     read: Callable[[TokenState, torch.Tensor], torch.Tensor], bookkeeping: str) -> list[torch.Tensor]:
    """One evaluation pass with the token state's ``bookkeeping`` switch on (``rope_follows`` or
    ``trace_source``: what the steps record, never what the model computes); ``read(state, out)``
    after each step. The model's mode and the switch are as they were afterwards."""
    state = token_state_of(model)
    if state is None or not steps:
        raise TietaError("this model has no token decisions to show")
    masks: list[torch.Tensor] = []
    handles = [step.register_forward_hook(lambda module, args, out: masks.append(read(state, out))) for step in steps]
    was_training, switched = model.training, getattr(state, bookkeeping)
    model.eval()
    setattr(state, bookkeeping, True)
    try:
        model(images)
    finally:
        setattr(state, bookkeeping, switched)
        for handle in handles:
            handle.remove()
        model.train(was_training)
    return masks
