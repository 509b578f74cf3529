"""What a method declares about itself, so that training, config, CLI, reports and FLOP counting
can use it without naming it (see ``docs/adding-a-method.md``).

Each method module ends with one ``METHOD = Method.listed(catalog.<NAME>, ...)``: its name, summary
and flags come from ``tieta.methods.catalog`` (readable without torch, for ``--help``), its working
parts from the module; ``tieta.methods.registry`` lists them.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Callable, Optional

import torch
from torch import nn

from tieta.methods.catalog import Flag, Listing

# the run configuration, seen by a method through the sections it declared: ``config.<section>``
Settings = Any
# one training step's loss: (model, images (B, 3, H, W), labels (B,)) -> scalar
LossFn = Callable[[nn.Module, torch.Tensor, torch.Tensor], torch.Tensor]

# the largest width of new weights (a LoRA rank, an adapter's bottleneck): a small share of a ViT's
# width (768 in ViT-B, 6144 in ViT-22B); 4096 already adds gigabytes a block to a wide model
MAX_WIDTH = 4096
# the most experts of a mixture of adapters, each a whole adapter in every block
MAX_EXPERTS = 64


def bounded(default: int, at_most: int) -> Any:
    """A config field that sets a size of new weights: the run config's validation refuses a value
    above ``at_most`` by name, before anything is built."""
    return field(default=default, metadata={"at_most": at_most})


@dataclass(frozen=True)
class Method:
    """One method, as the rest of tieta sees it.

    Attributes:
        name: what ``--method`` calls it (joined with "+" to combine, e.g. "pyra+lora").
        summary: one line for listings.
        sections: config sections it reads: name -> dataclass; each field is a ``--set
            section.field`` key. Methods may share a section (ToMe and PYRA share "merge").
        attach: ``attach(model, config) -> model`` puts the method on a timm ViT, in place.
        modules: names of the submodules (or parameter-name prefixes) that hold its parameters;
            they form its parameter group (trained, counted and given an lr together).
        flags: command-line flags for its most used settings.
        objective: ``objective(config) -> LossFn`` if it trains with its own loss (one per run).
        epoch_update: ``epoch_update(model, config, epoch, epochs) -> {name: value}`` called before
            each training epoch for a per-epoch schedule (a temperature, a keep rate); the values
            are logged with the epoch's metrics.
        learning_rates: ``learning_rates(config) -> {group: lr}`` for its own groups' base lr.
        describe: ``describe(model) -> {name: value}`` facts for the run summary and ``tieta flops``
            (e.g. tokens per block), or None.
        measure: ``measure(model, images) -> {name: value}`` data-dependent facts measured on real
            evaluation images (e.g. DyT's share of active tokens), or None.
        data_dependent_cost: its FLOPs depend on the images (say so where one random image is counted).
        validate: ``validate(config)`` raises a TietaError for settings that cannot work.
        one_process: ``one_process(config) -> reason or None``: why this configuration's training
            cannot be data-parallel (``torchrun``), or None where it can.
    """

    name: str
    summary: str
    sections: dict[str, type]
    attach: Callable[[nn.Module, Settings], nn.Module]
    modules: tuple[str, ...] = ()
    flags: tuple[Flag, ...] = ()
    objective: Optional[Callable[[Settings], LossFn]] = None
    epoch_update: Optional[Callable[[nn.Module, Settings, int, int], dict[str, Any]]] = None
    learning_rates: Optional[Callable[[Settings], dict[str, float]]] = None
    describe: Optional[Callable[[nn.Module], dict[str, Any]]] = None
    measure: Optional[Callable[[nn.Module, torch.Tensor], dict[str, Any]]] = None
    data_dependent_cost: bool = False
    validate: Optional[Callable[[Settings], None]] = None
    one_process: Optional[Callable[[Settings], Optional[str]]] = None

    @classmethod
    def listed(cls, listing: Listing, **parts: Any) -> "Method":
        """The method the catalog lists (its name, summary and flags) with its working parts
        (``sections``, ``attach`` and the optional fields)."""
        return cls(name=listing.name, summary=listing.summary, flags=listing.flags, **parts)
