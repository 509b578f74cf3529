"""What a method declares about itself, so that training, config, CLI, reports and FLOP counting
can use it without naming it (see ``docs/adding-a-method.md``).

Each method module ends with one ``METHOD = Method(name=..., ...)`` that holds its working parts;
its entry in ``tieta.methods.registry`` (readable without torch, for ``--help``) names the module
and gives the summary, flags and public verbs, which the registry adds to the ``Method`` it serves.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Callable, ContextManager, Optional

import torch
from torch import nn

from tieta.methods.catalog import Flag
from tieta.methods.knob import Knob

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


@dataclass(frozen=True, kw_only=True)
class Method:
    """One method, as the rest of tieta sees it.

    The module declares the working parts; ``summary``, ``flags`` and ``verbs`` come from its
    registry entry (``tieta.methods.registry.Entry``), which the registry fills in.

    Attributes:
        name: what ``--method`` calls it (joined with "+" to combine, e.g. "pyra+lora"); the same
            as its registry entry's.
        summary: one line for listings (from the entry).
        sections: config sections it reads: name -> dataclass; each field is a ``--set
            section.field`` key. Methods may share a section (ToMe and PYRA share "merge").
        attach: ``attach(model, config) -> model`` puts the method on a timm ViT, in place.
        modules: names of the submodules (or parameter-name prefixes) that hold its parameters;
            they form its parameter group (trained, counted and given an lr together).
        flags: command-line flags for its most used settings (from the entry).
        verbs: its public Python names that ``tieta`` re-exports (from the entry).
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
        reduces_tokens: it lowers the number of tokens some of the model's modules work on (merging,
            pruning, skipping), so a trained run costs fewer GMACs than the unmodified model (which
            ``tests/train/test_registry_methods.py`` checks for every such method).
        knob: the one scalar that moves its cost monotonically (``tieta.methods.knob.Knob``), for
            matching FLOPs across methods; None where it has none.
        trained_decisions: ``trained_decisions(model, images, config) -> model`` sets, on an untrained
            model, the token decisions its training drives toward at ``config`` (DyT: each dispatcher
            calibrated so that a share rho of the tokens of ``images`` is active), so that the cost of a
            trained model can be counted and timed before training; None where the cost follows from
            the settings alone.
        validate: ``validate(config)`` raises a TietaError for settings that cannot work.
        one_process: ``one_process(config) -> reason or None``: why this configuration's training
            cannot be data-parallel (``torchrun``), or None where it can.

    What deploy and the pictures ask of a model. Each of these takes any model and does nothing
    (or answers no) where the method is not attached, so that deploy can ask every method:

        prepare_export: ``prepare_export(model)`` readies a trained model for a fixed graph
            (``tieta export --onnx``), changing nothing it computes in evaluation (DiffRate fixes
            its searched rates at the numbers they give).
        check_traceable: ``check_traceable(model)`` raises a TietaError, in one sentence, where the
            model as it stands cannot become a fixed graph (DiffRate while a search is not ended).
        traceable_form: ``traceable_form(model)`` -> a context manager in which the model runs in
            a form that exports to ONNX (DyT's masked attention dispatch, said with a warning).
        data_dependent_shapes: ``data_dependent_shapes(model) -> bool``: its evaluation has shapes
            that depend on the data (DyT's real skipping), which ``torch.compile`` must capture.
        shows_merges: ``tieta show-merges`` can paint its token merges (it merges through the
            block's shared token state, which traces each final token's patches).
        token_masks: ``token_masks(model, images) -> [(B, N) bool, ...]``: the tokens each of its
            token decisions keeps working on, over the patches (``tieta show-tokens``); None where
            it has no token decisions to show.
        picture_note: ``picture_note(config) -> str``: a few words on its settings for a picture's
            caption (DyT's dispatch variant), or None.
        dense_loss: ``dense_loss(model) -> tensor or None``: its own term of a dense task's loss,
            read from the training pass just run (DyT's token rate, as its segmentation code adds
            it); None where the method is not attached (``tieta.dense.model.segmentation_step``).
    """

    name: str
    summary: str = ""
    sections: dict[str, type]
    attach: Callable[[nn.Module, Settings], nn.Module]
    modules: tuple[str, ...] = ()
    flags: tuple[Flag, ...] = ()
    verbs: tuple[str, ...] = ()
    objective: Optional[Callable[[Settings], LossFn]] = None
    epoch_update: Optional[Callable[[nn.Module, Settings, int, int], dict[str, Any]]] = None
    learning_rates: Optional[Callable[[Settings], dict[str, float]]] = None
    describe: Optional[Callable[[nn.Module], dict[str, Any]]] = None
    measure: Optional[Callable[[nn.Module, torch.Tensor], dict[str, Any]]] = None
    data_dependent_cost: bool = False
    reduces_tokens: bool = False
    knob: Optional[Knob] = None
    trained_decisions: Optional[Callable[[nn.Module, torch.Tensor, Settings], nn.Module]] = None
    validate: Optional[Callable[[Settings], None]] = None
    one_process: Optional[Callable[[Settings], Optional[str]]] = None
    prepare_export: Optional[Callable[[nn.Module], None]] = None
    check_traceable: Optional[Callable[[nn.Module], None]] = None
    traceable_form: Optional[Callable[[nn.Module], ContextManager[None]]] = None
    data_dependent_shapes: Optional[Callable[[nn.Module], bool]] = None
    shows_merges: bool = False
    token_masks: Optional[Callable[[nn.Module, torch.Tensor], list[torch.Tensor]]] = None
    picture_note: Optional[Callable[[Settings], str]] = None
    dense_loss: Optional[Callable[[nn.Module], Optional[torch.Tensor]]] = None
