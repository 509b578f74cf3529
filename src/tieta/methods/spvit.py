"""SPViT as a tieta method: multi-head token selectors and package tokens (Kong et al., ECCV 2022).

Before the blocks at ``locations`` (3, 6, 9 for depth 12; the same fractions of depth elsewhere) a
multi-head selector scores the patch tokens (``tieta.ops.spvit``); the tokens a stage drops are
folded into one package token appended at the end, which later stages always keep. In training
the decisions are hard Gumbel samples with a straight-through gradient: tokens stay in the tensor
and every later block's attention masks the dropped ones out (``TokenState.policy``, the masked
softmax). At evaluation each stage keeps the ``round(P * keep_rate)`` patch tokens its selector
rates highest, in spatial order, and physically gathers them with the packages.

Its objective is the reference's (``losses_l2.py``): ``CE + ratio_weight / S * sum_s (batch kept
share - keep_rate_s)^2 + distill_weight * (KL(teacher || student) + MSE of the kept tokens)``; the
teacher is the same network with every token kept and no package (the unpatched model with the
run's LoRA or adapter), run in eval mode without gradient, as DynamicViT's self-distillation.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Optional, Sequence

import torch
from torch import nn

from tieta import shard
from tieta.errors import TietaError
from tieta.methods.blocks import (PassState, TietaBlock, claim_reduction, follow_tokens, pass_state, patch_blocks,
                                  token_state)
from tieta.methods.kept_patches import kept_patch_masks
from tieta.methods.knob import Knob, geometric
from tieta.methods.method import Method
from tieta.methods.restore import destinations
from tieta.methods.schedules import stage_blocks
from tieta.methods.state import pass_state_named
from tieta.ops.dynamicvit import distillation_loss, gather_tokens
from tieta.ops.rope import NO_POSITION
from tieta.ops.spvit import (MultiheadPredictorLG, argmax_keep, keep_counts, pack_kept, package_token, ratio_loss,
                             sample_keep, token_distillation_loss, top_keep)

# the reference's hard-coded per-stage targets for DeiT-S and DeiT-B (main_l2_vit_3keep_senet.py)
KEEP_RATES = (0.617, 0.369, 0.137)
PACKAGES = ("sum", "mean")
DECISIONS = ("top_k", "argmax")


@dataclass
class SPViTState(PassState):
    """What SPViT's stages share in one forward pass.

    Attributes:
        decisions: the training decisions of each stage over the original patch tokens, (B, P) each.
        packages: package tokens appended so far (they stand at the end of the sequence).
        full: keep every token and add no package (the teacher pass of the distillation terms).
        valid: (B, patches) False for padding, once an evaluation with argmax decisions has padded
            the images' kept tokens to the batch's largest count; None before.
    """

    decisions: list[torch.Tensor] = field(default_factory=list)
    packages: int = 0
    full: bool = False
    valid: Optional[torch.Tensor] = None

    def reset(self) -> None:
        self.decisions, self.packages, self.valid = [], 0, None


class SPViTSelect(nn.Module):
    """A stage block's ``select`` step: score the tokens, fold the dropped ones into a package, then
    mask them (training) or gather the rest (evaluation).

    Args:
        width: D.
        heads: the block's attention heads H (the selector works per head slice).
        keep_rate: share of the model's original patch tokens kept from this stage on.
        patches: P, the original patch count.
        package: "sum" (the training file's keep-probability-weighted sum, also at evaluation) or
            "mean" (the inference file's plain mean).
        skip_empty_package: at evaluation, a stage that drops nothing appends no package (then
            keep rate 1 is the plain model); the reference always appends one.
        decision: at evaluation, "top_k" keeps ``round(P * keep_rate)`` tokens in every image;
            "argmax" keeps each token the selector rates more likely kept than dropped, a count per
            image (a batch is padded to its largest count, the padding masked out of attention).
        tied_heads: the selector's heads share one MLP (the reference code); False: one per head.
    """

    def __init__(self, width: int, heads: int, keep_rate: float, patches: int, package: str = "sum",
                 skip_empty_package: bool = False, decision: str = "top_k", tied_heads: bool = True) -> None:
        super().__init__()
        self.selector = MultiheadPredictorLG(width, heads, tied_heads)
        self.keep_rate, self.patches = keep_rate, patches
        self.kept = keep_counts(patches, [keep_rate])[0]
        self.package, self.skip_empty_package, self.decision = package, skip_empty_package, decision

    def extra_repr(self) -> str:
        return (f"keep_rate={self.keep_rate}, keeps={self.kept} of {self.patches} patches, package={self.package}, "
                f"skip_empty_package={self.skip_empty_package}, decision={self.decision}")

    def forward(self, x: torch.Tensor, block: TietaBlock) -> torch.Tensor:
        """Args: x: (B, prefix + n, D) entering the block, n = patches + earlier packages.
        Returns: (B, prefix + n + 1, D) in training; (B, prefix + k + packages (+ 1), D) at evaluation."""
        if block.spvit_state.full:
            return x
        if block.training:
            return self._mask(x, block)
        if self.decision == "argmax":
            return self._keep_likely(x, block)
        return self._keep_top(x, block)

    def _mask(self, x: torch.Tensor, block: TietaBlock) -> torch.Tensor:
        """Training: a Gumbel decision per token; the dropped stay in the tensor, masked out of every
        later attention (``TokenState.policy``), and the package is appended. Returns (B, prefix + n + 1, D)."""
        state, tokens = block.spvit_state, block.token_state
        prefix, packages = block.num_prefix_tokens, state.packages
        rest = x[:, prefix:]
        batch, count = rest.shape[:2]
        previous = torch.ones_like(rest[..., :1]) if tokens.policy is None else tokens.policy[:, prefix:, None]
        score, prob = self.selector(rest, previous)
        keep = sample_keep(score, previous, packages)  # (B, n, 1)
        package = package_token(rest, prob, previous - keep, self.package == "mean")  # newly dropped only
        state.decisions.append(keep[:, :count - packages, 0])
        tokens.policy = torch.cat([keep.new_ones(batch, prefix), keep[..., 0], keep.new_ones(batch, 1)], dim=1)
        follow_tokens(block, _with_package(torch.arange(count, device=x.device).expand(batch, count)), count)
        state.packages += 1
        return torch.cat([x, package], dim=1)

    def _keep_top(self, x: torch.Tensor, block: TietaBlock) -> torch.Tensor:
        """Evaluation with top-k decisions: every image keeps ``round(P * keep_rate)`` patch tokens,
        gathered in spatial order with the earlier packages, then the new package.
        Returns (B, prefix + k + packages + 1, D), or x where nothing is dropped and no empty package is wanted."""
        state = block.spvit_state
        prefix, packages = block.num_prefix_tokens, state.packages
        rest = x[:, prefix:]
        batch, count = rest.shape[:2]
        patches = count - packages
        kept = min(self.kept, patches)
        if kept >= patches and self.skip_empty_package:
            return x
        score, prob = self.selector(rest, torch.ones_like(rest[..., :1]))
        indices = top_keep(score, kept, patches)  # (B, k)
        dropped = rest.new_ones(batch, patches).scatter(1, indices, 0.0)  # (B, patches)
        drop = torch.cat([dropped, rest.new_zeros(batch, packages)], dim=1)  # never a package
        package = package_token(rest, prob, drop.unsqueeze(-1), self.package == "mean")
        earlier = torch.arange(patches, count, device=x.device).expand(batch, packages)
        order = torch.cat([indices, earlier], dim=1)  # kept patches, then the earlier packages
        follow_tokens(block, _with_package(order), count)  # kept tokens keep their positions
        state.packages += 1
        return torch.cat([gather_tokens(x, order, prefix), package], dim=1)

    def _keep_likely(self, x: torch.Tensor, block: TietaBlock) -> torch.Tensor:
        """Evaluation with argmax decisions: each image keeps its own tokens, padded to the batch's
        largest count; the padding is masked out of attention (``TokenState.attn_bias``) and of an
        average pool (``TokenState.size`` 0). At batch size 1 there is no padding.

        Args: x: (B, prefix + n, D). Returns: (B, prefix + m + packages + 1, D), m the largest count.
        """
        if torch.compiler.is_exporting():
            raise TietaError("SPViT's argmax decisions keep a different number of tokens in each image, which a "
                             "graph of fixed shapes cannot hold; export with spvit.decision=top_k")
        state, tokens = block.spvit_state, block.token_state
        prefix, packages = block.num_prefix_tokens, state.packages
        rest = x[:, prefix:]
        batch, count = rest.shape[:2]
        patches = count - packages
        valid = state.valid if state.valid is not None else rest.new_ones(batch, patches, dtype=torch.bool)
        previous = torch.cat([valid, valid.new_ones(batch, packages)], dim=1).unsqueeze(-1).to(x.dtype)
        score, prob = self.selector(rest, previous)  # the global half averages the real tokens only
        keep = argmax_keep(score, patches, valid)
        dropped = valid & ~keep
        if self.skip_empty_package and not bool(dropped.any()):
            return x
        drop = torch.cat([dropped, dropped.new_zeros(batch, packages)], dim=1).unsqueeze(-1)
        package = package_token(rest, prob, drop, self.package == "mean")
        order, state.valid = pack_kept(keep)
        earlier = torch.arange(patches, count, device=x.device).expand(batch, packages)
        into = None
        if tokens.dense is not None:  # padding repeats a token this image drops: it continues none
            into = destinations(_with_package(torch.cat([order.masked_fill(~state.valid, NO_POSITION), earlier], 1)),
                                count)
        order = torch.cat([order, earlier], dim=1)
        follow_tokens(block, _with_package(order), count, into)
        state.packages += 1
        real = torch.cat([state.valid.new_ones(batch, prefix), state.valid, state.valid.new_ones(batch, packages + 1)],
                         dim=1)  # (B, N')
        padded = not bool(real.all())
        tokens.attn_bias = x.new_zeros(real.shape).masked_fill(~real, float("-inf"))[:, None, None] if padded else None
        tokens.size = real.unsqueeze(-1).to(x.dtype) if padded else None
        return torch.cat([gather_tokens(x, order, prefix), package], dim=1)


def _with_package(order: torch.Tensor) -> torch.Tensor:
    """(B, m) token indices followed by the new package token, which stands at no grid position."""
    return torch.cat([order, order.new_full((order.shape[0], 1), NO_POSITION)], dim=1)


def add_spvit(model: nn.Module, keep_rates: Sequence[float] = KEEP_RATES, locations: Optional[Sequence[int]] = None,
              package: str = "sum", skip_empty_package: bool = False, decision: str = "top_k",
              tied_heads: bool = True) -> nn.Module:
    """SPViT's token selectors before the blocks at ``locations`` of a timm ViT, in place.

    Args:
        model: a timm VisionTransformer or Eva (LoRA and adapters compose before or after).
        keep_rates: per stage, the share of the original patch tokens kept (cumulative, not
            growing); the default is the reference's (0.617, 0.369, 0.137).
        locations: block indices, one per keep rate; None: 3, 6, 9 for depth 12, the same
            fractions of depth elsewhere.
        package: "sum" (the reference training's weighted sum of the dropped tokens, used in both
            modes) or "mean" (its inference file's plain mean).
        skip_empty_package: at evaluation, a stage that drops nothing appends no package token.
        decision: at evaluation, "top_k" (``round(P * rate)`` tokens per image: one count per
            batch, ONNX and one compiled graph) or "argmax" (each image keeps the tokens rated more
            likely kept than dropped: a count per image, as the reference's sampled decisions).
        tied_heads: one MLP for all of a selector's heads, as the reference code builds it (7,092
            parameters per selector at ViT-B); False: one per head (83,322).

    Returns:
        The same model; train it with :func:`spvit_loss` (``tieta train`` does).
    """
    keep_rates = [float(rate) for rate in keep_rates]
    SPViTConfig(keep_rate=keep_rates, locations=locations, package=package, skip_empty_package=skip_empty_package,
                decision=decision, tied_heads=tied_heads).check(prefix="SPViT's ")
    blocks = patch_blocks(model)
    chosen = stage_blocks(len(blocks), locations)
    if len(chosen) != len(keep_rates):
        raise TietaError(f"SPViT needs one keep rate per location: {len(keep_rates)} rates for blocks {chosen}")
    patches = model.patch_embed.num_patches
    if any(round(patches * rate) < 1 for rate in keep_rates):
        raise TietaError(f"SPViT keep rates {keep_rates} keep no token of the model's {patches} patches")
    heads = blocks[0].attn.num_heads
    if model.embed_dim % heads:
        raise TietaError(f"SPViT's selector cuts tokens into head slices, and the width {model.embed_dim} is not "
                         f"divisible by {heads} heads")
    claim_reduction(model, "SPViT")
    tokens = token_state(model)
    state = pass_state(model, "spvit_state", SPViTState)
    for block in blocks:
        block.spvit_state = state
        block.token_state = tokens
    for index, rate in zip(chosen, keep_rates):
        like = next(blocks[index].parameters())
        step = SPViTSelect(model.embed_dim, heads, rate, patches, package, skip_empty_package, decision, tied_heads)
        blocks[index].select = step.to(like.device, like.dtype)
    return model


def keep_rates_of(model: nn.Module) -> list[float]:
    """The keep rates of the model's SPViT stages, in block order."""
    return [block.select.keep_rate for block in model.blocks if isinstance(block.select, SPViTSelect)]


def spvit_loss(model: nn.Module, images: torch.Tensor, labels: torch.Tensor, ratio_weight: float = 2.0,
               distill_weight: float = 0.5) -> torch.Tensor:
    """SPViT's training objective for one batch (runs the model; twice with distillation).

    ``CE(logits) + ratio_weight / S * sum_s (mean_{b,i} keep_s - rate_s)^2``, plus, when
    distill_weight > 0, ``distill_weight * (KL(teacher || student) + MSE over the kept patch
    tokens)`` with the teacher the same network with every token kept and no package, in eval
    mode, without gradient (losses_l2.py's clf 1.0, ratiow 2.0, distillw 0.5).
    """
    logits = model(images)
    state = model.spvit_state
    decisions = list(state.decisions)
    loss = shard.cross_entropy(logits, labels) + ratio_loss(decisions, keep_rates_of(model), ratio_weight,
                                                            shard.batch_mean)
    if distill_weight > 0:
        prefix, patches = model.num_prefix_tokens, model.patch_embed.num_patches
        student_tokens = model.token_state.features[:, prefix:prefix + patches]  # packages excluded
        was_training = model.training
        state.full = True
        try:
            with torch.no_grad():
                teacher = model.eval()(images)
                teacher_tokens = model.token_state.features[:, prefix:prefix + patches]
        finally:
            state.full = False
            model.train(was_training)
        mean = shard.batch_mean if shard.current() else None
        loss = loss + distill_weight * (
            distillation_loss(logits, teacher, mean)
            + token_distillation_loss(student_tokens, teacher_tokens, decisions[-1], shard.batch_mean))
    return loss


def token_counts(model: nn.Module) -> list[int]:
    """Tokens entering each block at evaluation (prefix, kept patches, packages), with top-k decisions."""
    prefix = model.num_prefix_tokens
    counts, patches, packages = [], model.patch_embed.num_patches, 0
    for block in model.blocks:
        step = block.select
        if isinstance(step, SPViTSelect):
            kept = min(step.kept, patches)
            if not (kept >= patches and step.skip_empty_package):
                patches, packages = kept, packages + 1
        counts.append(prefix + patches + packages)
    return counts


@dataclass
class SPViTConfig:
    """SPViT settings (the config section "spvit")."""

    keep_rate: list[float] = field(default_factory=lambda: list(KEEP_RATES))  # per stage, of the original patches
    locations: Optional[list[int]] = None  # None: 3, 6, 9 at depth 12, the same fractions of depth elsewhere
    ratio_weight: float = 2.0
    distill_weight: float = 0.5  # KL + token MSE to the all-tokens pass of the same network; 0: off
    package: str = "sum"  # "sum": weighted by keep probability (training file); "mean": the inference file's
    skip_empty_package: bool = False  # at evaluation, no package where a stage drops nothing
    decision: str = "top_k"  # evaluation: "top_k" (round(P * rate) per image) or "argmax" (a count per image)
    tied_heads: bool = True  # one MLP for a selector's heads, as the reference code; False: one per head

    def check(self, prefix: str = "spvit.") -> None:
        """Raise a TietaError, in one sentence, for settings that cannot work. ``prefix`` names the
        fields as the user wrote them: the config section's, or "SPViT's " for add_spvit's arguments."""
        rates = [float(rate) for rate in self.keep_rate]
        if not rates or any(not 0 < rate <= 1 for rate in rates):
            raise TietaError(f"{prefix}keep_rate must be a list of shares in (0, 1], got {rates}")
        if any(later > earlier for earlier, later in zip(rates, rates[1:])):
            raise TietaError(f"{prefix}keep_rate is cumulative and cannot grow from one stage to the next, "
                             f"got {rates}")
        if self.ratio_weight < 0 or self.distill_weight < 0:
            raise TietaError(f"{prefix}ratio_weight and {prefix}distill_weight cannot be negative")
        if self.package not in PACKAGES:
            raise TietaError(f"{prefix}package is one of {', '.join(PACKAGES)}, got {self.package!r}")
        if self.decision not in DECISIONS:
            raise TietaError(f"{prefix}decision is one of {', '.join(DECISIONS)}, got {self.decision!r}")


def _objective(config: Any):
    settings = config.spvit

    def step(model: nn.Module, images: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        return spvit_loss(model, images, labels, settings.ratio_weight, settings.distill_weight)

    return step


def _validate(config: Any) -> None:
    config.spvit.check()


def _describe(model: nn.Module) -> dict[str, Any]:
    steps = [block.select for block in model.blocks if isinstance(block.select, SPViTSelect)]
    if any(step.decision == "argmax" for step in steps):
        return {"spvit_decisions": "argmax: each image keeps its own number of tokens"}
    return {"block_token_counts": token_counts(model)}


def evaluation_masks(model: nn.Module, images: torch.Tensor) -> list[torch.Tensor]:
    """SPViT's evaluation decisions for ``images``: one (B, P) bool tensor per stage, True where the
    patch is still a kept token (False: folded into a package token); with argmax decisions each
    image has its own count, the batch's padding left out."""
    steps = [block.select for block in model.blocks if isinstance(block.select, SPViTSelect)]
    if not steps:
        raise TietaError("this model has no SPViT; call add_spvit first")
    state = pass_state_named(model, "spvit_state")
    return kept_patch_masks(model, images, steps, padding=lambda: state.valid)


METHOD = Method(
    name="spvit",
    sections={"spvit": SPViTConfig},
    attach=lambda model, config: add_spvit(model, config.spvit.keep_rate, config.spvit.locations,
                                           config.spvit.package, config.spvit.skip_empty_package,
                                           config.spvit.decision, config.spvit.tied_heads),
    modules=("selector",),
    objective=_objective,
    describe=_describe,
    validate=_validate,
    reduces_tokens=True,
    token_masks=evaluation_masks,
    picture_note=lambda config: f"keep rates {list(config.spvit.keep_rate)}; grey: folded into packages",
    knob=Knob("spvit.keep_rate", 0.05, 1.0, "low", geometric(3), doc="geometric rho over the 3 stages"),
)
