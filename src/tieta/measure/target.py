"""A speed or cost budget, as users state it: ``speedup=2``, ``latency=5ms``, ``throughput=800`` or
``gmacs=8.8``, read by ``tieta plan --target`` and ``tieta report --budget``.

Each form names one measured quantity and which side of its value meets it:

- ``speedup=S``: the median of the per-round throughput ratios to the unmodified model (or, in a
  report, to its first run), timed side by side, is at least S;
- ``latency=L`` (ms, or with a ``ms``/``s`` unit): one forward pass of the batch takes at most L
  milliseconds (median over rounds; at batch 1, the latency of one image);
- ``throughput=T`` (images per second, ``img/s`` optional): at least T images per second;
- ``gmacs=G``: at most G multiply-accumulates / 1e9 per image (counted, not timed).
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass
from typing import Any, Mapping

from tieta.errors import TietaError

# kind -> (the measured quantity's key, whether higher values meet it, its unit)
KINDS = {
    "speedup": ("speedup", True, "x"),
    "latency": ("latency_ms", False, "ms"),
    "throughput": ("images_per_s", True, "img/s"),
    "gmacs": ("gmacs", False, "GMACs"),
}
# unit suffixes each kind accepts, with what they multiply the number by
UNITS = {
    "speedup": {"": 1.0, "x": 1.0},
    "latency": {"": 1.0, "ms": 1.0, "s": 1000.0},
    "throughput": {"": 1.0, "img/s": 1.0},
    "gmacs": {"": 1.0},
}
FORMS = "speedup=2, latency=5ms, throughput=800 or gmacs=8.8"
_NUMBER = re.compile(r"^\s*([0-9]*\.?[0-9]+(?:[eE][-+]?[0-9]+)?)\s*([a-z/]*)\s*$")


@dataclass(frozen=True)
class Target:
    """One budget.

    Attributes:
        kind: "speedup", "latency", "throughput" or "gmacs".
        value: the number it names, in the kind's unit (x, ms per batch, images/s, GMACs per image).
    """

    kind: str
    value: float

    @property
    def key(self) -> str:
        """The measured quantity it reads: speedup, latency_ms, images_per_s or gmacs."""
        return KINDS[self.kind][0]

    @property
    def higher_meets(self) -> bool:
        return KINDS[self.kind][1]

    @property
    def timed(self) -> bool:
        """Whether it needs a timing (all but GMACs, which are counted)."""
        return self.kind != "gmacs"

    def met(self, measured: Mapping[str, Any]) -> bool:
        """Whether ``measured[self.key]`` meets it (False where it is missing)."""
        found = measured.get(self.key)
        if not isinstance(found, (int, float)) or isinstance(found, bool):
            return False
        return found >= self.value if self.higher_meets else found <= self.value

    def text(self, unit: str = "image") -> str:
        """The budget in words, e.g. "a speedup of 2x", "a latency of 5 ms"; ``unit``: what one input
        is ("image", or "clip" for video runs: "a throughput of 20 clips/s")."""
        return {"speedup": f"a speedup of {self.value:g}x", "latency": f"a latency of {self.value:g} ms",
                "throughput": f"a throughput of {self.value:g} {rate_unit(unit)}",
                "gmacs": f"{self.value:g} GMACs" + (" per clip" if unit == "clip" else "")}[self.kind]

    def flag(self) -> str:
        """The budget as it is written on the command line, e.g. "speedup=2"."""
        unit = {"latency": "ms"}.get(self.kind, "")
        return f"{self.kind}={self.value:.12g}{unit}"


def rate_unit(unit: str = "image") -> str:
    """Throughput's unit for inputs of ``unit`` ("image", or "clip" for video runs): "img/s" or
    "clips/s"."""
    return "clips/s" if unit == "clip" else "img/s"


def parse_target(text: str) -> Target:
    """``speedup=2`` | ``latency=5ms`` | ``throughput=800`` | ``gmacs=8.8`` as a :class:`Target`.

    Raises:
        TietaError: any other form, or a number that is not positive and finite (one sentence).
    """
    if not isinstance(text, str) or text.count("=") != 1:
        raise TietaError(f"a target is {FORMS}, got {text!r}")
    kind, number = (part.strip() for part in text.split("="))
    kind = kind.lower()
    if kind not in KINDS:
        raise TietaError(f"a target is {FORMS}; {kind!r} is none of speedup, latency, throughput, gmacs")
    found = _NUMBER.match(number.lower())
    if found is None or found.group(2) not in UNITS[kind]:
        units = [unit for unit in UNITS[kind] if unit]
        said = f" (units: {', '.join(units)})" if units else ""
        raise TietaError(f"the {kind} target should be a positive number{said}, got {number!r}")
    value = float(found.group(1)) * UNITS[kind][found.group(2)]
    if not math.isfinite(value) or value <= 0:
        raise TietaError(f"the {kind} target should be a positive number, got {number!r}")
    return Target(kind, value)
