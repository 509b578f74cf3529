"""Merge schedules: how many tokens each block merges away, and what that costs.

A schedule is given as
- an int r: the same r in every block;
- a tuple (r, inflection): ToMe's linear schedule (inflection -1 decreasing, 0 constant, +1 increasing);
- a FLOPs target, {flops: F, inflection: I} (a :class:`FlopsTarget`): the schedule of that shape whose
  FLOPs ratio to the unmerged model is closest to F on the model it is attached to, each block's r
  capped at what its tokens allow (:func:`schedule`), so one setting means the same cost on any model;
- a list: r per block (shorter lists are padded with zeros);
- a name, "low" or "high": the PYRA paper's schedules for ViT-B/16, ViT-L/16 and DeiT-B distilled
  at 224 px; for any other model, the FLOPs ratio that schedule reaches on ViT-B/16 (about 0.50
  and 0.29), derived by :func:`schedule` with the same shape (constant for low, decreasing for high).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any, Optional, Sequence, Union

from torch import nn

from tieta.errors import TietaError
from tieta.methods.blocks import check_vit
from tieta.ops.merging import bipartite_starts, max_merges



@dataclass(frozen=True)
class FlopsTarget:
    """A schedule given by its cost: the FLOPs ratio (merged / unmerged, in (0, 1]) to reach on the
    model it is attached to, and the shape of the schedule that reaches it (ToMe's inflection)."""

    flops: float
    inflection: float = 0.0


Schedule = Union[int, tuple, Sequence[int], str, FlopsTarget]

@dataclass
class MergeConfig:
    """Token merging settings (the config section "merge", shared by ToMe and PYRA)."""

    # "low" / "high" (the PYRA paper's), an int r, a per-block list, {r: R, inflection: I} or
    # {flops: F, inflection: I} (a FLOPs ratio to reach on the model, inflection optional)
    schedule: Any = field(default="low", metadata={"any_type": True})
    prop_attn: bool = True  # proportional attention, as the PYRA code (training and evaluation)


def schedule_setting(merge: MergeConfig) -> Schedule:
    """The configured schedule in the form add_tome takes (a mapping becomes a tuple or a FlopsTarget)."""
    return from_mapping(merge.schedule)


def from_mapping(schedule: Any) -> Schedule:
    """{r, inflection} -> (r, inflection); {flops[, inflection]} -> FlopsTarget; anything else as given."""
    if not isinstance(schedule, dict):
        return schedule
    if set(schedule) == {"r", "inflection"}:
        return (schedule["r"], schedule["inflection"])
    if set(schedule) in ({"flops"}, {"flops", "inflection"}):
        return FlopsTarget(schedule["flops"], schedule.get("inflection", 0.0))
    raise TietaError("a schedule mapping takes exactly the keys r and inflection, or flops and an optional "
                     "inflection")


def _is_number(value: Any) -> bool:
    if isinstance(value, int) and not isinstance(value, bool):
        return abs(value) < 2**63  # an int past a float's range has no place in a schedule
    return isinstance(value, float) and math.isfinite(value)


def check_schedule_form(r: Schedule) -> None:
    """Refuse, with one sentence, a schedule that no model could take (what needs no model: the
    form, names, signs); :func:`resolve_schedule` then checks it against a model's blocks and tokens."""
    r = from_mapping(r)
    if isinstance(r, FlopsTarget):
        if not (_is_number(r.flops) and 0 < r.flops <= 1):
            raise TietaError(f"a schedule's flops is the FLOPs ratio to reach, in (0, 1], got {r.flops!r}")
        if not (_is_number(r.inflection) and -1 <= r.inflection <= 1):
            raise TietaError(f"a schedule's inflection is a number in [-1, 1] (-1 decreasing, 0 constant, "
                             f"1 increasing), got {r.inflection!r}")
    elif isinstance(r, str):
        if r not in NAMED_INFLECTION:
            raise TietaError(f"unknown schedule {r!r}; use 'low', 'high', an int, (r, inflection) or a list")
    elif isinstance(r, bool):
        raise TietaError(f"a schedule cannot be a boolean, got {r!r}")
    elif isinstance(r, int):
        if r < 0:
            raise TietaError(f"a schedule's r is the tokens each block merges and cannot be negative, got {r}")
    elif isinstance(r, tuple) and len(r) == 2:
        rate, inflection = r
        if not (_is_number(rate) and rate >= 0):
            raise TietaError(f"a schedule's r is a number of tokens >= 0, got {rate!r}")
        if not (_is_number(inflection) and -1 <= inflection <= 1):
            raise TietaError(f"a schedule's inflection is a number in [-1, 1] (-1 decreasing, 0 constant, "
                             f"1 increasing), got {inflection!r}")
    elif isinstance(r, (list, tuple)):
        for index, merges in enumerate(r):
            if not isinstance(merges, int) or isinstance(merges, bool) or merges < 0:
                raise TietaError(f"block {index} of the schedule asks for {merges!r} merges; use whole numbers >= 0")
    else:
        raise TietaError(f"cannot read {r!r} as a merge schedule; use 'low', 'high', an int, "
                         "{r: R, inflection: I}, {flops: F} or a list")


def validate_merge(config: Any) -> None:
    """The config section "merge" (ToMe's and PYRA's), checked without a model."""
    try:
        check_schedule_form(schedule_setting(config.merge))
    except TietaError as error:
        raise TietaError(f"merge.schedule: {error}") from None


_VIT_B_HIGH = [40, 34, 30, 24, 18, 14, 10, 8, 4, 4, 3, 3]
# (depth, width, patches, prefix tokens) of the paper's backbones at 224 px -> named schedules
PAPER_SCHEDULES: dict[tuple[int, int, int, int], dict[str, list[int]]] = {
    (12, 768, 196, 1): {"low": [16] * 11 + [10], "high": _VIT_B_HIGH},  # ViT-B/16
    (24, 1024, 196, 1): {  # ViT-L/16
        "low": [8] * 23 + [6],
        "high": [20, 19, 18, 17, 15, 13, 13, 12, 10, 9, 8, 6, 6, 4, 4, 4, 3, 3, 2, 2, 1, 1, 1, 1],
    },
    (12, 768, 196, 2): {"low": [16] * 6 + [10] * 6, "high": _VIT_B_HIGH},  # DeiT-B distilled
}
# the ToMe inflection used to derive each named schedule for other models
NAMED_INFLECTION = {"low": 0.0, "high": -0.9}


@dataclass(frozen=True)
class ViTShape:
    """What the cost of a ViT depends on."""

    depth: int
    width: int
    hidden: int  # MLP hidden width
    heads: int
    patches: int  # patch tokens
    prefix: int  # class / distillation / register tokens
    patch_macs: int  # the patch embedding
    head_macs: int  # the classifier(s)

    @property
    def tokens(self) -> int:
        return self.patches + self.prefix


VIT_B16 = ViTShape(12, 768, 3072, 12, 196, 1, 196 * 768 * 768, 768 * 1000)


def mlp_hidden(mlp: nn.Module, width: int) -> int:
    """The hidden width h of a plain MLP (D -> h -> D) that costs what ``mlp`` costs: its own for
    timm's ``Mlp``; for the SwiGLU MLPs of Eva models (D -> 2h' -> gated h' -> D) 1.5 h'."""
    macs = sum(m.in_features * m.out_features for m in mlp.modules() if isinstance(m, nn.Linear))
    return macs // (2 * width)


def vit_shape(model: nn.Module) -> ViTShape:
    """Read a timm ViT's dimensions."""
    check_vit(model)
    block = model.blocks[0]
    patches = model.patch_embed.num_patches
    proj = model.patch_embed.proj
    patch_macs = patches * proj.out_channels * proj.in_channels * math.prod(proj.kernel_size)
    heads = [m for m in (getattr(model, "head", None), getattr(model, "head_dist", None)) if isinstance(m, nn.Linear)]
    return ViTShape(
        depth=len(model.blocks),
        width=model.embed_dim,
        hidden=mlp_hidden(block.mlp, model.embed_dim),
        heads=block.attn.num_heads,
        patches=patches,
        prefix=model.num_prefix_tokens,
        patch_macs=patch_macs,
        head_macs=sum(h.in_features * h.out_features for h in heads),
    )


def token_counts(shape: ViTShape, r: Sequence[int]) -> list[int]:
    """Tokens entering each block, then the tokens leaving the last one (depth + 1 numbers)."""
    counts = [shape.tokens]
    for merges in r:
        counts.append(counts[-1] - merges)
    return counts


def model_macs(shape: ViTShape, r: Sequence[int]) -> int:
    """MACs per image of the plain ViT merging ``r`` tokens per block, counted as count_flops does.

    Attention and its projections run on the tokens entering a block, the MLP on those left after
    the merge, and matching costs the A x B similarity product.
    """
    width, head_dim = shape.width, shape.width // shape.heads
    total = shape.patch_macs + shape.head_macs
    for n, merges in zip(token_counts(shape, r), r):
        total += 4 * n * width * width + 2 * n * n * width  # qkv, proj, q k^T and attn v
        total += 2 * (n - merges) * width * shape.hidden  # MLP after the merge
        if merges:
            a_start, b_start = bipartite_starts(shape.prefix)
            total += len(range(a_start, n, 2)) * len(range(b_start, n, 2)) * head_dim  # bipartite scores
    return total


def flops_ratio(shape: ViTShape, r: Sequence[int]) -> float:
    return model_macs(shape, r) / model_macs(shape, [0] * shape.depth)


def linear_schedule(depth: int, r: float, inflection: float = 0.0) -> list[int]:
    """ToMe's (r, inflection) schedule; a fractional r is spread by cumulative rounding."""
    first = r * (1.0 - inflection)
    last = 2 * r - first
    step = (last - first) / max(1, depth - 1)
    wanted = [first + step * i for i in range(depth)]
    totals = [round(sum(wanted[: i + 1])) for i in range(depth)]
    return [b - a for a, b in zip([0] + totals[:-1], totals)]


def clip_schedule(shape: ViTShape, r: Sequence[int]) -> list[int]:
    """Cap each block's r at what its tokens allow."""
    clipped, n = [], shape.tokens
    for merges in r:
        merges = max(0, min(int(merges), max_merges(n, shape.prefix)))
        clipped.append(merges)
        n -= merges
    return clipped


def schedule(model: Union[nn.Module, ViTShape], target_flops: float, inflection: float = 0.0) -> list[int]:
    """A per-block r list whose FLOPs ratio to the unmerged model is as close as possible to the target.

    Args:
        model: a timm ViT (or its ViTShape).
        target_flops: wanted MACs ratio, merged / unmerged, in (0, 1].
        inflection: the schedule's shape, as ToMe's: 0 constant, -1 decreasing, +1 increasing.
    """
    shape = model if isinstance(model, ViTShape) else vit_shape(model)
    if not 0 < target_flops <= 1:
        raise TietaError(f"target_flops is a ratio in (0, 1], got {target_flops}")
    candidate = lambda rate: clip_schedule(shape, linear_schedule(shape.depth, rate, inflection))
    low, high = 0.0, float(shape.tokens)
    for _ in range(50):  # the ratio falls as the rate grows
        middle = (low + high) / 2
        if flops_ratio(shape, candidate(middle)) > target_flops:
            low = middle
        else:
            high = middle
    options = [candidate(low), candidate(high)]
    return min(options, key=lambda r: abs(flops_ratio(shape, r) - target_flops))


def resolve_schedule(model: nn.Module, r: Schedule) -> list[int]:
    """Turn any accepted schedule form into an r per block, refusing what the tokens cannot allow."""
    check_schedule_form(r)
    r = from_mapping(r)
    shape = vit_shape(model)
    depth = shape.depth
    if isinstance(r, FlopsTarget):
        return schedule(shape, float(r.flops), float(r.inflection))
    if isinstance(r, str):
        key = (depth, shape.width, shape.patches, shape.prefix)
        if key in PAPER_SCHEDULES:
            return list(PAPER_SCHEDULES[key][r])
        reference = flops_ratio(VIT_B16, PAPER_SCHEDULES[(12, 768, 196, 1)][r])
        return schedule(shape, reference, NAMED_INFLECTION[r])
    if isinstance(r, int):
        values = [r] * depth
    elif isinstance(r, tuple) and len(r) == 2:
        values = linear_schedule(depth, float(r[0]), float(r[1]))
    elif isinstance(r, (list, tuple)):
        values = list(r)
        if len(values) > depth:
            raise TietaError(f"the schedule has {len(values)} entries but the model has {depth} blocks")
        values += [0] * (depth - len(values))
    else:
        raise TietaError(f"cannot read {r!r} as a merge schedule")
    check_schedule(shape, values)
    return values


def check_schedule(shape: ViTShape, r: Sequence[int]) -> None:
    """Raise a TietaError naming the first block that asks for more merges than its tokens allow."""
    n = shape.tokens
    for index, merges in enumerate(r):
        if not isinstance(merges, int) or merges < 0:
            raise TietaError(f"block {index} of the schedule asks for {merges!r} merges; use whole numbers >= 0")
        limit = max_merges(n, shape.prefix)
        if merges > limit:
            raise TietaError(
                f"block {index} asks to merge {merges} tokens but at most {limit} can be merged there "
                f"({n} tokens, {shape.prefix} protected)"
            )
        n -= merges


def stage_blocks(depth: int, locations: Optional[Sequence[int]] = None,
                 default: Sequence[int] = (3, 6, 9)) -> list[int]:
    """The blocks where a staged token-reduction method (EViT, DynamicViT) acts.

    Args:
        depth: the model's blocks.
        locations: block indices as given (validated); None: ``default``, which is given for
            depth 12 and taken at the same fractions of depth elsewhere (depth 24: 6, 12, 18).
    """
    if locations is None:
        return sorted({location * depth // 12 for location in default})
    chosen = sorted(set(int(location) for location in locations))
    if not chosen or chosen[0] < 0 or chosen[-1] >= depth:
        raise TietaError(f"locations must be block indices in 0..{depth - 1}, got {list(locations)}")
    return chosen
