"""FPET: a learned checkerboard merge in one block of a PEFT-tuned ViT (Kim et al., CVPR 2025).

In the block at ``layer`` (6 of 12, as the reference's VTAB runs; the same fraction of depth
elsewhere), right after the attention residual:

    metric  = mean over heads of the keys, detached            (B, N, hd)
    metric  = metric + refinement(metric)                       the trained part: hd -> 32 -> hd
    M       = diff_matching(metric)                             (B, Na, Nb) hard 0/1, sigmoid gradient
    x, size = size-weighted merge of every A token into its B token

The patch grid is split like a checkerboard (``tieta.ops.fpet``), so the block halves the patch
tokens (196 -> 98 at ViT-B/16, 224 px) and every later block, its MLP included, runs on the rest;
proportional attention (log size) follows. Training and evaluation compute the same (the
refinement's dropout aside). The refinement is the reference's binary adapter: bias-free, ReLU,
dropout 0.1, its weights 1-bit (standardised, by sign, straight-through). The keys are detached, so
only the refinement learns from the matching; the PEFT part (LoRA, AdaptFormer) is tieta's own.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Optional, Sequence

import torch
import torch.nn.functional as F
from torch import nn

from tieta.errors import TietaError
from tieta.methods.blocks import (TietaBlock, check_vit, claim_reduction, follow_tokens, keep_output, patch_blocks,
                                  rotated, take_output, token_state)
from tieta.methods.knob import Knob, one_layer
from tieta.methods.method import MAX_WIDTH, Method, bounded
from tieta.methods.tome import size_bias_mask
from tieta.ops.fpet import Checkerboard, binary_weight, checkerboard, diff_matching, merge, merge_wavg, reference_grid

# the reference's weight precisions of the refinement: 1 (its setting) or full precision
REFINE_BITS = (1, 32)


class BinaryLinear(nn.Linear):
    """A bias-free ``nn.Linear`` whose weight is used 1-bit (``bits=1``) or as it is (``bits=32``)."""

    def __init__(self, in_features: int, out_features: int, bits: int = 1) -> None:
        super().__init__(in_features, out_features, bias=False)
        self.bits = bits

    def extra_repr(self) -> str:
        return f"{super().extra_repr()}, bits={self.bits}"

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.linear(x, binary_weight(self.weight) if self.bits == 1 else self.weight)


class Refinement(nn.Module):
    """``up(dropout(relu(down(k))))``: the trained correction of the keys FPET matches by.

    down: hd -> dim (kaiming-uniform, nn.Linear's own); up: dim -> hd, at 1 bit a truncated normal
    (std 0.001 in +-0.002, as the reference), at 32 bits zeros. Both bias-free.
    """

    def __init__(self, width: int, dim: int = 32, bits: int = 1, dropout: float = 0.1) -> None:
        super().__init__()
        self.down = BinaryLinear(width, dim, bits)
        self.act = nn.ReLU()
        self.dropout = nn.Dropout(dropout)
        self.up = BinaryLinear(dim, width, bits)
        if bits == 1:
            nn.init.trunc_normal_(self.up.weight, mean=0.0, std=0.001, a=-0.002, b=0.002)
        else:
            nn.init.zeros_(self.up.weight)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Args: x: (B, N, hd). Returns: (B, N, hd)."""
        return self.up(self.dropout(self.act(self.down(x))))


class FPETMerge(nn.Module):
    """The merging block's ``reduce`` step; its refinement is ``block.fpet``.

    Args:
        grid: (height, width) of the patch grid the model was made for.

    Buffers (not saved): the checkerboard's A and B patch indices for that grid.
    """

    def __init__(self, grid: tuple[int, int]) -> None:
        super().__init__()
        self.grid = tuple(grid)
        split = checkerboard(*self.grid)
        self.register_buffer("a_index", split.a, persistent=False)
        self.register_buffer("b_index", split.b, persistent=False)

    def extra_repr(self) -> str:
        return f"grid={self.grid}"

    def split(self, patches: int) -> Checkerboard:
        """The checkerboard of ``patches`` patch tokens: the model's grid, or for another image size
        the grid the reference assumes (14 wide for 196, else floor(sqrt(N)) wide)."""
        if patches == self.grid[0] * self.grid[1]:
            return Checkerboard(a=self.a_index, b=self.b_index)
        height, width = reference_grid(patches)
        if height * width != patches or height * width < 4:
            raise TietaError(f"FPET's checkerboard needs the patch grid, and {patches} patch tokens form none it "
                             f"can find; use the image size the model was made for ({self.grid[0]}x{self.grid[1]} "
                             "patches) or a square grid")
        return checkerboard(height, width, self.a_index.device)

    @staticmethod
    def matching(metric: torch.Tensor, split: Checkerboard, prefix: int) -> torch.Tensor:
        """diff_matching in float32 under mixed precision: a bfloat16 sigmoid rounds a best score
        that beats the second by a little to exactly 0.5, and the reference drops such a token
        (merged nowhere); in float32, as the reference runs, it merges."""
        device_type = metric.device.type
        if not torch.is_autocast_enabled(device_type):
            return diff_matching(metric, split, prefix)
        with torch.autocast(device_type, enabled=False):
            return diff_matching(metric.float(), split, prefix)

    def forward(self, x: torch.Tensor, block: TietaBlock) -> torch.Tensor:
        """Args: x: (B, N, D) after the attention residual. Returns: (B, prefix + Nb, D)."""
        state = block.token_state
        prefix = block.num_prefix_tokens
        patches = x.shape[1] - prefix
        split = self.split(patches)
        keys = rotated(block, take_output(block.attn.k_norm))  # (B, H, N, hd), as attention used them
        metric = keys.mean(dim=1).detach()
        metric = metric + block.fpet(metric)
        matching = self.matching(metric, split, prefix)  # (B, Na, Nb)
        if state.trace_source:
            source = state.source
            if source is None:
                source = torch.eye(x.shape[1], device=x.device, dtype=x.dtype)[None].expand(x.shape[0], -1, -1)
            state.source = merge(matching.detach(), source, split, prefix)
        if state.rope_follows:  # the B tokens keep their own positions
            follow_tokens(block, split.b[None].expand(x.shape[0], -1), patches)
        if state.dense is not None:  # an A patch takes its B token's value on the grid (none: dropped)
            state.dense.follow(_destinations(matching.detach(), split, patches), split.b.shape[0])
        x, state.size = merge_wavg(matching, x, state.size, split, prefix)
        if state.prop_attn:
            state.attn_bias = size_bias_mask(state.size, x)
        return x


def default_layer(depth: int) -> int:
    """The merging block: 6 at depth 12 (the reference's VTAB runs), the same fraction of depth elsewhere."""
    return depth // 2



def _destinations(matching: torch.Tensor, split: Checkerboard, patches: int) -> torch.Tensor:
    """(B, P) the B token each patch stays as or merges into, -1 for an A patch merged nowhere
    (``tieta.methods.restore``). Args: matching: (B, Na, Nb) 0/1 rows."""
    batch = matching.shape[0]
    into = torch.full((batch, patches), -1, dtype=torch.long, device=matching.device)
    into[:, split.b] = torch.arange(split.b.shape[0], device=matching.device)
    best, target = matching.max(dim=-1)  # (B, Na)
    into[:, split.a] = target.masked_fill(best <= 0, -1)
    return into


def add_fpet(model: nn.Module, layers: Optional[Sequence[int]] = None, refine_dim: int = 32, refine_bits: int = 1,
             prop_attn: bool = True) -> nn.Module:
    """FPET's learned token merge in one block of a timm ViT, in place.

    Args:
        model: a timm VisionTransformer or Eva (LoRA and adapters compose before or after).
        layers: the merging block, as a list of at most one index; None: depth // 2 (6 of 12);
            [] merges nothing (the checkerboard needs the full patch grid, so one block merges).
        refine_dim: the refinement's bottleneck width (32 in the reference).
        refine_bits: 1 (the reference's binary refinement) or 32 (full precision).
        prop_attn: proportional attention, log(size) added to the attention logits after the merge.

    Returns:
        The same model; the refinement is ``blocks[layer].fpet`` (the "fpet" parameter group).
    """
    # everything is checked before the model changes: a refused call leaves it as it was
    FPETConfig(layers=None if layers is None else [int(layer) for layer in layers], refine_dim=refine_dim,
               refine_bits=refine_bits, prop_attn=prop_attn).check(prefix="FPET's ")
    check_vit(model)
    blocks = list(model.blocks)
    chosen = [default_layer(len(blocks))] if layers is None else [int(layer) for layer in layers]
    if chosen and not 0 <= chosen[0] < len(blocks):
        raise TietaError(f"FPET's layer must be a block index in 0..{len(blocks) - 1}, got {chosen[0]}")
    if any(getattr(block, "fpet", None) is not None for block in blocks):
        raise TietaError("this model already has FPET")
    grid = tuple(model.patch_embed.grid_size)
    split = checkerboard(*grid)
    if chosen and (len(split.a) < 1 or len(split.b) < 2):
        raise TietaError(f"FPET's checkerboard of this model's {grid[0]}x{grid[1]} patch grid leaves fewer than 2 "
                         "tokens to merge into")
    if chosen:
        claim_reduction(model, "FPET")
    blocks = patch_blocks(model)
    if not chosen:
        return model
    state = token_state(model)
    state.prop_attn = prop_attn
    block = blocks[chosen[0]]
    like = next(block.parameters())
    refinement = Refinement(block.attn.head_dim, refine_dim, refine_bits).to(like.device, like.dtype)
    block.fpet = refinement.train(model.training)  # a model in evaluation gets no dropout from it
    block.reduce = FPETMerge(grid).to(like.device)
    keep_output(block.attn.k_norm)
    return model


def token_counts(model: nn.Module) -> list[int]:
    """Tokens entering each block's MLP (after its merge), at the model's own image size."""
    prefix = model.num_prefix_tokens
    tokens = model.patch_embed.num_patches + prefix
    counts = []
    for block in model.blocks:
        if isinstance(block.reduce, FPETMerge):
            tokens = prefix + len(block.reduce.b_index)
        counts.append(tokens)
    return counts


@dataclass
class FPETConfig:
    """FPET settings (the config section "fpet")."""

    layers: Optional[list[int]] = None  # None: [depth // 2] (6 at depth 12); [] merges nothing; one at most
    refine_dim: int = bounded(32, at_most=MAX_WIDTH)
    refine_bits: int = 1  # 1: the reference's binary refinement; 32: full precision
    prop_attn: bool = True

    def check(self, prefix: str = "fpet.") -> None:
        """Raise a TietaError, in one sentence, for settings that cannot work. ``prefix`` names the
        fields as the user wrote them: the config section's, or "FPET's " for add_fpet's arguments."""
        if self.layers is not None and len(self.layers) > 1:
            raise TietaError(f"{prefix}layers holds one block at most (FPET merges once: its checkerboard needs "
                             f"the full patch grid), got {self.layers}")
        if self.layers and self.layers[0] < 0:
            raise TietaError(f"{prefix}layers must hold a block index, got {self.layers}")
        if self.refine_bits not in REFINE_BITS:
            raise TietaError(f"{prefix}refine_bits must be 1 or 32, got {self.refine_bits}")
        if not 1 <= self.refine_dim <= MAX_WIDTH:
            raise TietaError(f"{prefix}refine_dim must be in 1..{MAX_WIDTH}, got {self.refine_dim}")


def _validate(config: Any) -> None:
    config.fpet.check()


METHOD = Method(
    name="fpet",
    sections={"fpet": FPETConfig},
    attach=lambda model, config: add_fpet(model, config.fpet.layers, config.fpet.refine_dim, config.fpet.refine_bits,
                                          config.fpet.prop_attn),
    modules=("fpet",),
    describe=lambda model: {"mlp_token_counts": token_counts(model)},
    validate=_validate,
    reduces_tokens=True,
    knob=Knob("fpet.layers", 1, 11, "low", one_layer, integer=True, doc="the block of its one merge (halving fixed)"),
    shows_merges=True,
)
