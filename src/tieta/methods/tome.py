"""ToMe: token merging inside every block of a timm ViT (Bolya et al., ICLR 2023).

Each block with r > 0 merges r tokens after its attention residual and before its MLP, by the
bipartite soft matching of ``tieta.ops.merging`` on the keys its attention just used; the tokens
carry their sizes, and proportional attention adds log(size) to the next blocks' logits. It
merges in training too, as the papers do. On the CPU in float32 evaluation the merge runs as
one native call (``tieta.native.tome_merge``), which computes what the tensor code computes;
under ``torch.compile`` and ``torch.export`` (an opaque C call would split the graph) the tensor
code runs.
"""

from __future__ import annotations

from typing import Any, Optional

import torch
from torch import nn

from tieta.methods.blocks import (TietaBlock, Unchanged, claim_reduction, follow_matching, keep_output, patch_blocks,
                                  release_output, rotated, take_output, token_state)
from tieta.methods.knob import Knob, flops_schedule
from tieta.methods.method import Method
from tieta.methods.state import method_setting, set_method_setting
from tieta.methods.schedules import (MergeConfig, resolve_schedule, schedule_setting, token_counts, validate_merge,
                                     vit_shape)
from tieta.native.tome_merge import native_merge, native_merge_applies
from tieta.ops.merging import bipartite_soft_matching, max_merges, merge_source, merge_wavg


class TokenMerge(nn.Module):
    """A merging block's ``reduce`` step: merge ``r`` tokens (fewer where the tokens run short).

    Args:
        r: tokens this block merges away.
    """

    def __init__(self, r: int) -> None:
        super().__init__()
        self.r = r

    def extra_repr(self) -> str:
        return f"r={self.r}"

    def modulation(self, block: TietaBlock) -> Optional[nn.Module]:
        """What re-activates the merged tokens before they are added (PYRA's step overrides it)."""
        return None

    def forward(self, x: torch.Tensor, block: TietaBlock) -> torch.Tensor:
        """Args: x: (B, N, D) after the attention residual. Returns: (B, N - r, D)."""
        state = block.token_state
        keys = rotated(block, take_output(block.attn.k_norm))  # (B, H, N, hd), rotated as attention used them
        modulation = self.modulation(block)
        prefix = block.num_prefix_tokens
        # a ctypes call cannot be traced: torch.compile and torch.export (ONNX) take the tensor
        # merge below, which computes the same, and so keep the whole forward pass in one graph;
        # rotary embeddings follow the kept rows, which only the tensor merge gives
        if (not state.trace_source and not state.follows_tokens() and not torch.compiler.is_compiling()
                and native_merge_applies(keys, x, modulation)):
            r = min(self.r, max_merges(x.shape[1], prefix))
            merged = native_merge(keys, x, state.size, r, prefix, modulation)
            if merged is not None:  # None: no compiler here; the tensor code below does the same
                x, state.size, size_bias = merged
                state.attn_bias = size_bias if state.prop_attn else None
                return x
        # the sum over heads is the spec's mean up to a factor that the cosine similarity ignores
        matching = bipartite_soft_matching(keys.sum(dim=1), self.r, prefix)
        if state.trace_source:
            state.source = merge_source(matching, state.source, x.shape[1])
        if state.follows_tokens():  # a merged token keeps its destination's position, the others their own
            follow_matching(block, matching, x.shape[0], x.shape[1], prefix)
        x, state.size = merge_wavg(matching, x, state.size, modulation)
        if state.prop_attn:
            state.attn_bias = size_bias_mask(state.size, x)
        return x


def size_bias_mask(size: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    """log(size) per key as an additive attention mask (B, 1, 1, N), in the dtype attention runs in."""
    bias = size.log().view(size.shape[0], 1, 1, size.shape[1])
    device_type = x.device.type
    dtype = torch.get_autocast_dtype(device_type) if torch.is_autocast_enabled(device_type) else x.dtype
    return bias if bias.dtype == dtype else bias.to(dtype)


def attach_merging(model: nn.Module, schedule: list[int], prop_attn: bool, step: type = TokenMerge) -> None:
    """Give each block with r > 0 a ``step(r)`` as its reduce slot (in place).

    Args:
        schedule: r per block, as resolve_schedule returns it.
        step: TokenMerge or a subclass (PYRA's).
    """
    if any(schedule):  # refuse before changing anything, so that a refused call leaves the model as it was
        claim_reduction(model, "ToMe")
    blocks = patch_blocks(model)
    state = token_state(model)
    state.prop_attn = prop_attn
    for block, r in zip(blocks, schedule):
        block.reduce = step(int(r)) if r > 0 else Unchanged()
        if r > 0:
            keep_output(block.attn.k_norm)
        else:
            release_output(block.attn.k_norm)
    set_method_setting(model, "tome", "token_schedule", list(schedule))


def add_tome(model: nn.Module, r: Any = "low", prop_attn: bool = True) -> nn.Module:
    """Merge tokens inside every block of a timm ViT, in place (ToMe, used in training and evaluation).

    Args:
        model: a timm VisionTransformer (LoRA, adapters, DyT's MLP dispatch and PYRA can be
            attached before or after).
        r: the schedule: an int, (r, inflection), a per-block list, or "low" / "high"
            (see ``tieta.methods.schedules``).
        prop_attn: proportional attention, log(size) added to the attention logits (the PYRA code
            keeps it on in training and evaluation).

    Returns:
        The same model; ``model.token_schedule`` (:func:`token_schedule`) reads the r per block.
    """
    attach_merging(model, resolve_schedule(model, r), prop_attn)
    return model


def token_schedule(model: nn.Module) -> list[int]:
    """The merge schedule ToMe (or PYRA) was attached with: r per block; empty without merging."""
    return method_setting(model, "tome", "token_schedule", [])


def describe_merging(model: nn.Module) -> dict[str, Any]:
    """The merge schedule and the tokens entering each block (then leaving the last)."""
    schedule = token_schedule(model)
    return {"schedule": list(schedule), "token_counts": token_counts(vit_shape(model), schedule)}


METHOD = Method(
    name="tome",
    sections={"merge": MergeConfig},
    attach=lambda model, config: add_tome(model, schedule_setting(config.merge), config.merge.prop_attn),
    describe=describe_merging,
    validate=validate_merge,  # the section PYRA shares
    shows_merges=True,
    reduces_tokens=True,
    knob=Knob("merge.schedule", 0.05, 1.0, "low", flops_schedule,
              doc="FLOPs ratio its decreasing schedule reaches ({flops, inflection: -0.9})"),
)
