"""DiffRate inside ``tieta train``: its config section, its objective and epoch hook (a search in
the first epochs, fixed kept numbers after), its facts and its settings' checks.

The search epochs' optimizer is a :class:`~tieta.methods.diffrate_search.RateSearch` made on the
first search batch and kept in the model's state (its run objects, never copied or saved) until
the numbers are fixed.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Optional

import torch
from torch import nn

from tieta import shard
from tieta.errors import TietaError
from tieta.methods.diffrate_counts import fix_rates, kept_numbers, mlp_token_counts
from tieta.methods.diffrate_search import RateSearch, search_lr_at
from tieta.methods.diffrate_step import CRITERIA, diffrate_steps
from tieta.methods.method import LossFn
from tieta.methods.state import keep_run_object, run_object
from tieta.ops.diffrate_rates import PUBLISHED_RATES


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

    def check(self, prefix: str = "diffrate.") -> None:
        """Raise a TietaError, in one sentence, for settings that cannot work (whatever the model).
        ``prefix`` names the fields as the user wrote them: the config section's, or nothing for
        add_diffrate's arguments."""
        if self.rates is not None and self.rates not in PUBLISHED_RATES:
            raise TietaError(f"{prefix}rates must be one of {', '.join(PUBLISHED_RATES)}, got {self.rates!r}")
        lists = self.kept_prune is not None or self.kept_merge is not None
        if self.rates is not None and lists:
            raise TietaError(f"set {prefix}rates or {prefix}kept_prune/kept_merge, not both")
        for name in ("kept_prune", "kept_merge"):
            value = getattr(self, name)
            if value is not None and not _is_count_list(value):
                raise TietaError(f"{prefix}{name} must be a list of whole numbers, one per block, got {value!r}")
        if (self.rates is not None or lists) and self.target_gmacs is not None:
            raise TietaError(f"set either DiffRate's kept numbers ({prefix}rates, kept_prune, kept_merge) or "
                             f"{prefix}target_gmacs to search for them, not both")
        whole = isinstance(self.granularity, int) and not isinstance(self.granularity, bool)
        checks = [
            (self.target_gmacs is None or self.target_gmacs > 0, f"{prefix}target_gmacs must be positive"),
            (whole and self.granularity >= 1, f"{prefix}granularity must be at least 1"),
            (self.criterion in CRITERIA, f"{prefix}criterion must be one of {', '.join(CRITERIA)}, "
                                         f"got {self.criterion!r}"),
            (self.search_epochs >= 1, f"{prefix}search_epochs must be at least 1"),
            (0 < self.search_min_lr <= self.search_lr, f"{prefix}search_lr and search_min_lr must be positive, "
                                                       "the minimum no larger"),
            (self.search_lr <= 10, f"{prefix}search_lr must be at most 10 (as every learning rate: optim.MAX_LR)"),
            (self.flops_weight >= 0, f"{prefix}flops_weight cannot be negative"),
        ]
        for ok, message in checks:
            if not ok:
                raise TietaError(message)


def _searching(model: nn.Module) -> bool:
    return any(step.searching for step in diffrate_steps(model))


def _search_of(model: nn.Module, settings: DiffRateConfig) -> RateSearch:
    """The run's search of ``model``, made on first use."""
    search = run_object(model, "diffrate")
    if search is None:
        search = RateSearch(model, settings.target_gmacs, settings.flops_weight, settings.search_lr)
        keep_run_object(model, "diffrate", search)
    return search


def objective(config: Any) -> LossFn:
    """The loss of a training step: the search's step in search epochs, else cross-entropy."""
    settings = config.diffrate

    def diffrate_step(model: nn.Module, images: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        if not (model.training and _searching(model)):
            return shard.cross_entropy(model(images), labels)
        loss, _ = _search_of(model, settings).step(model, images, labels)
        # the rate logits are stepped; a leaf without a graph lets the loop's own step change nothing
        return loss.requires_grad_()

    return diffrate_step


def epoch_update(model: nn.Module, config: Any, epoch: int, epochs: int) -> dict[str, Any]:
    """Before each epoch: the search's learning rate, or, once the search epochs are over, the fixed numbers."""
    settings = config.diffrate
    if not _searching(model):
        return {}
    if epoch < settings.search_epochs:
        lr = search_lr_at(epoch, settings.search_epochs, settings.search_lr, settings.search_min_lr)
        _search_of(model, settings).set_lr(lr)
        return {"diffrate_phase": "search", "diffrate_search_lr": lr}
    keep_run_object(model, "diffrate", None)
    prune, merge = fix_rates(model)
    return {"diffrate_phase": "fixed", "diffrate_kept_prune": prune, "diffrate_kept_merge": merge}


def describe(model: nn.Module) -> dict[str, Any]:
    prune, merge = kept_numbers(model)
    return {"diffrate_kept_prune": prune, "diffrate_kept_merge": merge, "mlp_token_counts": mlp_token_counts(model)}


def _is_count_list(value: Any) -> bool:
    return isinstance(value, list) and all(isinstance(v, int) and not isinstance(v, bool) for v in value)


def validate(config: Any) -> None:
    """The section's own checks, then what the run needs of a search."""
    settings = config.diffrate
    settings.check()
    fixed = settings.rates is not None or settings.kept_prune is not None or settings.kept_merge is not None
    if "diffrate" not in config.methods or fixed:
        return
    if settings.target_gmacs is None:
        raise TietaError("DiffRate needs kept numbers (diffrate.rates, or kept_prune/kept_merge) or a target "
                         "to search for them (diffrate.target_gmacs)")
    if settings.search_epochs >= config.optim.epochs:
        raise TietaError(f"the DiffRate search takes the first {settings.search_epochs} epochs; "
                         f"optim.epochs ({config.optim.epochs}) must leave at least one to fine-tune")


def one_process(config: Any) -> Optional[str]:
    if config.diffrate.target_gmacs is None:
        return None
    # the search steps its own optimizer inside the objective, on this process's gradients only
    return ("DiffRate's rate search runs in one process; search with tieta train alone, then train in parallel "
            "with the rates it found (diffrate.kept_prune, kept_merge)")
