"""Settings at matched cost: for any token-reduction method that declares a knob
(``tieta.methods.knob.Knob``), the knob value whose evaluation FLOPs, as a share of the unmodified
model's, come closest to a target ratio.

The cost is the executed path of one evaluation forward pass on one seeded random image, counted by
``tieta.count_flops`` (deterministic, no timing). Where a method's path depends on what it learns
(DyT's dispatchers), its decisions are first set to those its training drives toward
(``Method.trained_decisions``: a share rho of the tokens active), so that the count follows the knob
as a trained model's would.
"""

from __future__ import annotations

import copy
import dataclasses
from types import SimpleNamespace
from typing import Any

import torch
from torch import nn

from tieta.errors import TietaError
from tieta.measure.flops import count_flops
from tieta.methods import registry

# bisection steps on a continuous knob: 2**-20 of its range, far below what a token count resolves
STEPS = 20


def settings_with(method: Any, key: str, value: Any) -> SimpleNamespace:
    """The method's config sections at their defaults, with ``key`` ("section.field") set to ``value``."""
    section_name, field_name = key.split(".", 1)
    sections = {name: section() for name, section in method.sections.items()}
    sections[section_name] = dataclasses.replace(sections[section_name], **{field_name: value})
    return SimpleNamespace(**sections)


def _images(img_size: int) -> torch.Tensor:
    generator = torch.Generator().manual_seed(0)
    return torch.randn(1, 3, img_size, img_size, generator=generator)  # (1, 3, H, W)


def flops_ratio(method_name: str, model: nn.Module, img_size: int, scalar: float) -> float:
    """FLOPs of ``model`` with the method attached at knob ``scalar``, over the unmodified model's."""
    return _reduced_flops(method_name, model, img_size, scalar) / count_flops(model, _images(img_size))["flops"]


def attached_at(method_name: str, model: nn.Module, scalar: float, images: torch.Tensor) -> nn.Module:
    """A copy of ``model`` with the method attached at knob ``scalar``; a method whose cost follows
    what it learns gets the decisions its training drives toward, on ``images`` (B, 3, H, W)
    (``Method.trained_decisions``)."""
    method = registry.methods()[method_name]
    config = settings_with(method, method.knob.key, method.knob.to_value(scalar))
    attached = method.attach(copy.deepcopy(model), config)
    if method.trained_decisions is not None:
        attached = method.trained_decisions(attached, images, config)
    return attached


def _reduced_flops(method_name: str, model: nn.Module, img_size: int, scalar: float) -> float:
    """FLOPs of ``model`` with the method attached at knob ``scalar`` (on a copy)."""
    images = _images(img_size)
    return count_flops(attached_at(method_name, model, scalar, images), images)["flops"]


def _valid_edge(knob: Any, measured: Any, bad: float, good: float) -> float:
    """The knob scalar nearest ``bad`` that the model accepts, given that ``good`` is accepted: a
    knob's declared range is for ViT-B-sized models, and a smaller one refuses an end of it (more
    tokens merged than it has, a block it lacks); bisect to the edge."""
    for _ in range(STEPS):
        if knob.integer and abs(good - bad) <= 1:
            break
        middle = round((bad + good) / 2) if knob.integer else (bad + good) / 2
        try:
            measured(middle)
            good = middle
        except TietaError:
            bad = middle
    return good


def _accepted(measured: Any, scalar: float) -> bool:
    try:
        measured(scalar)
        return True
    except TietaError:
        return False


def knob_of(method_name: str) -> Any:
    """The knob a method declares (``tieta.methods.knob.Knob``).

    Raises:
        TietaError: an unknown method, or one that declares no knob.
    """
    methods = registry.methods()
    if method_name not in methods:
        raise TietaError(f"unknown method {method_name!r}")
    knob = methods[method_name].knob
    if knob is None:
        raise TietaError(f"{method_name} declares no knob to match FLOPs with")
    return knob


def accepted_range(knob: Any, measured: Any) -> tuple[float, float]:
    """(cheapest, dearest) scalar of the knob's declared range that the model accepts, where
    ``measured(scalar)`` raises a TietaError for a setting the model refuses (the declared range is
    for ViT-B-sized models; a smaller one refuses an end of it)."""
    cheap, dear = (knob.low, knob.high) if knob.cheaper == "low" else (knob.high, knob.low)
    if not _accepted(measured, dear):
        dear = _valid_edge(knob, measured, dear, cheap)
    if not _accepted(measured, cheap):
        cheap = _valid_edge(knob, measured, cheap, dear)
    return cheap, dear


def setting_for_flops(method_name: str, model: nn.Module, img_size: int, ratio: float) -> tuple[Any, float]:
    """The knob value whose FLOPs ratio to the unmodified ``model`` is closest to ``ratio``.

    Args:
        method_name: a registry name of a method that declares a knob.
        model: the unmodified timm ViT (not changed: the method goes on a copy).
        img_size: the side of the square images it is counted on.
        ratio: the target share of the unmodified model's FLOPs, in (0, 1].

    Returns:
        (the config value for the knob's key, the FLOPs ratio it reaches).

    Raises:
        TietaError: the method has no knob, or the knob's range does not reach ``ratio`` (the
            sentence gives the nearest ratio it reaches).
    """
    knob = knob_of(method_name)
    at = {}
    base = count_flops(model, _images(img_size))["flops"]  # once: every step divides by it

    def measured(scalar: float) -> float:
        if scalar not in at:
            at[scalar] = _reduced_flops(method_name, model, img_size, scalar) / base
        return at[scalar]

    cheap, dear = accepted_range(knob, measured)
    lowest, highest = measured(cheap), measured(dear)
    if not lowest - 1e-9 <= ratio <= highest + 1e-9:
        nearest = lowest if ratio < lowest else highest
        raise TietaError(f"{method_name} cannot reach a FLOPs ratio of {ratio:g} with {knob.key}: "
                         f"its nearest is {nearest:.3f}")
    # invariant: ratio lies between measured(cheap) and measured(dear)
    for _ in range(STEPS):
        if knob.integer and abs(dear - cheap) <= 1:
            break
        middle = (cheap + dear) / 2
        if knob.integer:
            middle = round(middle)
        if measured(middle) <= ratio:
            cheap = middle
        else:
            dear = middle
    best = min((cheap, dear), key=lambda scalar: abs(measured(scalar) - ratio))
    return knob.to_value(best), measured(best)
