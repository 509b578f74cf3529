"""DiffRate as a tieta method: per-block prune and merge rates, fixed or searched (Chen et al., ICCV 2023).

Every block, right after its attention residual, ranks its non-prefix tokens by the class token's
attention (with the log-size bias of proportional attention), sorts them by it (in every block,
compressing or not), keeps the first ``kept_prune`` tokens and merges the ones after the first
``kept_merge`` into their most similar kept token (the tensor code is ``tieta.ops.diffrate``).
Kept numbers are per block and count the prefix tokens; a block's MLP sees
``min(N, kept_prune, kept_merge)`` tokens. Prefix tokens (class, distillation, registers) are never
pruned, merged or merged into.

Where the kept numbers come from:

- fixed: ``add_diffrate(model, kept_prune, kept_merge)``, or a published schedule by name
  (``add_diffrate(model, "vit_b_deit_8.7")``). Tokens are gathered physically, in training too.
- searched: ``add_diffrate(model)`` gives every block uniform rate logits (``blocks[i].reduce.prune_rate``
  and ``.merge_rate``, the "diffrate" parameter group), and ``search_rates(model, batches, target_gmacs)``
  trains only them, on ``CE + flops_weight * (GMACs - target)^2``, then fixes the kept numbers.
  While a search runs (``model.train()``), tokens stay in the tensor: the running keep mask is the
  token state's policy, so the following blocks attend through the masked softmax and the
  straight-through masks carry the gradient to the logits.
  Block 0 never compresses (the reference's DeiT patch); with an average-pool head the last block
  does not either (its MAE patch).

In ``tieta train`` (``--method diffrate+lora``): with ``diffrate.rates`` or ``diffrate.kept_prune`` /
``kept_merge`` the run trains with those fixed numbers. With ``diffrate.target_gmacs`` instead, the
first ``diffrate.search_epochs`` epochs of the run are the search: the method's objective steps the
rate logits with its own AdamW (lr ``search_lr`` cosine to ``search_min_lr`` per epoch, no weight
decay) and hands the loop a loss without a graph, so LoRA, adapters and head do not change; the
next epoch's update fixes the kept numbers and the remaining epochs fine-tune with them. The run's
learning-rate schedule counts the search epochs too. The rate logits are saved with the
checkpoint; a model rebuilt from it reads its kept numbers from them.

Choices where this differs from the reference code (OpenGVLab/DiffRate) or where it leaves room:

- At evaluation, merged sizes are clamped at ``SIZE_EPS`` before the log of proportional attention
  (the reference's similarity-scaled sizes can reach <= 0 there, making the log invalid); the
  clamped sizes also weight average pooling.
- While no block has merged, every size is 1 and the log-size bias (all zeros) is left out: the
  same attention, without the extra mask.
- Models without a class token have no class attention row: ``add_diffrate`` refuses them unless
  ``criterion="received"``, which ranks tokens by the attention they receive (mean over heads and
  query rows), a deviation from DiffRate.
- During the search, tokens the running mask removed are ranked last explicitly (the reference
  relies on their near-zero masked attention, which puts them there too).
- The FLOPs term counts the blocks as ``tieta.ops.diffrate.search_flops`` does, plus the executed
  patch embedding (P, not the reference's P + 1, tokens) and the head(s).
- A search inside ``tieta train`` runs before the head has learned the task, so its cross-entropy
  carries little task signal and the FLOPs term shapes most of the schedule. For a task-informed
  search, train first, call :func:`search_rates`, then fine-tune with the numbers it returns.
- Published schedules were searched for one class token and 196 patches; on a model with more
  prefix tokens the same numbers of patch tokens are kept.
- Average pooling weights tokens by size x mask (``TokenState.pool_weights``); in training the
  reference detaches the denominator.
- Merge sources are traced at evaluation only (``TokenState.trace_source``, for ``tieta show-tokens``);
  a search ignores it.
"""

from __future__ import annotations

from typing import Any, Optional

import torch
from torch import nn

from tieta.errors import TietaError
from tieta.methods.blocks import claim_reduction, keep_output, patch_blocks, token_state
from tieta.methods.diffrate_counts import (Counts, fix_rates, fixed_counts, kept_numbers, mlp_token_counts,
                                           never_compressed, published_counts, rate_parameters)
from tieta.methods.diffrate_search import search_gmacs, search_lr_at, search_rates, search_step
from tieta.methods.diffrate_step import (CRITERIA, SIZE_EPS, DiffRateReduce, diffrate_steps, masked_class_attention,
                                         token_importance)
from tieta.methods.diffrate_training import DiffRateConfig, describe, epoch_update, objective, one_process, validate
from tieta.methods.kept_patches import held_patch_masks
from tieta.methods.method import Method
from tieta.methods.schedules import vit_shape
from tieta.methods.state import set_method_setting
from tieta.ops.diffrate import RateLogits
from tieta.ops.diffrate_rates import PUBLISHED_RATES

# the pieces, by job: the reduce step (diffrate_step), the kept numbers (diffrate_counts), the
# search (diffrate_search), training glue (diffrate_training); this module attaches them
__all__ = [
    "CRITERIA", "METHOD", "PUBLISHED_RATES", "SIZE_EPS", "DiffRateConfig", "DiffRateReduce", "add_diffrate",
    "diffrate_steps", "fix_rates", "kept_numbers", "masked_class_attention", "mlp_token_counts", "published_counts",
    "rate_parameters", "search_gmacs", "search_lr_at", "search_rates", "search_step", "token_importance",
]


def add_diffrate(
    model: nn.Module,
    kept_prune: Counts = None,
    kept_merge: Counts = None,
    target_gmacs: Optional[float] = None,
    granularity: int = 4,
    prop_attn: bool = True,
    criterion: str = "class",
) -> nn.Module:
    """DiffRate in every block of a timm ViT, in place: fixed kept numbers, or rate logits to search.

    Args:
        model: a timm VisionTransformer (LoRA and adapters compose before or after).
        kept_prune: tokens each block keeps by pruning, prefix included (depth numbers; block 0 keeps
            all), or the name of a published schedule (``PUBLISHED_RATES``, e.g. "vit_b_deit_8.7"),
            which gives both numbers. None with ``kept_merge`` None: rate logits for a search.
        kept_merge: tokens each block keeps by merging, prefix included. One list alone: the other
            operation keeps every token.
        target_gmacs: the search's target, GMACs per image (kept for :func:`search_rates`); only
            without kept numbers.
        granularity: gap between the candidate kept numbers of the search.
        prop_attn: proportional attention, log(size) added to the attention logits (the reference's).
        criterion: "class" ranks tokens by the class token's attention (DiffRate); "received" by the
            attention they receive, for models without a class token (a deviation).

    Returns:
        The same model. Each block's ``reduce`` is a :class:`DiffRateReduce`; searchable ones hold
        ``prune_rate`` and ``merge_rate`` (the "diffrate" parameter group).
    """
    shape = vit_shape(model)
    named = isinstance(kept_prune, str)
    DiffRateConfig(rates=kept_prune if named else None, kept_prune=None if named else _as_list(kept_prune),
                   kept_merge=_as_list(kept_merge), target_gmacs=target_gmacs, granularity=granularity,
                   prop_attn=prop_attn, criterion=criterion).check(prefix="")
    if criterion == "class" and getattr(model, "cls_token", None) is None:
        raise TietaError(
            "DiffRate ranks tokens by the class token's attention and this model has no class token; pass "
            "criterion='received' to rank them by the attention they receive (a deviation from DiffRate)"
        )
    counts = fixed_counts(shape, kept_prune, kept_merge)  # the numbers checked against this model
    claim_reduction(model, "DiffRate")
    blocks = patch_blocks(model)
    token_state(model).prop_attn = prop_attn
    fixed = never_compressed(model, shape.depth)
    for index, block in enumerate(blocks):
        if counts is not None:
            step = DiffRateReduce(counts[0][index], counts[1][index], criterion=criterion, importance=token_importance)
        else:
            rates = [RateLogits(shape.patches, granularity, index in fixed, shape.prefix) for _ in range(2)]
            step = DiffRateReduce(prune_rate=rates[0], merge_rate=rates[1], criterion=criterion,
                                  importance=token_importance)
        block.reduce = step.to(next(block.parameters()).device).train(block.training)
        keep_output(block.attn.q_norm)
        keep_output(block.attn.k_norm)
    set_method_setting(model, "diffrate", "diffrate_target_gmacs", target_gmacs)
    return model


def _as_list(values: Any) -> Any:
    """A tuple of kept numbers as the list the config holds; anything else as given (the check refuses it)."""
    return list(values) if isinstance(values, tuple) else values


def _attach(model: nn.Module, config: Any) -> nn.Module:
    settings = config.diffrate
    if settings.rates is not None:
        return add_diffrate(model, settings.rates, None, None, settings.granularity, settings.prop_attn,
                            settings.criterion)
    return add_diffrate(model, settings.kept_prune, settings.kept_merge, settings.target_gmacs, settings.granularity,
                        settings.prop_attn, settings.criterion)


def _fix_searched_rates(model: nn.Module) -> None:
    """A searched model reads its kept numbers from its rate logits; fixing them at those numbers
    changes nothing evaluation computes and lets a fixed graph (ONNX) hold them."""
    if any(isinstance(getattr(block, "reduce", None), DiffRateReduce) for block in getattr(model, "blocks", ())):
        fix_rates(model)


def _refuse_unfinished_search(model: nn.Module) -> None:
    if any(isinstance(step, DiffRateReduce) and step.kept_prune is None for step in model.modules()):
        raise TietaError("this DiffRate model still reads its kept numbers from its rate logits (a search not "
                         "ended); fix them first with tieta.methods.diffrate.fix_rates(model)")


def evaluation_masks(model: nn.Module, images: torch.Tensor) -> list[torch.Tensor]:
    """DiffRate's evaluation decisions for ``images``: one (B, P) bool tensor per block that lowers
    the token count, True where a kept token still holds the patch (its own, or the one it was
    merged into), False where the patch was pruned."""
    steps, tokens = diffrate_steps(model), model.patch_embed.num_patches + model.num_prefix_tokens
    deciding = []
    for step, count in zip(steps, mlp_token_counts(model)):
        if count < tokens:
            deciding.append(step)
        tokens = count
    if not deciding:
        raise TietaError("this DiffRate model keeps every token in every block: no token decisions to show")
    return held_patch_masks(model, images, deciding)


METHOD = Method(
    name="diffrate",
    sections={"diffrate": DiffRateConfig},
    attach=_attach,
    modules=("prune_rate", "merge_rate"),
    objective=objective,
    epoch_update=epoch_update,
    describe=describe,
    validate=validate,
    one_process=one_process,
    prepare_export=_fix_searched_rates,
    check_traceable=_refuse_unfinished_search,
    reduces_tokens=True,
    token_masks=evaluation_masks,
    picture_note=lambda config: "grey: pruned; a merged patch stays with the token it joined",
    knob=None,  # its rates are searched or published per block, not one scalar: matched by its own target
)
