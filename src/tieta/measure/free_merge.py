"""A ToMe model whose merges cost nothing, timed beside ToMe to leave exactly the merge's cost."""

from __future__ import annotations

import torch
from torch import nn

from tieta.methods.blocks import TietaBlock, take_output
from tieta.methods.tome import TokenMerge
from tieta.ops.merging import max_merges


class FreeMerge(TokenMerge):
    """A merge step that drops the last r tokens instead of merging (so it keeps no sizes, and
    proportional attention has nothing to add)."""

    def forward(self, x: torch.Tensor, block: TietaBlock) -> torch.Tensor:
        take_output(block.attn.k_norm)  # as the merge would: the keys are let go
        return x[:, : x.shape[1] - min(self.r, max_merges(x.shape[1], block.num_prefix_tokens))]


def free_merge(model: nn.Module) -> nn.Module:
    """A ToMe model's merges made free (see FreeMerge), in place; for measurement only."""
    for block in model.blocks:
        if isinstance(block.reduce, TokenMerge):
            block.reduce = FreeMerge(block.reduce.r)
    return model
