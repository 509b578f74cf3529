"""AdaptFormer: a small bottleneck MLP parallel to each block's MLP (the adapter DyT uses)."""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import nn

from tieta.errors import TietaError
from tieta.methods.blocks import patch_blocks
from tieta.methods.method import MAX_WIDTH, Method, bounded


class Adapter(nn.Module):
    """``scale * up(dropout(relu(down(x))))`` without the residual.

    down: D -> dim (kaiming-uniform, bias 0); up: dim -> D (zeros), so a fresh adapter outputs 0.
    It cannot be merged into the backbone (ReLU), so its cost counts at inference.
    """

    def __init__(self, width: int, dim: int = 8, scale: float = 1.0, dropout: float = 0.1) -> None:
        super().__init__()
        self.down = nn.Linear(width, dim)
        self.act = nn.ReLU()
        self.dropout = nn.Dropout(dropout) if dropout > 0 else nn.Identity()
        self.up = nn.Linear(dim, width)
        self.scale = scale
        nn.init.kaiming_uniform_(self.down.weight, a=math.sqrt(5))
        nn.init.zeros_(self.down.bias)
        nn.init.zeros_(self.up.weight)
        nn.init.zeros_(self.up.bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Args: x: (B, N, D). Returns: (B, N, D)."""
        return self.up(self.dropout(self.act(self.down(x)))) * self.scale


class MoEAdapter(nn.Module):
    """An adapter whose weights are a per-image mix of ``experts`` adapters (DyT's MoE-adapter).

    A router looks at the image's mean token and gives softmax weights over the experts; the
    experts' down and up matrices are mixed with them, so the tokens pass through one adapter's
    worth of compute. Each expert is initialised like :class:`Adapter` (up = 0: output 0).
    """

    def __init__(self, width: int, dim: int = 8, experts: int = 4, scale: float = 1.0, dropout: float = 0.1) -> None:
        super().__init__()
        self.router = nn.Linear(width, experts)
        self.down_weight = nn.Parameter(torch.empty(experts, dim, width))
        self.down_bias = nn.Parameter(torch.zeros(experts, dim))
        self.up_weight = nn.Parameter(torch.zeros(experts, width, dim))
        self.up_bias = nn.Parameter(torch.zeros(experts, width))
        self.act = nn.ReLU()
        self.dropout = nn.Dropout(dropout) if dropout > 0 else nn.Identity()
        self.scale = scale
        for expert in range(experts):
            nn.init.kaiming_uniform_(self.down_weight[expert], a=math.sqrt(5))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Args: x: (B, N, D). Returns: (B, N, D)."""
        weights = torch.softmax(self.router(x.mean(dim=1)), dim=-1)  # (B, E)
        down = torch.einsum("be,edD->bdD", weights, self.down_weight)  # (B, dim, D)
        up = torch.einsum("be,eDd->bDd", weights, self.up_weight)  # (B, D, dim)
        hidden = self.dropout(self.act(x @ down.transpose(1, 2) + (weights @ self.down_bias)[:, None]))
        return (hidden @ up.transpose(1, 2) + (weights @ self.up_bias)[:, None]) * self.scale


def add_adapter(model: nn.Module, dim: int = 8, scale: float = 1.0, dropout: float = 0.1) -> nn.Module:
    """Put an AdaptFormer adapter beside the MLP of every block of a timm ViT, in place.

    Each block then computes ``x = x + attn(norm1(x)); x = x + mlp(norm2(x)) + adapter(x)``.

    Args:
        model: a timm VisionTransformer.
        dim: bottleneck width (8 gives about 0.16M parameters on ViT-B, the DyT budget).
        scale: the adapter output's multiplier s.
        dropout: dropout after the ReLU.

    Returns:
        The same model.
    """
    if dim < 1:
        raise TietaError(f"adapter dim must be a positive integer, got {dim}")
    for block in patch_blocks(model):
        if block.adapter is not None:
            raise TietaError("this model already has adapters")
        like = next(block.parameters())
        block.adapter = Adapter(model.embed_dim, dim, scale, dropout).to(like.device, like.dtype)
    return model


@dataclass
class AdapterConfig:
    """AdaptFormer settings (the config section "adapter"; DyT's adapters use its scale and dropout)."""

    dim: int = bounded(8, at_most=MAX_WIDTH)
    scale: float = 1.0
    dropout: float = 0.1


def _validate(config) -> None:
    adapter = config.adapter
    if adapter.dim < 1:
        raise TietaError(f"adapter.dim must be a positive integer, got {adapter.dim}")
    if not 0 <= adapter.dropout < 1:
        raise TietaError(f"adapter.dropout must be in [0, 1), got {adapter.dropout}")


METHOD = Method(
    name="adapter",
    sections={"adapter": AdapterConfig},
    attach=lambda model, config: add_adapter(model, config.adapter.dim, config.adapter.scale, config.adapter.dropout),
    modules=("adapter",),
    validate=_validate,
)
