"""The one setting of a token-reduction method that trades cost for accuracy (its "knob"), so that
``tieta.measure.matched`` can find, for any method, the setting that reaches a given FLOPs ratio
without naming the method."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable


@dataclass(frozen=True)
class Knob:
    """One scalar that moves a method's cost monotonically.

    Attributes:
        key: the ``--set`` key it becomes (``section.field``).
        low, high: the scalar's range.
        cheaper: which end costs less: "low" or "high".
        to_value: scalar -> the config value (e.g. a geometric rho -> per-stage ratios).
        integer: the scalar moves in whole steps (a token count, a block index).
        doc: a few words on what the scalar is.
    """

    key: str
    low: float
    high: float
    cheaper: str
    to_value: Callable[[float], Any] = lambda x: x
    integer: bool = False
    doc: str = ""


def whole(x: float) -> int:
    """An integer knob's scalar as the config's count."""
    return int(round(x))


def geometric(stages: int) -> Callable[[float], list[float]]:
    """rho -> [rho, rho^2, ...]: keep rates that compound over ``stages`` pruning stages (as
    DynamicViT's "rho 0.517" baseline is built)."""
    return lambda rho: [rho ** (k + 1) for k in range(stages)]


def one_layer(x: float) -> list[int]:
    """A block index -> the one-element layer list of a single-merge method."""
    return [int(round(x))]


def flops_schedule(ratio: float) -> dict:
    """ToMe's schedule by the FLOPs ratio it reaches on the model it is attached to, in the PYRA
    paper's "high" shape ({flops, inflection -0.9}: more merges in the early blocks, each block's r
    capped at what its tokens allow): a constant r, or an r that is not capped, stops at about a
    third of the FLOPs on a ViT-S (the last blocks run out of tokens), while this form reaches the
    lowest cost the model's tokens allow (0.13 on ViT-S/16 at 224 px), in fine steps."""
    return {"flops": float(ratio), "inflection": -0.9}
