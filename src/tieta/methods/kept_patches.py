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
"""

from __future__ import annotations

from typing import Callable, Optional, Sequence

import torch
from torch import nn

from tieta.errors import TietaError
from tieta.methods.blocks import token_state_of

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


@torch.inference_mode()
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
    state = token_state_of(model)
    if state is None or not steps:
        raise TietaError("this model has no token decisions to show")
    patches, batch = model.patch_embed.num_patches, images.shape[0]
    masks: list[torch.Tensor] = []

    def record(module: nn.Module, args: tuple, out: torch.Tensor) -> None:
        real = padding() if padding is not None else None
        masks.append(patch_mask(state.positions, patches, batch, out.device, real))

    was_training, following = model.training, state.rope_follows
    handles = [step.register_forward_hook(record) for step in steps]
    model.eval()
    state.rope_follows = True  # the blocks of a ViT without rope never read the positions
    try:
        model(images)
    finally:
        state.rope_follows = following
        for handle in handles:
            handle.remove()
        model.train(was_training)
    return masks
