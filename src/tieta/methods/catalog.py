"""Every method's name, one-line summary and command-line flags, readable without torch.

``tieta --help`` and argument errors are answered from here, so they never load torch or timm.
Each method module builds its ``Method`` from its entry (``Method.listed(catalog.LORA, ...)``), so
what the command line offers and what training reads come from this one place.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable, Optional, Union

import yaml

from tieta import safe_yaml
from tieta.errors import TietaError
from tieta.ops.diffrate_rates import PUBLISHED_RATES


@dataclass(frozen=True)
class Flag:
    """A command-line flag for one config key, e.g. ``Flag("--rho", "dyt.rho", float, "...")``.

    Attributes:
        option: the flag, e.g. "--schedule".
        key: the dotted config key it sets.
        parse: turns the text into the value (e.g. float, or a YAML reader for lists); it must not
            need torch.
        help: one line for ``--help``.
        choices: the allowed values, if a closed set.
    """

    option: str
    key: str
    parse: Callable[[str], Any]
    help: str
    choices: Optional[tuple] = None


@dataclass(frozen=True)
class Listing:
    """What the command line shows of a method.

    Attributes:
        name: what ``--method`` calls it (joined with "+" to combine, e.g. "pyra+lora").
        summary: one line for listings.
        flags: command-line flags for its most used settings.
    """

    name: str
    summary: str
    flags: tuple[Flag, ...] = ()


def parse_schedule_flag(text: str) -> Union[int, list, dict, str]:
    """``--schedule`` text: an int, a list or an {r, inflection} mapping (read as YAML), or a name
    such as "low"; anything else (a fraction, a boolean, nothing) is refused. The values are
    checked with the rest of the config (``tieta.methods.schedules.check_schedule_form``)."""
    try:
        value = safe_yaml.loads(text)
    except yaml.YAMLError as error:
        raise TietaError(f"cannot read the schedule {text!r}: {safe_yaml.describe(error)}") from None
    if isinstance(value, str):
        return value
    if isinstance(value, (int, list, dict)) and not isinstance(value, bool):
        return value
    raise TietaError(f"a merge schedule is low, high, a whole number r, a list of them or {{r: R, inflection: F}}, "
                     f"got {text!r}")


def parse_number_or_name(text: str) -> Union[float, str]:
    """A number if the text reads as one, else the text (a named setting such as "paper")."""
    try:
        return float(text)
    except ValueError:
        return text


# what a DyT dispatcher's inactive tokens skip
DYT_VARIANTS = ("mlp", "attn", "attn_mlp", "layer")

# ToMe and PYRA share the merge schedule
SCHEDULE_FLAG = Flag("--schedule", "merge.schedule", parse_schedule_flag,
                     "merge schedule for tome/pyra: low, high, an int r, or a list like [16,16,8] (default low)")

LORA = Listing(
    name="lora",
    summary="LoRA on every block's qkv projection (NOAH/PYRA style, or per q/k/v with alpha)",
    flags=(Flag("--lora-rank", "lora.rank", int, "LoRA rank (default 8)"),),
)
ADAPTER = Listing(
    name="adapter",
    summary="AdaptFormer: a bottleneck MLP parallel to every block's MLP",
    flags=(Flag("--adapter-dim", "adapter.dim", int, "adapter bottleneck width (default 8)"),),
)
TOME = Listing(
    name="tome",
    summary="ToMe: merge r similar tokens in every block (Bolya et al., ICLR 2023)",
    flags=(SCHEDULE_FLAG,),
)
PYRA = Listing(
    name="pyra",
    summary="PYRA: ToMe with trainable re-activation of the merged tokens (Xiong et al., ECCV 2024)",
    flags=(SCHEDULE_FLAG, Flag("--pyra-lr", "pyra.lr", parse_number_or_name,
                               "PYRA's lr: reference (the base lr, as the published runs), paper (1e-4) or a number")),
)
DYT = Listing(
    name="dyt",
    summary="DyT: token dispatchers skip the MLP (or attention, or the block) for inactive tokens "
            "(Zhao et al., NeurIPS 2024)",
    flags=(
        Flag("--rho", "dyt.rho", float, "DyT: target share of active tokens (default 0.5)"),
        Flag("--dyt-variant", "dyt.variant", str, "DyT: what inactive tokens skip (default mlp)", DYT_VARIANTS),
        Flag("--experts", "dyt.experts", int, "DyT: adapter experts; > 1 makes an MoE-adapter (default 1)"),
    ),
)
EVIT = Listing(
    name="evit",
    summary="EViT: keep the tokens the class token attends to, fuse the rest (Liang et al., ICLR 2022)",
    flags=(Flag("--keep-rate", "evit.keep_rate", float, "EViT: share of tokens kept at each location (default 0.7)"),),
)
DYNAMICVIT = Listing(
    name="dynamicvit",
    summary="DynamicViT: learned prediction modules prune tokens before a few blocks (Rao et al., NeurIPS 2021)",
)
DIFFRATE = Listing(
    name="diffrate",
    summary="DiffRate: searched per-block prune and merge rates (Chen et al., ICCV 2023)",
    flags=(
        Flag("--diffrate-rates", "diffrate.rates", str, "DiffRate: a published schedule, e.g. vit_b_deit_8.7",
             tuple(PUBLISHED_RATES)),
        Flag("--target-gmacs", "diffrate.target_gmacs", float,
             "DiffRate: search the rates for this many GMACs per image in the first diffrate.search_epochs epochs"),
    ),
)
ATC = Listing(
    name="atc",
    summary="ATC: agglomerative clustering of the patch tokens at a few blocks (Haurum et al., ECCV 2024)",
    flags=(
        Flag("--atc-keep-rate", "atc.keep_rate", float,
             "ATC: share of the patch tokens kept per location, compounding (default 0.7)"),
        Flag("--linkage", "atc.linkage", str, "ATC: how cluster distances combine (default average)",
             ("single", "complete", "average")),
    ),
)

# name -> listing, in the order the registry lists the methods
CATALOG: dict[str, Listing] = {listing.name: listing for listing in (
    LORA, ADAPTER, TOME, PYRA, DYT, EVIT, DYNAMICVIT, DIFFRATE,
    ATC,
)}


def flags() -> list[Flag]:
    """Every method's command-line flags, each once (methods may share one, as ToMe and PYRA do)."""
    seen: dict[str, Flag] = {}
    for listing in CATALOG.values():
        for flag in listing.flags:
            seen.setdefault(flag.option, flag)
    return list(seen.values())
