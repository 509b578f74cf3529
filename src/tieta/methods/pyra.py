"""PYRA: Parallel Yielding Re-Activation of merged tokens (Xiong et al., ECCV 2024).

PYRA changes only how the r source tokens of each merge are treated before they are added to
their destinations. With the size-weighted features (x * size), per block:

    M     = LayerNorm(src + dst)                  (B, r, D)
    w_ch  = 2 * sigmoid(W_r^T @ M)                (B, 1, D)  channel weight, one per image
    w_tok = 2 * sigmoid(M @ W_D^T) - 1            (B, r, 1)  token weight, one per pair
    src   = src + (src * w_ch) * w_tok

Row k of W_r belongs to the k-th most similar pair. W_D starts at zero, so an untrained PYRA
model is exactly the ToMe model.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any, Optional

import torch
from torch import nn

from tieta.errors import TietaError
from tieta.methods.blocks import TietaBlock, patch_blocks
from tieta.methods.knob import Knob, flops_schedule
from tieta.methods.method import Method
from tieta.methods.schedules import MergeConfig, resolve_schedule, schedule_setting
from tieta.methods.tome import TokenMerge, attach_merging, describe_merging


class PyraModulation(nn.Module):
    """One block's re-activation: ``r + D + 2D`` parameters.

    Args:
        r: merges in this block (rows of W_r).
        width: D.

    Attributes:
        channel_weight: W_r, (r, 1); kaiming-uniform (a = sqrt 5) as in the reference code (the
            paper says Gaussian).
        token_weight: W_D, (1, D); zeros.
        norm: LayerNorm(D).
    """

    def __init__(self, r: int, width: int) -> None:
        super().__init__()
        self.channel_weight = nn.Parameter(torch.empty(r, 1))
        self.token_weight = nn.Parameter(torch.zeros(1, width))
        self.norm = nn.LayerNorm(width)
        nn.init.kaiming_uniform_(self.channel_weight, a=math.sqrt(5))

    def forward(self, src: torch.Tensor, dst: torch.Tensor) -> torch.Tensor:
        """Args: src, dst: (B, r, D) size-weighted sources (best match first) and their destinations.
        Returns: (B, r, D) re-activated sources."""
        mixed = self.norm(src + dst)
        r = src.shape[1]  # may be below the schedule's r where the tokens ran short
        channel = 2 * torch.sigmoid(self.channel_weight[:r].transpose(0, 1) @ mixed)  # (B, 1, D)
        token = 2 * torch.sigmoid(mixed @ self.token_weight.transpose(0, 1)) - 1  # (B, r, 1)
        return src + (src * channel) * token


class ReactivatedMerge(TokenMerge):
    """ToMe's merge step with the block's PYRA re-activation (``block.pyra``)."""

    def modulation(self, block: TietaBlock) -> Optional[nn.Module]:
        return block.pyra


def add_pyra(model: nn.Module, r: Any = "low", prop_attn: bool = True) -> nn.Module:
    """ToMe with PYRA's trainable re-activation in every merging block, in place.

    Args:
        model: a timm VisionTransformer.
        r: the merge schedule, as for ``add_tome``.
        prop_attn: proportional attention.

    Returns:
        The same model; PYRA's modules are ``blocks[i].pyra`` (the "pyra" parameter group).
    """
    if any(getattr(block, "pyra", None) is not None for block in patch_blocks(model)):
        raise TietaError("this model already has PYRA")
    schedule = resolve_schedule(model, r)
    attach_merging(model, schedule, prop_attn, step=ReactivatedMerge)
    for block, merges in zip(model.blocks, schedule):
        if merges > 0:
            like = next(block.parameters())
            block.pyra = PyraModulation(merges, model.embed_dim).to(like.device, like.dtype)
    return model


# PYRA's learning rate by name: the published runs trained PYRA at the base lr (the reference
# code's separate flag never reached its optimizer); the script meant 1e-4
PYRA_LRS = {"reference": None, "paper": 1e-4}


@dataclass
class PyraConfig:
    lr: Any = field(default="reference", metadata={"any_type": True})  # "reference", "paper" or a number


def _check_lr(config: Any) -> None:
    lr = config.pyra.lr
    number = isinstance(lr, (int, float)) and not isinstance(lr, bool)
    if not ((isinstance(lr, str) and lr in PYRA_LRS) or (number and math.isfinite(lr) and lr > 0)):
        raise TietaError(f"pyra.lr must be 'reference' (the base lr), 'paper' (1e-4) or a positive number, got {lr!r}")


def _learning_rates(config: Any) -> dict[str, float]:
    lr = PYRA_LRS[config.pyra.lr] if isinstance(config.pyra.lr, str) else config.pyra.lr
    return {} if lr is None else {"pyra": float(lr)}


METHOD = Method(
    name="pyra",
    sections={"merge": MergeConfig, "pyra": PyraConfig},
    attach=lambda model, config: add_pyra(model, schedule_setting(config.merge), config.merge.prop_attn),
    modules=("pyra",),
    learning_rates=_learning_rates,
    describe=describe_merging,
    validate=_check_lr,
    shows_merges=True,
    reduces_tokens=True,
    knob=Knob("merge.schedule", 0.05, 1.0, "low", flops_schedule,
              doc="FLOPs ratio its decreasing schedule reaches ({flops, inflection: -0.9})"),
)
