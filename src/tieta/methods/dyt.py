"""DyT: Dynamic Tuning (Zhao et al., NeurIPS 2024): a token dispatcher per block decides which
patch tokens a module processes; the rest skip it.

The verb, and the gates it puts in the blocks' attention and MLP slots (the tensor functions are
in ``tieta.ops.dispatch``):

    add_dyt(model, rho=0.5, variant="mlp", adapter_dim=8, experts=1, tau=5.0)
    loss = dyt_loss(dyt_forward(model, images), labels)   # trains toward the model's rho

Variants: "mlp" (the default: the MLP runs on active tokens only), "attn" (inactive tokens skip
attention: they are neither queries nor keys), "attn_mlp" (a dispatcher before each), "layer"
(inactive tokens skip the whole block). The AdaptFormer adapter runs on all tokens.

Training computes the masked form (every token through the module, the output multiplied by the
0/1 mask, so that the straight-through gradient reaches the dispatcher); evaluation really skips,
gathering the active tokens, running the module on them and scattering the result back; the two
agree (a test proves it).
"""

from __future__ import annotations

import contextlib
import warnings
from dataclasses import dataclass, field
from typing import Any, Iterator, Optional

import torch
import torch.nn.functional as F
from torch import nn

from tieta import shard
from tieta.errors import TietaError
from tieta.methods import catalog
from tieta.methods.adapter import Adapter, AdapterConfig, MoEAdapter
from tieta.methods.blocks import (EveryToken, PassState, TietaBlock, claim_attention_gate, pass_state,
                                  patch_blocks)
from tieta.methods.knob import Knob
from tieta.methods.method import MAX_EXPERTS, MAX_WIDTH, Method, bounded
from tieta.methods.state import attention_gate, method_setting, pass_state_named, set_method_setting
from tieta.ops.dispatch import (attend_on_active, dispatch_mask, key_mask, run_on_active,  # noqa: F401 (public)
                                with_prefix)

VARIANTS = catalog.DYT_VARIANTS


@dataclass
class DispatchState(PassState):
    """What the blocks of one forward pass share about dispatch.

    Attributes:
        tau: Gumbel-sigmoid temperature in training.
        full: run every token everywhere (the "full" network of DyT's loss).
        real_skip: at evaluation, really skip inactive tokens (False: masked computation).
        masks: the masks of this forward pass, (B, N_patch) each, with their straight-through
            gradient in training (for the rate penalty) and plain 0/1 values in evaluation.
        active: the last attention gate's (B, N, 1) decision, for layer dispatch's MLP gate.
    """

    tau: float = 5.0
    full: bool = False
    real_skip: bool = True
    masks: list[torch.Tensor] = field(default_factory=list)
    active: Optional[torch.Tensor] = None

    def reset(self) -> None:
        self.masks, self.active = [], None


class Dispatch(nn.Module):
    """A gate that runs its branch on the tokens a dispatcher of the block activates.

    Training computes the masked form (every token through the branch, the output multiplied by the
    0/1 mask, so that the straight-through gradient reaches the dispatcher); evaluation really
    skips, gathering the active tokens, running the branch on them and scattering the result back.

    Args:
        dispatcher: the name of the block's nn.Linear(D, 1) that decides ("dispatcher" or
            "mlp_dispatcher"; it lives on the block, so its state-dict key is the block's).
    """

    def __init__(self, dispatcher: str = "dispatcher") -> None:
        super().__init__()
        self.dispatcher = dispatcher

    def extra_repr(self) -> str:
        return f"dispatcher={self.dispatcher}"

    def decide(self, x: torch.Tensor, block: TietaBlock) -> Optional[torch.Tensor]:
        """(B, N, 1) 0/1 mask of active tokens (prefix always active), or None when all are."""
        state = block.dispatch_state
        if state.full:
            return None
        prefix = block.num_prefix_tokens
        # the noise is drawn for the global batch in data-parallel training (tieta.shard)
        mask = dispatch_mask(getattr(block, self.dispatcher)(x[:, prefix:]).squeeze(-1), state.tau, block.training,
                             shard.batch_rand)
        state.masks.append(mask)
        return with_prefix(mask, prefix)


def _run_token_wise(active: Optional[torch.Tensor], x: torch.Tensor, branch, block: TietaBlock) -> torch.Tensor:
    if active is None:
        return branch(x)
    if not block.training and block.dispatch_state.real_skip:
        return run_on_active(branch, x, active[..., 0] > 0)
    return active * branch(x)


class MlpDispatch(Dispatch):
    """The MLP slot's gate: inactive tokens skip the MLP."""

    def forward(self, x: torch.Tensor, branch, mask: Optional[torch.Tensor], block: TietaBlock) -> torch.Tensor:
        return _run_token_wise(self.decide(x, block), x, branch, block)


class AttentionDispatch(Dispatch):
    """The attention slot's gate: inactive tokens are neither queries nor keys.

    Its decision is kept in the dispatch state for :class:`SameDecision` (layer dispatch).
    """

    def forward(self, x: torch.Tensor, branch, mask: Optional[torch.Tensor], block: TietaBlock) -> torch.Tensor:
        active = self.decide(x, block)
        block.dispatch_state.active = active
        if active is None:
            return branch(x, mask)
        if not block.training and block.dispatch_state.real_skip:
            return attend_on_active(branch, x, active[..., 0] > 0, mask,
                                    with_order=getattr(block, "attends_by_position", False))
        keys = key_mask(active[..., 0] > 0, x.dtype)
        return active * branch(x, keys if mask is None else mask + keys)


class SameDecision(nn.Module):
    """The MLP slot's gate of layer dispatch: the attention gate's decision again, so inactive
    tokens skip the whole block."""

    def forward(self, x: torch.Tensor, branch, mask: Optional[torch.Tensor], block: TietaBlock) -> torch.Tensor:
        return _run_token_wise(block.dispatch_state.active, x, branch, block)


# variant -> (attention gate, MLP gate, the dispatchers it needs)
_GATES = {
    "mlp": (lambda: EveryToken(), lambda: MlpDispatch("dispatcher"), ("dispatcher",)),
    "attn": (lambda: AttentionDispatch("dispatcher"), lambda: EveryToken(), ("dispatcher",)),
    "attn_mlp": (lambda: AttentionDispatch("dispatcher"), lambda: MlpDispatch("mlp_dispatcher"),
                 ("dispatcher", "mlp_dispatcher")),
    "layer": (lambda: AttentionDispatch("dispatcher"), lambda: SameDecision(), ("dispatcher",)),
}


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
    DyTConfig(rho=rho, variant=variant, adapter_dim=adapter_dim, experts=experts, tau=tau).check(prefix="DyT ")
    blocks = patch_blocks(model)
    if pass_state_named(model, "dispatch_state") is not None:
        raise TietaError("this model already has DyT")
    if any(block.adapter is not None for block in blocks):
        raise TietaError("DyT brings its own adapter; add DyT to a model without adapters")
    attention_gate, mlp_gate, dispatchers = _GATES[variant]
    if variant != "mlp":  # refuse before changing anything
        claim_attention_gate(model, f"DyT's {variant!r} dispatch")
    state = pass_state(model, "dispatch_state", lambda: DispatchState(tau=tau))
    set_method_setting(model, "dyt", "dyt_rho", rho)
    width = model.embed_dim
    for block in blocks:
        like = next(block.parameters())
        for name in dispatchers:
            setattr(block, name, nn.Linear(width, 1).to(like.device, like.dtype))
        adapter = (MoEAdapter(width, adapter_dim, experts, adapter_scale, adapter_dropout) if experts > 1
                   else Adapter(width, adapter_dim, adapter_scale, adapter_dropout))
        block.adapter = adapter.to(like.device, like.dtype)
        block.attn_gate, block.mlp_gate = attention_gate(), mlp_gate()
        block.dispatch_state = state
    return model


@dataclass
class DyTOutputs:
    """What one DyT training step produces.

    Attributes:
        logits: (B, classes) of the dynamic network.
        full_logits: (B, classes) of the same network with every token active.
        masks: the dynamic pass's dispatch masks, (B, N_patch) each, with straight-through gradients.
        rho: the target share of active tokens the model was built with (``add_dyt``'s rho).
    """

    logits: torch.Tensor
    full_logits: torch.Tensor
    masks: list[torch.Tensor]
    rho: Optional[float] = None


def dyt_forward(model: nn.Module, images: torch.Tensor) -> DyTOutputs:
    """The dynamic and the full forward pass of a DyT model (as its training step needs)."""
    state = pass_state_named(model, "dispatch_state")
    logits = model(images)
    masks = state.masks
    state.full = True
    try:
        full_logits = model(images)
    finally:
        state.full = False
    return DyTOutputs(logits, full_logits, masks, method_setting(model, "dyt", "dyt_rho"))


def dyt_loss(
    outputs: DyTOutputs,
    targets: torch.Tensor,
    rho: Optional[float] = None,
    rate_weight: float = 2.0,
    full_weight: float = 1.0,
    distill_weight: float = 1.0,
) -> torch.Tensor:
    """DyT's objective: ``CE(dyn) + 2 (mean(mask) - rho)^2 + CE(full) + KL(dyn || full)``.

    mean(mask) is over batch, layers and tokens. The distillation term pulls the dynamic
    prediction towards the full network's (detached), computed as torch's
    ``kl_div(log_softmax(dyn), softmax(full))``.

    Args:
        rho: the target share of active tokens; None: the model's own (``outputs.rho``, the rho
            given to ``add_dyt``), or the paper's 0.5 for outputs made without one.
    """
    if rho is None:
        rho = 0.5 if outputs.rho is None else outputs.rho
    teacher = F.softmax(outputs.full_logits.detach().float(), dim=-1)
    student = F.log_softmax(outputs.logits.float(), dim=-1)
    if shard.current() is None:
        rate = torch.cat([mask.reshape(-1) for mask in outputs.masks]).mean()
        distill = F.kl_div(student, teacher, reduction="batchmean")
    else:  # means over the global batch (the rate enters squared, so it must be the global one)
        images = len(targets)
        rate = shard.batch_mean(torch.cat([mask.reshape(images, -1) for mask in outputs.masks], dim=1).mean(dim=1))
        distill = shard.batch_mean(F.kl_div(student, teacher, reduction="none").sum(dim=-1))
    loss = shard.cross_entropy(outputs.logits, targets) + rate_weight * (rate - rho) ** 2
    loss = loss + full_weight * shard.cross_entropy(outputs.full_logits, targets)
    return loss + distill_weight * distill


def rate_loss(model: nn.Module, rate_weight: float = 2.0) -> Optional[torch.Tensor]:
    """The rate term alone, ``rate_weight (mean(mask) - rho)^2``, of the pass just run (the whole
    token loss of DyT's segmentation code: no full network, no distillation there); None on a model
    without DyT or before a pass."""
    state = pass_state_named(model, "dispatch_state")
    if state is None or not state.masks:
        return None
    rate = torch.cat([mask.reshape(-1) for mask in state.masks]).mean()
    return rate_weight * (rate - method_setting(model, "dyt", "dyt_rho", 0.5)) ** 2


@torch.inference_mode()
def evaluation_masks(model: nn.Module, images: torch.Tensor) -> list[torch.Tensor]:
    """DyT's evaluation decisions for ``images``: one (B, N_patch) bool tensor per dispatcher, in
    block order ("attn_mlp" has two per block)."""
    state = pass_state_named(model, "dispatch_state")
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


@dataclass
class DyTConfig:
    """Dynamic Tuning settings (the DyT paper's defaults)."""

    rho: float = 0.5  # target share of active tokens
    variant: str = "mlp"  # "mlp", "attn", "attn_mlp" or "layer"
    adapter_dim: int = bounded(8, at_most=MAX_WIDTH)
    experts: int = bounded(1, at_most=MAX_EXPERTS)  # > 1: MoE-adapter
    tau: float = 5.0  # Gumbel-sigmoid temperature
    tau_end: Optional[float] = None  # e.g. 0.1: anneal tau linearly over the epochs
    rate_weight: float = 2.0
    full_weight: float = 1.0
    distill_weight: float = 1.0

    def check(self, prefix: str = "dyt.") -> None:
        """Raise a TietaError, in one sentence, for settings that cannot work. ``prefix`` names the
        fields as the user wrote them: the config section's, "DyT " for add_dyt's arguments."""
        if self.variant not in VARIANTS:
            raise TietaError(f"{prefix}variant must be one of {', '.join(VARIANTS)}, got {self.variant!r}")
        if not 0 < self.rho <= 1:
            raise TietaError(f"{prefix}rho, the target share of active tokens, must be in (0, 1], got {self.rho}")
        if self.experts < 1 or self.adapter_dim < 1:
            raise TietaError(f"{prefix}experts and {prefix}adapter_dim must be at least 1")
        if self.tau <= 0 or (self.tau_end is not None and self.tau_end <= 0):
            raise TietaError(f"{prefix}tau and {prefix}tau_end must be positive")
        if min(self.rate_weight, self.full_weight, self.distill_weight) < 0:
            raise TietaError(f"{prefix}rate_weight, {prefix}full_weight and {prefix}distill_weight cannot be negative")


def _attach(model: nn.Module, config: Any) -> nn.Module:
    dyt, adapter = config.dyt, config.adapter
    return add_dyt(model, dyt.rho, dyt.variant, dyt.adapter_dim, dyt.experts, dyt.tau, adapter.scale, adapter.dropout)


def _objective(config: Any):
    weights = config.dyt

    def dyt_step(model: nn.Module, images: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        return dyt_loss(dyt_forward(model, images), labels, rate_weight=weights.rate_weight,
                        full_weight=weights.full_weight, distill_weight=weights.distill_weight)

    return dyt_step


def temperature_at(config: Any, epoch: int, epochs: int) -> float:
    """DyT's tau for an epoch: fixed, or annealed linearly from tau to tau_end."""
    start, end = config.dyt.tau, config.dyt.tau_end
    if end is None or epochs == 1:
        return start
    return start + (end - start) * epoch / (epochs - 1)


def _epoch_update(model: nn.Module, config: Any, epoch: int, epochs: int) -> dict[str, Any]:
    pass_state_named(model, "dispatch_state").tau = tau = temperature_at(config, epoch, epochs)
    return {"tau": tau}


def _measure(model: nn.Module, images: torch.Tensor) -> dict[str, Any]:
    rates = activation_rates(model, images)
    return {"activation_rates": rates, "activation_rate": sum(rates) / len(rates)}


def _validate(config: Any) -> None:
    config.dyt.check()


@contextlib.contextmanager
def masked_attention_dispatch(model: nn.Module) -> Iterator[None]:
    """The masked form of a dispatch that gates attention, for a fixed graph (ONNX): its real
    skipping pads each image's active tokens to a count read from the data, which
    ``torch.export`` cannot trace; the masked form gives the same logits without saving the skipped
    FLOPs (a warning says so). MLP-only dispatch keeps its real skipping."""
    state = pass_state_named(model, "dispatch_state")
    if state is None or attention_gate(model) is None or not state.real_skip:
        yield
        return
    # stack: this body, contextmanager.__enter__, ExitStack.enter_context, the exporter, its caller
    warnings.warn("DyT's attention dispatch exports in its masked form: the same logits, but the FLOPs of "
                  "skipped tokens are not saved in the ONNX graph", UserWarning, stacklevel=5)
    state.real_skip = False
    try:
        yield
    finally:
        state.real_skip = True


def _skips_on_data(model: nn.Module) -> bool:
    """Real skipping at evaluation: token counts (``nonzero``) that depend on the images."""
    return pass_state_named(model, "dispatch_state") is not None


@torch.inference_mode()
def calibrate_dispatchers(model: nn.Module, images: torch.Tensor, rho: float) -> nn.Module:
    """Set each DyT dispatcher's bias so that a share ``rho`` of the patch tokens of ``images`` is
    active in every layer: random weights then dispatch like a trained model that met its target.

    Args:
        images: (B, 3, H, W) the inputs whose tokens set the rate.
    """
    model.eval()
    for block in model.blocks:
        inputs = []
        handle = block.dispatcher.register_forward_hook(lambda module, args, out: inputs.append(out))
        model(images)
        handle.remove()
        logits = inputs[0].flatten() - block.dispatcher.bias
        block.dispatcher.bias.fill_(-float(torch.quantile(logits, 1 - rho)))
    return model


def _at_target_rate(model: nn.Module, images: torch.Tensor, config: Any) -> nn.Module:
    """The decisions training drives toward: a share ``dyt.rho`` of the tokens active in every layer
    (the rate term of its objective), on ``images`` (B, 3, H, W)."""
    return calibrate_dispatchers(model, images, config.dyt.rho)


METHOD = Method(
    name="dyt",
    sections={"dyt": DyTConfig, "adapter": AdapterConfig},
    attach=_attach,
    modules=("dispatcher", "mlp_dispatcher"),  # its adapters are in the adapter group
    objective=_objective,
    epoch_update=_epoch_update,
    measure=_measure,
    data_dependent_cost=True,
    validate=_validate,
    traceable_form=masked_attention_dispatch,
    data_dependent_shapes=_skips_on_data,
    token_masks=evaluation_masks,
    picture_note=lambda config: f"{config.dyt.variant} dispatch",
    reduces_tokens=True,
    knob=Knob("dyt.rho", 0.05, 1.0, "low", doc="target share of active tokens"),
    trained_decisions=_at_target_rate,
    dense_loss=rate_loss,
)
