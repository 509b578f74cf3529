"""MCTF as a tieta method: multi-criteria token fusion with one-step-ahead attention (Lee et al., CVPR 2024).

At the start of each fusing block (all but the first by default), the block's attention
probabilities are computed on the tokens it receives; they score the tokens' informativeness, and
with similarity and size they decide which ``r`` tokens fuse into which (``tieta.ops.mctf``). The
tokens are pooled, and so is the attention map: the block's attention then runs on the fused
tokens with that fused map (one-step-ahead attention: the attention that decided the fusion is the
one the fused tokens use, computed once). Sizes add up, and proportional attention adds log(size)
to the later blocks' logits, as in ToMe. No parameters are added; the same runs in training and
evaluation.

Its fine-tuning objective (``mctf_loss``) runs two passes: the student at ``r`` and a teacher
that fuses fewer tokens (a random r below ``teacher_r``, drawn per batch); both learn the labels,
and the student's final class token is pulled to the teacher's (detached) on the images it already
classifies with confidence above a threshold (the token-reduction consistency).

timm's Eva models (rotary embeddings) are refused: which position a fused token would rotate by
is not defined by the reference.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Optional, Sequence

import torch
import torch.nn.functional as F
from timm.models.eva import Eva
from torch import nn

from tieta import shard
from tieta.errors import TietaError
from tieta.methods.blocks import (Branch, PassState, TietaBlock, claim_reduction, pass_state, patch_blocks,
                                  token_state)
from tieta.methods.knob import Knob, whole
from tieta.methods.method import Method
from tieta.methods.tome import size_bias_mask
from tieta.ops.mctf import (attention_weighted_fusion, bidirectional_matching, consistency_loss, fusion_scores,
                            merge_count, pool)


class AheadState(PassState):
    """The fused attention map a fusing block leaves for its own attention branch, within one pass."""

    def __init__(self) -> None:
        self.attention: Optional[torch.Tensor] = None  # (B, H, N', N')

    def reset(self) -> None:
        self.attention = None


def _linear_rows(layer: nn.Module, x: torch.Tensor, start: int, stop: int) -> torch.Tensor:
    """Output features ``start:stop`` of a linear layer: only those rows are computed (the reference
    computes q and k, then v, each on its own tokens) of a plain ``nn.Linear`` and of a layer that
    offers ``output_rows`` (LoRA's: run whole, it would cost MCTF a second qkv projection per
    fusing block); any other layer runs whole and is sliced."""
    if type(layer) is nn.Linear:
        bias = None if layer.bias is None else layer.bias[start:stop]
        return F.linear(x, layer.weight[start:stop], bias)
    if hasattr(layer, "output_rows"):
        return layer.output_rows(x, start, stop)
    return layer(x)[..., start:stop]


def attention_probabilities(attn: nn.Module, x: torch.Tensor, bias: Optional[torch.Tensor]) -> torch.Tensor:
    """softmax(q k^T * scale + bias) of a timm ``Attention`` on ``x``, (B, H, N, N).

    Args: x: (B, N, D) normalised tokens; bias: additive (B, 1, 1, N) log size, or None.
    """
    batch, tokens, _ = x.shape
    qk = _linear_rows(attn.qkv, x, 0, 2 * attn.attn_dim)
    q, k = qk.reshape(batch, tokens, 2, attn.num_heads, attn.head_dim).permute(2, 0, 3, 1, 4).unbind(0)
    q, k = attn.q_norm(q), attn.k_norm(k)
    logits = (q @ k.transpose(-2, -1)) * attn.scale
    if bias is not None:
        logits = logits + bias
    return logits.softmax(dim=-1)


def attend_with(attn: nn.Module, x: torch.Tensor, probabilities: torch.Tensor) -> torch.Tensor:
    """A timm ``Attention``'s output on ``x`` with given probabilities (only v is projected).

    Args: x: (B, N, D) normalised tokens; probabilities: (B, H, N, N). Returns: (B, N, D).
    """
    batch, tokens, _ = x.shape
    gate = attn.gate(x).sigmoid() if getattr(attn, "gate", None) is not None else None
    v = _linear_rows(attn.qkv, x, 2 * attn.attn_dim, 3 * attn.attn_dim)
    v = v.reshape(batch, tokens, attn.num_heads, attn.head_dim).transpose(1, 2)
    out = (attn.attn_drop(probabilities) @ v).transpose(1, 2).reshape(batch, tokens, attn.attn_dim)
    out = attn.norm(out)
    if gate is not None:
        out = out * gate
    return attn.proj_drop(attn.proj(out))


class MultiCriteriaFusion(nn.Module):
    """A fusing block's ``select`` step: fuse ``r`` tokens before the block, by its own attention.

    Args:
        r: tokens fused away (a count >= 1, or a share < 1 of the non-prefix tokens).
        tau_sim, tau_info, tau_size: the criteria's temperatures (0 leaves one out).
        bidirectional: A into B, then B into A.
        ahead: the state that hands the fused attention map to the block's attention branch.
    """

    def __init__(self, r: float, tau_sim: float, tau_info: float, tau_size: float, bidirectional: bool,
                 ahead: AheadState) -> None:
        super().__init__()
        self.r, self.tau_sim, self.tau_info, self.tau_size = r, tau_sim, tau_info, tau_size
        self.bidirectional = bidirectional
        self.ahead = ahead

    def extra_repr(self) -> str:
        return (f"r={self.r}, tau_sim={self.tau_sim}, tau_info={self.tau_info}, tau_size={self.tau_size}, "
                f"bidirectional={self.bidirectional}")

    def forward(self, x: torch.Tensor, block: TietaBlock) -> torch.Tensor:
        """Args: x: (B, N, D) entering the block. Returns: (B, N - r, D)."""
        prefix = block.num_prefix_tokens
        r = merge_count(x.shape[1], self.r, prefix)
        if r == 0:
            return x  # the block attends as usual
        state = block.token_state
        probabilities = attention_probabilities(block.attn, block.norm1(x), state.attn_bias)
        scores = fusion_scores(x, probabilities, state.size, prefix, self.tau_sim, self.tau_info, self.tau_size)
        fusion = bidirectional_matching(scores, r, x.shape[1], prefix, self.bidirectional)
        if state.trace_source:
            source = state.source
            if source is None:
                source = torch.eye(x.shape[1], device=x.device)[None].expand(x.shape[0], -1, -1)
            state.source = pool(fusion, source)
        if state.dense is not None:  # a fused position takes its group's value on the grid
            state.dense.follow(fusion.group[:, prefix:] - prefix, fusion.num_out - prefix)
        x, state.size, self.ahead.attention = attention_weighted_fusion(fusion, x, state.size, probabilities)
        if state.prop_attn:
            state.attn_bias = size_bias_mask(state.size, x)
        return x


class AheadAttention(nn.Module):
    """A fusing block's ``attn_gate``: after a fusion, the attention branch uses the fused map."""

    def __init__(self, ahead: AheadState) -> None:
        super().__init__()
        self.ahead = ahead

    def forward(self, x: torch.Tensor, branch: Branch, mask: Optional[torch.Tensor], block: TietaBlock) -> torch.Tensor:
        """Args: x: (B, N', D). Returns: the attention branch's (B, N', D)."""
        probabilities, self.ahead.attention = self.ahead.attention, None
        if probabilities is None:
            return branch(x, mask)
        return block.drop_path1(block.ls1(attend_with(block.attn, block.norm1(x), probabilities)))


def default_layers(depth: int) -> list[int]:
    """Every block but the first (the reference's ``--activate_layer [1, ..., 11]`` at depth 12)."""
    return list(range(1, depth))


def add_mctf(model: nn.Module, r: float = 16, layers: Optional[Sequence[int]] = None, tau_sim: float = 1.0,
             tau_info: float = 20.0, tau_size: float = 40.0, bidirectional: bool = True,
             prop_attn: bool = True) -> nn.Module:
    """MCTF in the blocks at ``layers`` of a timm ViT, in place.

    Args:
        model: a timm VisionTransformer (LoRA and adapters compose before or after).
        r: tokens fused at the start of each of those blocks (a whole count), or a share in (0, 1) of
            the non-prefix tokens; 0 changes nothing. At least 10 tokens always stay.
        layers: block indices; None: every block but the first.
        tau_sim, tau_info, tau_size: temperatures of similarity, informativeness and size (0 leaves
            a criterion out).
        bidirectional: fuse A into B, then B into A (half of r each way).
        prop_attn: proportional attention, log(size) added to the attention logits.

    Returns:
        The same model.
    """
    MCTFConfig(r=r, layers=layers, tau_sim=tau_sim, tau_info=tau_info, tau_size=tau_size,
               bidirectional=bidirectional, prop_attn=prop_attn).check(prefix="MCTF's ")
    if isinstance(model, Eva):
        raise TietaError("MCTF works on timm VisionTransformer models, not on Eva: where a fused token stands for "
                         "rotary embeddings is not defined")
    blocks = patch_blocks(model)
    chosen = default_layers(len(blocks)) if layers is None else list(layers)
    if (any(isinstance(index, bool) or not isinstance(index, int) or not 0 <= index < len(blocks) for index in chosen)
            or len(set(chosen)) != len(chosen)):
        raise TietaError(f"mctf layers must be distinct block indices below {len(blocks)}, got {chosen}")
    if r > 0 and chosen:
        claim_reduction(model, "MCTF")
    state = token_state(model)
    state.prop_attn = prop_attn
    ahead = pass_state(model, "mctf_ahead", AheadState)
    for index in chosen:
        blocks[index].select = MultiCriteriaFusion(r, tau_sim, tau_info, tau_size, bidirectional, ahead)
        blocks[index].attn_gate = AheadAttention(ahead)
    return model


def fusion_steps(model: nn.Module) -> list[MultiCriteriaFusion]:
    """The model's fusing steps, in block order."""
    return [block.select for block in model.blocks if isinstance(block.select, MultiCriteriaFusion)]


def token_counts(model: nn.Module) -> list[int]:
    """Tokens each block runs its attention's values and its MLP on (after its fusion)."""
    counts, tokens = [], model.patch_embed.num_patches + model.num_prefix_tokens
    for block in model.blocks:
        if isinstance(block.select, MultiCriteriaFusion):
            tokens -= merge_count(tokens, block.select.r, model.num_prefix_tokens)
        counts.append(tokens)
    return counts


def _logits_and_class_token(model: nn.Module, images: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """One pass: the logits (B, classes) and the head's input (B, D), the final class token."""
    features = model.forward_features(images)
    return model.forward_head(features), model.forward_head(features, pre_logits=True)


def mctf_loss(model: nn.Module, images: torch.Tensor, labels: torch.Tensor, teacher_r: int = 8,
              threshold: float = 0.4, weights: Sequence[float] = (1.0, 1.0, 3.0)) -> torch.Tensor:
    """MCTF's fine-tuning objective for one batch (runs the model twice).

    ``w_s CE(student) + w_t CE(teacher) + w_c sum_i c_i d_i / sum_i c_i``: the student fuses ``r``
    tokens per block, the teacher a random whole r in [0, teacher_r) (one draw per batch); d_i is
    the mean squared difference of the student's final class token (the head's input) to the
    teacher's, detached; c_i is 1 where the student's probability of the label exceeds
    ``threshold`` (no gradient). With w_t = w_c = 0 the teacher pass is skipped.
    """
    student_weight, teacher_weight, consistency_weight = weights
    logits, student_features = _logits_and_class_token(model, images)
    loss = student_weight * shard.cross_entropy(logits, labels)
    if not (teacher_weight or consistency_weight):
        return loss
    steps = fusion_steps(model)
    student_r = [step.r for step in steps]
    teacher = int(torch.randint(0, teacher_r, (1,))) if teacher_r > 0 else 0
    for step in steps:
        step.r = teacher
    try:
        teacher_logits, teacher_features = _logits_and_class_token(model, images)
    finally:
        for step, r in zip(steps, student_r):
            step.r = r
    loss = loss + teacher_weight * shard.cross_entropy(teacher_logits, labels)
    with torch.no_grad():
        confident = (logits.softmax(dim=-1).gather(1, labels[:, None])[:, 0] > threshold).to(logits.dtype)
    distance = consistency_loss(teacher_features, student_features)
    consistency = shard.batch_mean(distance * confident) / shard.batch_mean(confident).clamp_min(1e-12)
    return loss + consistency_weight * consistency


@dataclass
class MCTFConfig:
    """MCTF settings (the config section "mctf"); the defaults are the reference's DeiT settings."""

    r: float = 16  # tokens fused per block (a whole count), or a share in (0, 1)
    layers: Optional[list[int]] = None  # None: every block but the first
    tau_sim: float = 1.0
    tau_info: float = 20.0
    tau_size: float = 40.0
    bidirectional: bool = True
    prop_attn: bool = True
    teacher_r: int = 8  # the teacher pass fuses a random r in [0, teacher_r) per block
    threshold: float = 0.4  # consistency only where the student's label probability exceeds this
    student_weight: float = 1.0
    teacher_weight: float = 1.0
    consistency_weight: float = 3.0

    def check(self, prefix: str = "mctf.") -> None:
        """Raise a TietaError, in one sentence, for settings that cannot work. ``prefix`` names the
        fields as the user wrote them: the config section's, or "MCTF's " for add_mctf's arguments."""
        if not (self.r >= 0 and (self.r < 1 or float(self.r).is_integer())):
            raise TietaError(f"{prefix}r must be a whole number of tokens or a share in [0, 1), got {self.r}")
        if min(self.tau_sim, self.tau_info, self.tau_size) < 0:
            raise TietaError(f"{prefix}tau_sim, {prefix}tau_info and {prefix}tau_size are temperatures and cannot "
                             "be negative (0 leaves a criterion out)")
        if self.teacher_r < 0 or min(self.student_weight, self.teacher_weight, self.consistency_weight) < 0:
            raise TietaError(f"{prefix}teacher_r and the loss weights cannot be negative")


def _attach(model: nn.Module, config: Any) -> nn.Module:
    mctf = config.mctf
    return add_mctf(model, mctf.r, mctf.layers, mctf.tau_sim, mctf.tau_info, mctf.tau_size, mctf.bidirectional,
                    mctf.prop_attn)


def _objective(config: Any):
    mctf = config.mctf
    weights = (mctf.student_weight, mctf.teacher_weight, mctf.consistency_weight)

    def step(model: nn.Module, images: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        return mctf_loss(model, images, labels, mctf.teacher_r, mctf.threshold, weights)

    return step


def _validate(config: Any) -> None:
    config.mctf.check()


METHOD = Method(
    name="mctf",
    sections={"mctf": MCTFConfig},
    attach=_attach,
    objective=_objective,
    describe=lambda model: {"block_token_counts": token_counts(model)},
    validate=_validate,
    reduces_tokens=True,
    knob=Knob("mctf.r", 0, 64, "high", whole, integer=True, doc="r: tokens fused per block"),
    shows_merges=True,
)
