"""DiffRate's kept numbers: where they come from when attaching (checked lists or a published
schedule), how they are read from a model, and fixing them at the end of a search.

Kept numbers are per block and count the prefix tokens; block 0 keeps every token.
"""

from __future__ import annotations

from typing import Any, Optional, Sequence, Union

from torch import nn

from tieta.errors import TietaError
from tieta.methods.diffrate_step import diffrate_steps
from tieta.methods.schedules import ViTShape
from tieta.ops.diffrate_rates import PUBLISHED_RATES

# what add_diffrate takes for a kept number list: a schedule's name, one number per block, or None
Counts = Union[str, Sequence[int], None]


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


def check_counts(values: Any, name: str, shape: ViTShape) -> list[int]:
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


def fixed_counts(shape: ViTShape, kept_prune: Counts, kept_merge: Counts) -> Optional[tuple[list[int], list[int]]]:
    """(kept_prune, kept_merge) per block from what add_diffrate was given, or None for a search."""
    if isinstance(kept_prune, str):
        if kept_merge is not None:
            raise TietaError("a published DiffRate schedule gives both kept numbers; pass its name alone")
        return published_counts(shape, kept_prune)
    if kept_prune is None and kept_merge is None:
        return None
    # a missing list keeps every token for that operation
    every = [shape.tokens] * shape.depth
    prune = every if kept_prune is None else check_counts(kept_prune, "kept_prune", shape)
    merge = every if kept_merge is None else check_counts(kept_merge, "kept_merge", shape)
    return prune, merge


def never_compressed(model: nn.Module, depth: int) -> set[int]:
    """Blocks with a single candidate in a search: block 0, and the last one under a pooled head."""
    fixed = {0}
    if getattr(model, "global_pool", "token") != "token":  # every token reaches the head
        fixed.add(depth - 1)
    return fixed


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


def start_search(model: nn.Module) -> list[nn.Parameter]:
    """Put a searchable model back into search mode; returns the logits, made trainable."""
    params = rate_parameters(model)
    for step in diffrate_steps(model):
        step.kept_prune, step.kept_merge, step.searching = None, None, True
    for param in params:
        param.requires_grad_(True)
    return params
