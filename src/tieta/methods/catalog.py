"""The command-line side of a method, readable without torch: ``Flag`` and the parse functions
flags use, and the settings' closed sets that flags and method modules share.

``tieta --help`` and argument errors are answered from the registry's entries
(``tieta.methods.registry``), which are built from these, so they never load torch or timm.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable, Optional, Union

import yaml

from tieta import safe_yaml
from tieta.errors import TietaError


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


def parse_schedule_flag(text: str) -> Union[int, list, dict, str]:
    """``--schedule`` text: an int, a list, an {r, inflection} or {flops, inflection} mapping (read as YAML), or a name
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
    raise TietaError(f"a merge schedule is low, high, a whole number r, a list of them, {{r: R, inflection: I}} or {{flops: F}}, "
                     f"got {text!r}")


def parse_number_or_name(text: str) -> Union[float, str]:
    """A number if the text reads as one, else the text (a named setting such as "paper")."""
    try:
        return float(text)
    except ValueError:
        return text


def parse_keep_rates(text: str) -> list:
    """``[0.617, 0.369, 0.137]`` text (read as YAML) as a list of numbers, e.g. SPViT's per-stage keep
    rates; anything else is refused in one sentence."""
    try:
        value = safe_yaml.loads(text)
    except yaml.YAMLError as error:
        raise TietaError(f"cannot read the keep rates {text!r}: {safe_yaml.describe(error)}") from None
    if not isinstance(value, list) or not all(isinstance(item, (int, float)) and not isinstance(item, bool)
                                              for item in value):
        raise TietaError(f"keep rates are a list of numbers such as [0.617,0.369,0.137], got {text!r}")
    return [float(item) for item in value]


def parse_layer_flag(text: str) -> list:
    """One block index, as the one-element list a ``layers`` setting holds (e.g. ``--fpet-layer 6``)."""
    try:
        return [int(text)]
    except ValueError:
        raise TietaError(f"a layer flag takes one block index, got {text!r}") from None


# what a DyT dispatcher's inactive tokens skip
DYT_VARIANTS = ("mlp", "attn", "attn_mlp", "layer")

# ToMe and PYRA share the merge schedule
SCHEDULE_FLAG = Flag("--schedule", "merge.schedule", parse_schedule_flag,
                     "merge schedule for tome/pyra/tofu: low, high, an int r, a list like [16,16,8], or "
                     "{flops: 0.4} for the schedule that reaches that FLOPs ratio (default low)")
