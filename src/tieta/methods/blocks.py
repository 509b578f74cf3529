"""The one place that changes how a timm ViT block runs.

tieta never copies timm's attention or MLP code: a block keeps its own ``norm1``, ``attn``, ``ls1``,
``drop_path1``, ``norm2``, ``mlp``, ``ls2`` and ``drop_path2`` modules, and only the order in which the
block calls them is restated here, with room for tieta's additions. With every addition switched
off, a patched block computes exactly what timm's ``Block.forward`` computes.
"""

from __future__ import annotations

from typing import Optional

import torch
from torch import nn
from timm.models.vision_transformer import Block, VisionTransformer

from tieta.errors import TietaError


class TietaBlock(Block):
    """timm's pre-norm ``Block`` with an optional AdaptFormer adapter beside the MLP.

    ``x = x + attn(norm1(x)); x = x + mlp(norm2(x)) + adapter(x)`` where ``adapter`` sees the block
    stream after the attention residual (AdaptFormer's parallel form) and is not subject to
    LayerScale or drop-path, as in the reference code.
    """

    adapter: Optional[nn.Module]

    def forward(self, x: torch.Tensor, attn_mask: Optional[torch.Tensor] = None, **attn_kwargs) -> torch.Tensor:
        """Args: x: (B, N, D) tokens. Returns: (B, N, D)."""
        x = x + self.drop_path1(self.ls1(self.attn(self.norm1(x), attn_mask=attn_mask, **attn_kwargs)))
        out = x + self.drop_path2(self.ls2(self.mlp(self.norm2(x))))
        if self.adapter is not None:
            out = out + self.adapter(x)
        return out


def check_vit(model: nn.Module) -> None:
    """Raise a TietaError unless ``model`` is a timm VisionTransformer made of pre-norm ``Block``s."""
    if not isinstance(model, VisionTransformer):
        raise TietaError(
            f"tieta works on timm VisionTransformer models, and this model is a {type(model).__name__}"
        )
    for index, block in enumerate(model.blocks):
        if not isinstance(block, Block):
            raise TietaError(
                f"block {index} of this ViT is a {type(block).__name__}; tieta supports timm's pre-norm "
                "vision_transformer.Block only"
            )
        if type(block) not in (Block, TietaBlock):
            raise TietaError(
                f"block {index} is a {type(block).__name__}, a subclass of timm's Block whose forward tieta "
                "cannot vouch for"
            )


def patch_blocks(model: nn.Module) -> list[TietaBlock]:
    """Turn every block of a timm ViT into a TietaBlock in place (idempotent) and return them.

    The class swap keeps every submodule, parameter and state-dict key as timm made it.
    """
    check_vit(model)
    blocks = []
    for block in model.blocks:
        if type(block) is Block:
            block.__class__ = TietaBlock
            block.adapter = None
        blocks.append(block)
    return blocks
