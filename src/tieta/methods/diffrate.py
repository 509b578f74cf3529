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
- Merge sources are not traced (``TokenState.trace_source`` is ignored).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any, Iterable, Optional, Sequence, Union

import torch
import torch.nn.functional as F
from torch import nn
from tqdm.auto import tqdm

from tieta import shard
from tieta.errors import TietaError
from tieta.methods.blocks import (TietaBlock, TokenState, claim_reduction, follow_tokens, keep_output, patch_blocks,
                                  rotated, take_output,
                                  token_state)
from tieta.methods.method import Method
from tieta.methods.schedules import ViTShape, vit_shape
from tieta.methods.tome import size_bias_mask
from tieta.ops.attention import class_attention, received_attention, softmax_with_policy
from tieta.ops.diffrate import RateLogits, merge_training, prune_merge, search_flops, sort_by_importance
from tieta.ops.diffrate_rates import PUBLISHED_RATES

# the smallest token size at evaluation, so that log(size) stays finite (see the module docstring)
SIZE_EPS = 1e-6
CRITERIA = ("class", "received")
Counts = Union[str, Sequence[int], None]


# --- importance -----------------------------------------------------------------------------------


def masked_class_attention(q: torch.Tensor, k: torch.Tensor, scale: float, num_prefix: int, policy: torch.Tensor,
                           bias: Optional[torch.Tensor] = None, eps: float = 1e-6) -> torch.Tensor:
    """The class token's row of the masked softmax (``softmax_with_policy``), averaged over heads.

    Row 0 of the search-time attention, without the N x N matrix: keys with policy 0 get only the
    ``eps / N`` share. The class token's own column is always kept, so the diagonal term of the
    masked softmax plays no part in this row.

    Args:
        q: queries (B, H, N, d) after ``q_norm``; index 0 is the class token.
        k: keys (B, H, N, d) after ``k_norm``.
        scale: the attention's logit scale.
        num_prefix: prefix tokens, left out of the result.
        policy: (B, N) keep mask (its gradient is not used here).
        bias: optional additive (B, 1, 1, N) logit bias (log size).
        eps: the masked softmax's stabiliser.

    Returns:
        float32 scores (B, N - num_prefix).
    """
    tokens = k.shape[2]
    logits = (q[:, :, :1].float() * scale) @ k.float().transpose(-2, -1)  # (B, H, 1, N)
    if bias is not None:
        logits = logits + bias.float()
    keep = policy.detach().float()[:, None, None, :]  # (B, 1, 1, N)
    weights = (logits - logits.amax(dim=-1, keepdim=True)).exp() * keep
    probs = (weights + eps / tokens) / (weights.sum(dim=-1, keepdim=True) + eps)
    return probs.mean(dim=1)[:, 0, num_prefix:]


def masked_received_attention(q: torch.Tensor, k: torch.Tensor, scale: float, num_prefix: int, policy: torch.Tensor,
                              bias: Optional[torch.Tensor] = None) -> torch.Tensor:
    """The attention each token receives under the masked softmax, averaged over heads and kept queries.

    The search-time form of ``received_attention`` (the labelled option for models without a
    class token): the rows of removed tokens are left out of the mean.

    Args:
        q, k: (B, H, N, d) after ``q_norm`` / ``k_norm``.
        scale: the attention's logit scale.
        num_prefix: prefix tokens, left out of the result.
        policy: (B, N) keep mask.
        bias: optional additive (B, 1, 1, N) logit bias.

    Returns:
        float32 scores (B, N - num_prefix).
    """
    logits = (q.float() * scale) @ k.float().transpose(-2, -1)  # (B, H, N, N)
    if bias is not None:
        logits = logits + bias.float()
    keep = policy.detach().float()
    probs = softmax_with_policy(logits, keep)
    rows = keep[:, None, :, None]  # (B, 1, N, 1): queries still in play
    received = (probs * rows).sum(dim=(1, 2)) / (rows.sum(dim=(1, 2)) * probs.shape[1])
    return received[:, num_prefix:]


def token_importance(q: torch.Tensor, k: torch.Tensor, scale: float, num_prefix: int, criterion: str,
                     bias: Optional[torch.Tensor] = None, policy: Optional[torch.Tensor] = None) -> torch.Tensor:
    """DiffRate's ranking score of the non-prefix tokens.

    Args:
        q, k: (B, H, N, d) after ``q_norm`` / ``k_norm``.
        scale: the attention's logit scale.
        num_prefix: prefix tokens.
        criterion: "class" (the class token's attention, DiffRate) or "received".
        bias: optional (B, 1, 1, N) log-size bias.
        policy: (B, N) running keep mask of a search, or None.

    Returns:
        float32 scores (B, N - num_prefix); tokens the policy removed score -inf (ranked last).
    """
    if policy is None:
        score = class_attention if criterion == "class" else received_attention
        return score(q, k, scale, num_prefix, bias)
    score = masked_class_attention if criterion == "class" else masked_received_attention
    scores = score(q, k, scale, num_prefix, policy, bias)
    return scores.masked_fill(policy[:, num_prefix:].detach() <= 0, float("-inf"))


# --- the reduce step ------------------------------------------------------------------------------


class DiffRateReduce(nn.Module):
    """A block's ``reduce`` step: sort by importance, prune, merge.

    Either fixed kept numbers, or the two rate logits of a search (whose kept numbers are then
    read from the logits until :func:`fix_rates` fixes them).

    Args:
        kept_prune: tokens kept by pruning, prefix included (fixed rates).
        kept_merge: tokens kept by merging, prefix included (fixed rates).
        prune_rate: the searchable pruning rate (instead of fixed numbers).
        merge_rate: the searchable merging rate.
        criterion: "class" or "received" (see :func:`token_importance`).

    Attributes:
        searching: while the block is in ``train()`` mode, run the search's masked forward instead
            of gathering tokens.
    """

    prune_rate: Optional[RateLogits]
    merge_rate: Optional[RateLogits]

    def __init__(self, kept_prune: Optional[int] = None, kept_merge: Optional[int] = None,
                 prune_rate: Optional[RateLogits] = None, merge_rate: Optional[RateLogits] = None,
                 criterion: str = "class") -> None:
        super().__init__()
        if (kept_prune is None) != (prune_rate is not None) or (kept_merge is None) != (merge_rate is not None):
            raise ValueError("give either both kept numbers or both rate logits")
        self.kept_prune, self.kept_merge = kept_prune, kept_merge
        self.prune_rate, self.merge_rate = prune_rate, merge_rate
        self.criterion = criterion
        self.searching = prune_rate is not None

    def extra_repr(self) -> str:
        if self.kept_prune is None:
            return f"searched, criterion={self.criterion}"
        return f"kept_prune={self.kept_prune}, kept_merge={self.kept_merge}, criterion={self.criterion}"

    def kept_numbers(self) -> tuple[int, int]:
        """(kept_prune, kept_merge) used when tokens are gathered: the fixed numbers, else the logits'."""
        if self.kept_prune is not None:
            return self.kept_prune, self.kept_merge
        # reading the logits costs a device sync per block, so the numbers are kept until they change
        key = tuple((rate.logits.data_ptr(), rate.logits._version) for rate in (self.prune_rate, self.merge_rate))
        cached = self.__dict__.get("tieta_kept")
        if cached is None or cached[0] != key:
            cached = (key, (self.prune_rate.kept_number(), self.merge_rate.kept_number()))
            self.__dict__["tieta_kept"] = cached
        return cached[1]

    def forward(self, x: torch.Tensor, block: TietaBlock) -> torch.Tensor:
        """Args: x: (B, N, D) after the attention residual.
        Returns: (B, min(N, kept_prune, kept_merge), D); during a search (B, N, D)."""
        # (B, H, N, hd), rotated as attention used them on a model with rope
        q, k = rotated(block, take_output(block.attn.q_norm)), rotated(block, take_output(block.attn.k_norm))
        if block.training and self.searching:  # the block's mode: a step attached later may not share it yet
            return self._search(x, block, q, k)
        return self._gather(x, block, q, k)

    def _gather(self, x: torch.Tensor, block: TietaBlock, q: torch.Tensor, k: torch.Tensor) -> torch.Tensor:
        """Evaluation (and fixed-rate training): tokens leave the tensor."""
        state, prefix = block.token_state, block.num_prefix_tokens
        kept_prune, kept_merge = self.kept_numbers()
        scores = token_importance(q, k, block.attn.scale, prefix, self.criterion, state.attn_bias)
        tokens = x.shape[1]
        x, size, order = sort_by_importance(x, _sizes(state, x), scores, prefix)
        merges = kept_merge < min(x.shape[1], kept_prune)
        x, size = prune_merge(x, size, kept_prune, kept_merge, prefix)
        # the kept tokens (merge destinations among them) keep their positions
        follow_tokens(block, order[:, prefix:x.shape[1]] - prefix, tokens - prefix)
        if merges:
            size = size.clamp(min=SIZE_EPS)  # keeps log(size) finite (module docstring)
        _store_sizes(state, size, x, merges)
        return x

    def _search(self, x: torch.Tensor, block: TietaBlock, q: torch.Tensor, k: torch.Tensor) -> torch.Tensor:
        """The search's forward: tokens stay, the running keep mask (B, N) removes them."""
        state, prefix = block.token_state, block.num_prefix_tokens
        batch, tokens, _ = x.shape
        policy = state.policy
        scores = token_importance(q, k, block.attn.scale, prefix, self.criterion, state.attn_bias, policy)
        x, size, order = sort_by_importance(x, _sizes(state, x), scores, prefix)
        follow_tokens(block, order[:, prefix:] - prefix, tokens - prefix)  # tokens stay, sorted
        active = tokens
        if policy is not None:
            policy = policy.gather(1, order)
            # the mask keeps the same positions in every image; round: it is a float sum
            active = int(round(float(policy[0].detach().sum())))
        kept_prune = self.prune_rate.expected_kept()
        if float(kept_prune.detach()) < active:
            policy = _mask_positions(policy, self.prune_rate.keep_mask(kept_prune, active), batch, tokens)
        left = min(active, int(kept_prune.detach()))
        kept_merge = self.merge_rate.expected_kept()
        merges = float(kept_merge.detach()) < left
        if merges:
            policy = _mask_positions(policy, self.merge_rate.keep_mask(kept_merge, left), batch, tokens)
            x, size = merge_training(x, size, left, int(kept_merge.detach()), prefix)
        state.policy = policy
        _store_sizes(state, size, x, merges)
        return x


def _sizes(state: TokenState, x: torch.Tensor) -> torch.Tensor:
    """The tokens' sizes (B, N, 1): the state's, or ones before the first merge."""
    return state.size if state.size is not None else x.new_ones(x.shape[0], x.shape[1], 1)


def _store_sizes(state: TokenState, size: torch.Tensor, x: torch.Tensor, merged: bool) -> None:
    """Give the next blocks the sizes and their log bias; before any merge they are all 1 and stay None."""
    if not merged and state.size is None:
        return
    state.size = size
    state.attn_bias = size_bias_mask(size, x) if state.prop_attn else None


def _mask_positions(policy: Optional[torch.Tensor], mask: torch.Tensor, batch: int, tokens: int) -> torch.Tensor:
    """The running (B, N) policy times a keep mask over its first ``len(mask)`` sorted positions.

    Positions after the mask's length are already 0 in the policy (they were removed earlier), so
    padding the mask with ones there changes neither the product nor its gradient.
    """
    padded = torch.cat([mask, mask.new_ones(tokens - mask.shape[0])])  # (N,)
    if policy is None:
        return padded.expand(batch, tokens).contiguous()
    return policy * padded


# --- attaching ------------------------------------------------------------------------------------


def published_counts(shape: ViTShape, name: str) -> tuple[list[int], list[int]]:
    """A published schedule's (kept_prune, kept_merge) for a model of ``shape``.

    Raises:
        TietaError: for an unknown name, or a model whose depth or patch count the schedule was not
            searched for.
    """
    if name not in PUBLISHED_RATES:
        raise TietaError(f"unknown DiffRate schedule {name!r}; choose from {', '.join(PUBLISHED_RATES)}")
    prune, merge = PUBLISHED_RATES[name]
    if len(prune) != shape.depth or shape.patches != 196:
        raise TietaError(
            f"the DiffRate schedule {name} was searched for {len(prune)} blocks and 196 patches (224 px, patch 16); "
            f"this model has {shape.depth} blocks and {shape.patches} patches"
        )
    # the published numbers count one class token: keep the same patch tokens beside more prefix tokens
    shift = shape.prefix - 1
    return [kept + shift for kept in prune], [kept + shift for kept in merge]


def _check_counts(values: Any, name: str, shape: ViTShape) -> list[int]:
    """Kept numbers per block, checked: whole numbers, one per block, at least one non-prefix token,
    and block 0 keeping everything."""
    if not isinstance(values, (list, tuple)) or len(values) != shape.depth:
        raise TietaError(f"{name} must list one kept number per block ({shape.depth}), got {values!r}")
    for index, kept in enumerate(values):
        if not isinstance(kept, int) or isinstance(kept, bool) or kept <= shape.prefix:
            raise TietaError(
                f"{name}[{index}] is {kept!r}; kept numbers count the {shape.prefix} prefix token(s) and must keep "
                "at least one more"
            )
    if values[0] < shape.tokens:
        raise TietaError(f"DiffRate never compresses block 0; {name}[0] must be at least {shape.tokens} (all tokens)")
    return [int(kept) for kept in values]


def _fixed_counts(shape: ViTShape, kept_prune: Counts, kept_merge: Counts) -> Optional[tuple[list[int], list[int]]]:
    """(kept_prune, kept_merge) per block from what add_diffrate was given, or None for a search."""
    if isinstance(kept_prune, str):
        if kept_merge is not None:
            raise TietaError("a published DiffRate schedule gives both kept numbers; pass its name alone")
        return published_counts(shape, kept_prune)
    if kept_prune is None and kept_merge is None:
        return None
    # a missing list keeps every token for that operation
    every = [shape.tokens] * shape.depth
    prune = every if kept_prune is None else _check_counts(kept_prune, "kept_prune", shape)
    merge = every if kept_merge is None else _check_counts(kept_merge, "kept_merge", shape)
    return prune, merge


def _never_compressed(model: nn.Module, depth: int) -> set[int]:
    """Blocks with a single candidate in a search: block 0, and the last one under a pooled head."""
    fixed = {0}
    if getattr(model, "global_pool", "token") != "token":  # every token reaches the head
        fixed.add(depth - 1)
    return fixed


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
    if criterion not in CRITERIA:
        raise TietaError(f"criterion must be one of {', '.join(CRITERIA)}, got {criterion!r}")
    if criterion == "class" and getattr(model, "cls_token", None) is None:
        raise TietaError(
            "DiffRate ranks tokens by the class token's attention and this model has no class token; pass "
            "criterion='received' to rank them by the attention they receive (a deviation from DiffRate)"
        )
    counts = _fixed_counts(shape, kept_prune, kept_merge)
    if counts is not None and target_gmacs is not None:
        raise TietaError("give DiffRate either kept numbers or a target to search for, not both")
    if target_gmacs is not None and target_gmacs <= 0:
        raise TietaError(f"target_gmacs must be positive, got {target_gmacs}")
    if isinstance(granularity, bool) or not isinstance(granularity, int) or granularity < 1:
        raise TietaError(f"granularity must be a whole number >= 1, got {granularity!r}")
    claim_reduction(model, "DiffRate")
    blocks = patch_blocks(model)
    token_state(model).prop_attn = prop_attn
    fixed = _never_compressed(model, shape.depth)
    for index, block in enumerate(blocks):
        if counts is not None:
            step = DiffRateReduce(counts[0][index], counts[1][index], criterion=criterion)
        else:
            rates = [RateLogits(shape.patches, granularity, index in fixed, shape.prefix) for _ in range(2)]
            step = DiffRateReduce(prune_rate=rates[0], merge_rate=rates[1], criterion=criterion)
        block.reduce = step.to(next(block.parameters()).device).train(block.training)
        keep_output(block.attn.q_norm)
        keep_output(block.attn.k_norm)
    model.diffrate_target_gmacs = target_gmacs
    return model


# --- reading and fixing the kept numbers ----------------------------------------------------------


def diffrate_steps(model: nn.Module) -> list[DiffRateReduce]:
    """The model's DiffRate steps, one per block."""
    steps = [block.reduce for block in getattr(model, "blocks", ()) if isinstance(block.reduce, DiffRateReduce)]
    if not steps:
        raise TietaError("this model has no DiffRate; call add_diffrate first")
    return steps


def kept_numbers(model: nn.Module) -> tuple[list[int], list[int]]:
    """(kept_prune, kept_merge) per block as tokens are gathered (fixed, or read from the logits)."""
    pairs = [step.kept_numbers() for step in diffrate_steps(model)]
    return [prune for prune, _ in pairs], [merge for _, merge in pairs]


def mlp_token_counts(model: nn.Module) -> list[int]:
    """Tokens entering each block's MLP at evaluation: ``min(N, kept_prune, kept_merge)``, prefix included."""
    tokens = model.patch_embed.num_patches + model.num_prefix_tokens
    counts = []
    for prune, merge in zip(*kept_numbers(model)):
        tokens = min(tokens, prune, merge)
        counts.append(tokens)
    return counts


def rate_parameters(model: nn.Module) -> list[nn.Parameter]:
    """The rate logits of a searchable model, block by block (prune, then merge)."""
    steps = diffrate_steps(model)
    if any(step.prune_rate is None for step in steps):
        raise TietaError("this model's DiffRate numbers are fixed; add_diffrate(model) without them gives rates "
                         "to search")
    return [rate.logits for step in steps for rate in (step.prune_rate, step.merge_rate)]


def search_gmacs(model: nn.Module) -> torch.Tensor:
    """GMACs per image of the DiffRate model, differentiable in the rate logits while they are searched.

    Blocks as ``search_flops`` counts them (attention on the tokens entering, MLP on the tokens
    kept), plus the patch embedding and the head(s).

    Returns:
        a 0-dim float64 tensor.
    """
    shape = vit_shape(model)
    prune, merge = [], []
    for step in diffrate_steps(model):
        if step.kept_prune is None:
            prune.append(step.prune_rate.expected_kept())
            merge.append(step.merge_rate.expected_kept())
        else:
            prune.append(step.kept_prune)
            merge.append(step.kept_merge)
    blocks = search_flops(shape.depth, shape.width, shape.hidden, shape.patches, shape.prefix, prune, merge)
    return (blocks + shape.patch_macs + shape.head_macs) / 1e9


def fix_rates(model: nn.Module) -> tuple[list[int], list[int]]:
    """End a search: fix each block's kept numbers at the logits' ``kept_number()``.

    Returns:
        (kept_prune, kept_merge) per block, prefix included.
    """
    for step in diffrate_steps(model):
        if step.prune_rate is not None:
            step.kept_prune, step.kept_merge = step.prune_rate.kept_number(), step.merge_rate.kept_number()
        step.searching = False
    return kept_numbers(model)


def _start_search(model: nn.Module) -> list[nn.Parameter]:
    """Put a searchable model back into search mode; returns the logits, made trainable."""
    params = rate_parameters(model)
    for step in diffrate_steps(model):
        step.kept_prune, step.kept_merge, step.searching = None, None, True
    for param in params:
        param.requires_grad_(True)
    return params


# --- the search -----------------------------------------------------------------------------------


def search_step(model: nn.Module, images: torch.Tensor, labels: torch.Tensor, optimizer: torch.optim.Optimizer,
                target_gmacs: float, flops_weight: float = 5.0) -> tuple[torch.Tensor, torch.Tensor]:
    """One step of DiffRate's search: ``CE + flops_weight * (GMACs - target)^2``, rate logits only.

    Gradients are taken for the rate logits alone (``torch.autograd.grad``), so no other parameter
    receives one, whatever it requires; ``optimizer`` must hold the rate logits only.

    Args:
        model: a searchable DiffRate model in ``train()`` mode.
        images: (B, 3, H, W), normalised, on the model's device.
        labels: (B,) class indices.
        optimizer: over :func:`rate_parameters`.
        target_gmacs: GMACs per image the search aims at.
        flops_weight: lambda of the FLOPs term (the reference's 5).

    Returns:
        (loss, gmacs), both detached 0-dim tensors.
    """
    params = rate_parameters(model)
    gmacs = search_gmacs(model)
    loss = F.cross_entropy(model(images), labels) + (flops_weight * (gmacs - target_gmacs) ** 2).float()
    grads = torch.autograd.grad(loss, params, allow_unused=True)
    for param, grad in zip(params, grads):
        param.grad = grad
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)
    return loss.detach(), gmacs.detach()


def search_lr_at(epoch: int, epochs: int, lr: float, min_lr: float) -> float:
    """The search's per-epoch cosine learning rate, from ``lr`` at epoch 0 towards ``min_lr``."""
    return min_lr + (lr - min_lr) * 0.5 * (1 + math.cos(math.pi * epoch / epochs))


def search_rates(
    model: nn.Module,
    loader_or_batches: Iterable[tuple[torch.Tensor, torch.Tensor]],
    target_gmacs: Optional[float] = None,
    epochs: int = 3,
    lr: float = 0.01,
    min_lr: float = 0.001,
    flops_weight: float = 5.0,
) -> tuple[list[int], list[int]]:
    """DiffRate's search with everything but the rate logits frozen, then the kept numbers fixed.

    AdamW over the rate logits (no weight decay), lr cosine from ``lr`` to ``min_lr`` per epoch, loss
    ``CE + flops_weight * (GMACs - target)^2``; the model runs in ``train()`` mode (drop-path on,
    as in the reference) and is left in the mode it had.

    Args:
        model: a model from ``add_diffrate(model)`` without kept numbers.
        loader_or_batches: (images, labels) batches, normalised images; iterated once per epoch, so a
            DataLoader or a list.
        target_gmacs: GMACs per image to aim at; None: the one given to add_diffrate.
        epochs: passes over the batches (the reference: 3 ImageNet epochs).
        lr, min_lr: the cosine's ends (the reference's 0.01 and 0.001).
        flops_weight: lambda of the FLOPs term (the reference's 5).

    Returns:
        (kept_prune, kept_merge) per block, prefix included, now fixed in the model.
    """
    target = getattr(model, "diffrate_target_gmacs", None) if target_gmacs is None else target_gmacs
    if target is None or target <= 0:
        raise TietaError("search_rates needs a positive target_gmacs (or one given to add_diffrate)")
    if epochs < 1:
        raise TietaError(f"epochs must be at least 1, got {epochs}")
    params = _start_search(model)
    optimizer = torch.optim.AdamW(params, lr=lr, weight_decay=0.0)
    device = params[0].device
    was_training = model.training
    model.train()
    try:
        for epoch in range(epochs):
            for group in optimizer.param_groups:
                group["lr"] = search_lr_at(epoch, epochs, lr, min_lr)
            progress = tqdm(loader_or_batches, desc=f"DiffRate search {epoch + 1}/{epochs}", leave=False, disable=None)
            for images, labels in progress:
                loss, gmacs = search_step(model, images.to(device), labels.to(device), optimizer, target, flops_weight)
                progress.set_postfix(loss=f"{float(loss):.4f}", gmacs=f"{float(gmacs):.4g}")
    finally:
        model.train(was_training)
    return fix_rates(model)


# --- the method, as training and the CLI see it ---------------------------------------------------


@dataclass
class DiffRateConfig:
    """DiffRate settings (the config section "diffrate"): fixed kept numbers, or a search target."""

    rates: Optional[str] = None  # a published schedule, e.g. "vit_b_deit_8.7" (PUBLISHED_RATES)
    kept_prune: Any = field(default=None, metadata={"any_type": True})  # per-block list, prefix included
    kept_merge: Any = field(default=None, metadata={"any_type": True})  # per-block list, prefix included
    target_gmacs: Optional[float] = None  # search for this many GMACs per image instead
    granularity: int = 4  # gap between the search's candidate kept numbers
    prop_attn: bool = True  # proportional attention (log size)
    criterion: str = "class"  # "received" for models without a class token (a deviation)
    search_epochs: int = 3  # the first epochs of a run that search (with target_gmacs)
    search_lr: float = 0.01
    search_min_lr: float = 0.001
    flops_weight: float = 5.0


@dataclass
class _SearchRun:
    """A search inside a training run: its optimizer and loss settings."""

    optimizer: torch.optim.Optimizer
    target: float
    flops_weight: float


_RUN = "tieta_diffrate_search"


def _attach(model: nn.Module, config: Any) -> nn.Module:
    settings = config.diffrate
    if settings.rates is not None:
        return add_diffrate(model, settings.rates, None, None, settings.granularity, settings.prop_attn,
                            settings.criterion)
    return add_diffrate(model, settings.kept_prune, settings.kept_merge, settings.target_gmacs, settings.granularity,
                        settings.prop_attn, settings.criterion)


def _searching(model: nn.Module) -> bool:
    return any(step.searching for step in diffrate_steps(model))


def _search_run(model: nn.Module, settings: DiffRateConfig) -> _SearchRun:
    """The run's search state, made on first use (kept on the model, outside its modules)."""
    run = model.__dict__.get(_RUN)
    if run is None:
        optimizer = torch.optim.AdamW(_start_search(model), lr=settings.search_lr, weight_decay=0.0)
        run = _SearchRun(optimizer, settings.target_gmacs, settings.flops_weight)
        model.__dict__[_RUN] = run
    return run


def _objective(config: Any):
    settings = config.diffrate

    def diffrate_step(model: nn.Module, images: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        if not (model.training and _searching(model)):
            return shard.cross_entropy(model(images), labels)
        run = _search_run(model, settings)
        loss, _ = search_step(model, images, labels, run.optimizer, run.target, run.flops_weight)
        # the rate logits are stepped; a leaf without a graph lets the loop's own step change nothing
        return loss.requires_grad_()

    return diffrate_step


def _epoch_update(model: nn.Module, config: Any, epoch: int, epochs: int) -> dict[str, Any]:
    settings = config.diffrate
    if not _searching(model):
        return {}
    if epoch < settings.search_epochs:
        lr = search_lr_at(epoch, settings.search_epochs, settings.search_lr, settings.search_min_lr)
        for group in _search_run(model, settings).optimizer.param_groups:
            group["lr"] = lr
        return {"diffrate_phase": "search", "diffrate_search_lr": lr}
    model.__dict__.pop(_RUN, None)
    prune, merge = fix_rates(model)
    return {"diffrate_phase": "fixed", "diffrate_kept_prune": prune, "diffrate_kept_merge": merge}


def _describe(model: nn.Module) -> dict[str, Any]:
    prune, merge = kept_numbers(model)
    return {"diffrate_kept_prune": prune, "diffrate_kept_merge": merge, "mlp_token_counts": mlp_token_counts(model)}


def _is_count_list(value: Any) -> bool:
    return isinstance(value, list) and all(isinstance(v, int) and not isinstance(v, bool) for v in value)


def _validate(config: Any) -> None:
    settings = config.diffrate
    if settings.rates is not None and settings.rates not in PUBLISHED_RATES:
        raise TietaError(f"diffrate.rates must be one of {', '.join(PUBLISHED_RATES)}, got {settings.rates!r}")
    lists = settings.kept_prune is not None or settings.kept_merge is not None
    if settings.rates is not None and lists:
        raise TietaError("set diffrate.rates or diffrate.kept_prune/kept_merge, not both")
    for name in ("kept_prune", "kept_merge"):
        value = getattr(settings, name)
        if value is not None and not _is_count_list(value):
            raise TietaError(f"diffrate.{name} must be a list of whole numbers, one per block, got {value!r}")
    fixed = settings.rates is not None or lists
    if fixed and settings.target_gmacs is not None:
        raise TietaError("set either DiffRate's kept numbers (diffrate.rates, kept_prune, kept_merge) or "
                         "diffrate.target_gmacs to search for them, not both")
    checks = [
        (settings.target_gmacs is None or settings.target_gmacs > 0, "diffrate.target_gmacs must be positive"),
        (settings.granularity >= 1, "diffrate.granularity must be at least 1"),
        (settings.criterion in CRITERIA, f"diffrate.criterion must be one of {', '.join(CRITERIA)}"),
        (settings.search_epochs >= 1, "diffrate.search_epochs must be at least 1"),
        (0 < settings.search_min_lr <= settings.search_lr, "diffrate.search_lr and search_min_lr must be positive, "
                                                            "the minimum no larger"),
        (settings.search_lr <= 10, "diffrate.search_lr must be at most 10 (as every learning rate: optim.MAX_LR)"),
        (settings.flops_weight >= 0, "diffrate.flops_weight cannot be negative"),
    ]
    for ok, message in checks:
        if not ok:
            raise TietaError(message)
    if "diffrate" not in config.methods or fixed:
        return
    if settings.target_gmacs is None:
        raise TietaError("DiffRate needs kept numbers (diffrate.rates, or kept_prune/kept_merge) or a target "
                         "to search for them (diffrate.target_gmacs)")
    if settings.search_epochs >= config.optim.epochs:
        raise TietaError(f"the DiffRate search takes the first {settings.search_epochs} epochs; "
                         f"optim.epochs ({config.optim.epochs}) must leave at least one to fine-tune")


def _one_process(config: Any) -> Optional[str]:
    if config.diffrate.target_gmacs is None:
        return None
    # the search steps its own optimizer inside the objective, on this process's gradients only
    return ("DiffRate's rate search runs in one process; search with tieta train alone, then train in parallel "
            "with the rates it found (diffrate.kept_prune, kept_merge)")


def _fix_searched_rates(model: nn.Module) -> None:
    """A searched model reads its kept numbers from its rate logits; fixing them at those numbers
    changes nothing evaluation computes and lets a fixed graph (ONNX) hold them."""
    if any(isinstance(getattr(block, "reduce", None), DiffRateReduce) for block in getattr(model, "blocks", ())):
        fix_rates(model)


def _refuse_unfinished_search(model: nn.Module) -> None:
    if any(isinstance(step, DiffRateReduce) and step.kept_prune is None for step in model.modules()):
        raise TietaError("this DiffRate model still reads its kept numbers from its rate logits (a search not "
                         "ended); fix them first with tieta.methods.diffrate.fix_rates(model)")


METHOD = Method(
    name="diffrate",
    sections={"diffrate": DiffRateConfig},
    attach=_attach,
    modules=("prune_rate", "merge_rate"),
    objective=_objective,
    epoch_update=_epoch_update,
    describe=_describe,
    validate=_validate,
    one_process=_one_process,
    prepare_export=_fix_searched_rates,
    check_traceable=_refuse_unfinished_search,
    reduces_tokens=True,
)
