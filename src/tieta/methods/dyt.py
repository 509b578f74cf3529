"""DyT: Dynamic Tuning (Zhao et al., NeurIPS 2024): a token dispatcher per block decides which
patch tokens a module processes; the rest skip it.

Pure functions, and one verb:

    mask = dispatch_mask(logits, tau, training)       # (B, N) Gumbel-sigmoid, straight-through
    x = run_on_active(fn, x, active)                  # real skipping of a token-wise module
    x = attend_on_active(attn, x, active, bias)       # real skipping of attention (ragged batches)
    add_dyt(model, rho=0.5, variant="mlp", adapter_dim=8, experts=1, tau=5.0)

Variants: "mlp" (the default: the MLP runs on active tokens only), "attn" (inactive tokens skip
attention: they are neither queries nor keys), "attn_mlp" (a dispatcher before each), "layer"
(inactive tokens skip the whole block). The AdaptFormer adapter runs on all tokens.

Training computes the masked form (every token through the module, the output multiplied by the
0/1 mask, so that the straight-through gradient reaches the dispatcher); evaluation really skips,
gathering the active tokens, running the module on them and scattering the result back; the two
agree (a test proves it).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable, Optional

import torch
from torch import nn

from tieta.errors import TietaError

VARIANTS = ("mlp", "attn", "attn_mlp", "layer")


@dataclass
class DispatchState:
    """What the blocks of one forward pass share about dispatch.

    Attributes:
        tau: Gumbel-sigmoid temperature in training.
        full: run every token everywhere (the "full" network of DyT's loss).
        real_skip: at evaluation, really skip inactive tokens (False: masked computation).
        masks: the masks of this forward pass, (B, N_patch) each, with their straight-through
            gradient in training (for the rate penalty) and plain 0/1 values in evaluation.
    """

    tau: float = 5.0
    full: bool = False
    real_skip: bool = True
    masks: list[torch.Tensor] = field(default_factory=list)

    def reset(self) -> None:
        self.masks = []


def dispatch_mask(logits: torch.Tensor, tau: float, training: bool) -> torch.Tensor:
    """Which tokens are active.

    Args:
        logits: (B, N) dispatcher outputs.
        tau: temperature of the Gumbel-sigmoid in training.
        training: Gumbel noise, hard threshold and straight-through gradient
            (``hard - y.detach() + y``); otherwise ``sigmoid(logits) > 0.5``, no noise.

    Returns:
        (B, N) float mask of exact 0s and 1s (carrying y's gradient in training).
    """
    if not training:
        return (logits > 0).to(logits.dtype)  # sigmoid(l) > 0.5 <=> l > 0
    uniform = torch.rand(2, *logits.shape, device=logits.device, dtype=logits.dtype).clamp_(1e-6, 1 - 1e-6)
    gumbel = -torch.log(-torch.log(uniform))
    soft = torch.sigmoid((logits + gumbel[0] - gumbel[1]) / tau)
    hard = (soft > 0.5).to(soft.dtype)
    return hard - soft.detach() + soft


def with_prefix(mask: torch.Tensor, num_prefix: int) -> torch.Tensor:
    """(B, N_patch) mask -> (B, N, 1) with the prefix tokens always active."""
    if num_prefix:
        mask = torch.cat([mask.new_ones(mask.shape[0], num_prefix), mask], dim=1)
    return mask[..., None]


def run_on_active(fn: Callable[[torch.Tensor], torch.Tensor], x: torch.Tensor, active: torch.Tensor) -> torch.Tensor:
    """``fn`` (token-wise) on the active tokens only, zeros elsewhere: all images' active tokens
    are packed into one (T, D) batch, so ragged counts cost nothing extra.

    Args:
        x: (B, N, D); active: (B, N) bool.

    Returns:
        (B, N, D'): fn's output at active tokens, 0 at the others.
    """
    batch, tokens, width = x.shape
    rows = active.reshape(-1).nonzero().squeeze(1)
    out = fn(x.reshape(batch * tokens, width).index_select(0, rows))
    full = out.new_zeros(batch * tokens, out.shape[-1])
    return full.index_copy_(0, rows, out).view(batch, tokens, -1)


def attend_on_active(attn: Callable[..., torch.Tensor], x: torch.Tensor, active: torch.Tensor,
                     bias: Optional[torch.Tensor] = None) -> torch.Tensor:
    """Self-attention among each image's active tokens only; zeros at inactive tokens.

    Active tokens are packed to the front of a (B, L, D) tensor, L the largest active count;
    padding is masked out of the keys (batch 1 has no padding at all).

    Args:
        attn: the attention branch, called as ``attn(tokens, additive_mask_or_None)``.
        x: (B, N, D) normalised tokens; active: (B, N) bool.
        bias: optional (B, 1, 1, N) additive key bias (proportional attention).
    """
    batch, tokens, width = x.shape
    counts = active.sum(dim=1)
    length = int(counts.max())
    if length == 0:
        return x.new_zeros(x.shape)
    order = active.to(torch.int8).argsort(dim=1, descending=True, stable=True)[:, :length]  # actives first
    packed = x.gather(1, order[..., None].expand(-1, -1, width))
    valid = torch.arange(length, device=x.device)[None] < counts[:, None]  # (B, L)
    mask = None
    if bias is not None:
        mask = bias.gather(3, order[:, None, None, :])
    if not bool(valid.all()):
        padding = key_mask(valid, x.dtype)
        mask = padding if mask is None else mask + padding
    out = attn(packed, mask)
    out = out * valid[..., None].to(out.dtype)
    return x.new_zeros(batch, tokens, out.shape[-1]).scatter_(1, order[..., None].expand(-1, -1, out.shape[-1]), out)


# excludes a key from attention: exp(-1e4) is 0 in every float type, yet a row with no active key
# at all gets uniform weights instead of NaN (its output is multiplied by 0 or dropped anyway)
EXCLUDED = -1e4


def key_mask(active: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """(B, N) bool -> (B, 1, 1, N) additive mask that excludes the inactive keys."""
    return torch.zeros(active.shape, dtype=dtype, device=active.device).masked_fill_(~active, EXCLUDED)[:, None, None, :]


def add_dyt(
    model: nn.Module,
    rho: float = 0.5,
    variant: str = "mlp",
    adapter_dim: int = 8,
    experts: int = 1,
    tau: float = 5.0,
    adapter_scale: float = 1.0,
    adapter_dropout: float = 0.1,
) -> nn.Module:
    """Dynamic Tuning: a token dispatcher and an adapter in every block of a timm ViT, in place.

    Args:
        model: a timm VisionTransformer (ToMe can be added before or after, with variant "mlp").
        rho: target share of active tokens, kept on the model for :func:`dyt_loss`.
        variant: "mlp", "attn", "attn_mlp" or "layer" (what inactive tokens skip).
        adapter_dim: the AdaptFormer bottleneck (8: about 0.16M parameters on ViT-B).
        experts: > 1 makes the adapter an MoE-adapter with that many experts.
        tau: Gumbel-sigmoid temperature in training (change ``model.dispatch_state.tau`` to schedule it).

    Returns:
        The same model. Each block gets ``dispatcher`` (nn.Linear(D, 1)) and ``adapter``;
        variant "attn_mlp" adds ``mlp_dispatcher`` for the MLP.
    """
    from tieta.methods.adapter import Adapter, MoEAdapter
    from tieta.methods.blocks import TietaViTMixin, patch_blocks

    if variant not in VARIANTS:
        raise TietaError(f"DyT variant must be one of {', '.join(VARIANTS)}, got {variant!r}")
    if not 0 < rho <= 1:
        raise TietaError(f"rho, the target share of active tokens, must be in (0, 1], got {rho}")
    if experts < 1:
        raise TietaError(f"experts must be at least 1, got {experts}")
    blocks = patch_blocks(model)
    if any(block.dispatcher is not None for block in blocks):
        raise TietaError("this model already has DyT")
    if any(block.adapter is not None for block in blocks):
        raise TietaError("DyT brings its own adapter; add DyT to a model without adapters")
    check_dispatch_with_merging(variant, any(block.merge_r > 0 for block in blocks))
    state = DispatchState(tau=tau)
    model.dispatch_state = state
    model.dyt_rho = rho
    width = model.embed_dim
    for block in blocks:
        like = next(block.parameters())
        block.dispatcher = nn.Linear(width, 1).to(like.device, like.dtype)
        if variant == "attn_mlp":
            block.mlp_dispatcher = nn.Linear(width, 1).to(like.device, like.dtype)
        adapter = (MoEAdapter(width, adapter_dim, experts, adapter_scale, adapter_dropout) if experts > 1
                   else Adapter(width, adapter_dim, adapter_scale, adapter_dropout))
        block.adapter = adapter.to(like.device, like.dtype)
        block.dyt_variant = variant
        block.dispatch_state = state
    return model


def check_dispatch_with_merging(variant: Optional[str], merging: bool) -> None:
    """Token merging needs every token's attention keys, so only MLP dispatch combines with it.

    Args:
        variant: the model's DyT variant, None without DyT.
        merging: whether any block merges tokens.
    """
    if merging and variant not in (None, "mlp"):
        raise TietaError(f"DyT's {variant!r} dispatch cannot be combined with token merging; use variant 'mlp'")


@dataclass
class DyTOutputs:
    """What one DyT training step produces.

    Attributes:
        logits: (B, classes) of the dynamic network.
        full_logits: (B, classes) of the same network with every token active.
        masks: the dynamic pass's dispatch masks, (B, N_patch) each, with straight-through gradients.
    """

    logits: torch.Tensor
    full_logits: torch.Tensor
    masks: list[torch.Tensor]


def dyt_forward(model: nn.Module, images: torch.Tensor) -> DyTOutputs:
    """The dynamic and the full forward pass of a DyT model (as its training step needs)."""
    state = model.dispatch_state
    logits = model(images)
    masks = state.masks
    state.full = True
    try:
        full_logits = model(images)
    finally:
        state.full = False
    return DyTOutputs(logits, full_logits, masks)


def dyt_loss(
    outputs: DyTOutputs,
    targets: torch.Tensor,
    rho: float = 0.5,
    rate_weight: float = 2.0,
    full_weight: float = 1.0,
    distill_weight: float = 1.0,
) -> torch.Tensor:
    """DyT's objective: ``CE(dyn) + 2 (mean(mask) - rho)^2 + CE(full) + KL(dyn || full)``.

    mean(mask) is over batch, layers and tokens. The distillation term pulls the dynamic
    prediction towards the full network's (detached), computed as torch's
    ``kl_div(log_softmax(dyn), softmax(full))``.
    """
    import torch.nn.functional as F

    rate = torch.cat([mask.reshape(-1) for mask in outputs.masks]).mean()
    loss = F.cross_entropy(outputs.logits, targets) + rate_weight * (rate - rho) ** 2
    loss = loss + full_weight * F.cross_entropy(outputs.full_logits, targets)
    teacher = F.softmax(outputs.full_logits.detach().float(), dim=-1)
    distill = F.kl_div(F.log_softmax(outputs.logits.float(), dim=-1), teacher, reduction="batchmean")
    return loss + distill_weight * distill


@torch.inference_mode()
def evaluation_masks(model: nn.Module, images: torch.Tensor) -> list[torch.Tensor]:
    """DyT's evaluation decisions for ``images``: one (B, N_patch) bool tensor per dispatcher, in
    block order ("attn_mlp" has two per block)."""
    state = getattr(model, "dispatch_state", None)
    if state is None:
        raise TietaError("this model has no DyT dispatchers")
    was_training = model.training
    model.eval()
    try:
        model(images)
        return [mask > 0 for mask in state.masks]
    finally:
        model.train(was_training)


def activation_rates(model: nn.Module, images: torch.Tensor) -> list[float]:
    """Share of active patch tokens at each dispatcher, averaged over ``images`` in evaluation mode."""
    return [float(mask.float().mean()) for mask in evaluation_masks(model, images)]
