"""The registry's methods, attached by their public verb to the small random ViTs of
``tests/conftest.py`` (32 px, patch 8, depth 3: 16 patch tokens), for the shared tests whose subject
is every method: a new method joins them by its registry entry alone."""

from __future__ import annotations

from typing import Any, Callable, Union

from torch import nn

import tieta
from tieta.methods import registry
from tests.conftest import randomise_parameters



def diffrate_counts(model: nn.Module) -> dict[str, Any]:
    """Fixed DiffRate rates (no search) for the model's token count: 17 on the plain small ViT."""
    tokens = model.patch_embed.num_patches + model.num_prefix_tokens
    return {"kept_prune": [tokens, tokens - 3, tokens - 5], "kept_merge": [tokens, tokens - 5, tokens - 7]}


# method name -> keyword settings of its add_ verb where its defaults do nothing on the small ViTs
# (or a function of the model giving them)
TINY_SETTINGS: dict[str, Union[dict[str, Any], Callable[[nn.Module], dict[str, Any]]]] = {
    "evit": {"keep_rate": 0.5},
    "dynamicvit": {"ratios": (0.7, 0.5), "locations": (1, 2)},
    "diffrate": diffrate_counts,
    "tofu": {"r": [3, 2, 1]},
    "pitome": {"ratio": 0.5},
    "mctf": {"r": 2},  # it always keeps 10 tokens: the default 16 fuses none of 17
    "dtem": {"r": 2},
    "atc": {"keep_rate": 0.5},
}
# method name -> the parameter-name words made trained-looking, where not its registry modules
# (DiffRate's rate logits are unused once its rates are fixed)
ACTING_WEIGHTS: dict[str, tuple[str, ...]] = {"diffrate": ()}


def add_verb(name: str):
    """The method's public attach verb, e.g. ``tieta.add_tofu``."""
    (verb,) = [verb for verb in registry.METHODS[name].verbs if verb.startswith("add_")]
    return getattr(tieta, verb)


def acting_weights(name: str) -> tuple[str, ...]:
    """Words naming the method's parameters that start at values which would do nothing."""
    return ACTING_WEIGHTS.get(name, tuple(registry.METHODS[name].modules))


def attach(name: str, model: nn.Module, seed: int = 0) -> nn.Module:
    """``model`` with the registry method ``name`` attached with its tiny settings and trained-looking
    weights, in eval mode."""
    settings = TINY_SETTINGS.get(name, {})
    model = add_verb(name)(model, **(settings(model) if callable(settings) else settings))
    return randomise_parameters(model, acting_weights(name), seed)


def names_besides(covered: set[str], excluded: dict[str, str]) -> list[str]:
    """The registry's method names, in its order, less those a test file covers by hand and those it
    excludes (each with its reason)."""
    unknown = (set(covered) | set(excluded) | set(TINY_SETTINGS) | set(ACTING_WEIGHTS)) - set(registry.names())
    assert not unknown, f"not registered methods: {sorted(unknown)}"
    return [name for name in registry.names() if name not in covered and name not in excluded]
