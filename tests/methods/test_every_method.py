"""What every token-reduction method promises, whichever it is: one test per property, run over the
registry's methods (``tieta.methods.registry``) with their tiny settings (``tests/registry_cases.py``),
so that a new method is held to them by its registry entry alone.

Pinned here, on the small random ViTs of ``tests/conftest.py``:

- ``model(x)`` is ``forward_head(forward_features(x))`` bit for bit, with prefix tokens (registers)
  and with size-weighted average pooling;
- it composes with LoRA and the adapter in either order: the same state-dict keys, the same logits
  with the same weights, and a training pass sends gradient to every LoRA up-projection and to the
  method's own weights (those of the first block holding any);
- ``copy.deepcopy`` and ``load_state_dict`` into a model patched the same way (other random weights)
  give the same logits bit for bit, and the keys it adds are its own (and LoRA's);
- a method with no parameters of its own (``Method.modules`` empty) adds none, and gives the same
  logits in training and in evaluation.

What a method pins beyond these (its reference's logits, token counts, FLOPs, objective) stays in
its own ``test_<method>.py``.
"""

from __future__ import annotations

import copy
import functools

import pytest
import torch
from torch import nn

import tieta
from tests.conftest import make_vit, randomise_parameters
from tests.registry_cases import acting_weights, attach
from tieta.methods import registry

REDUCERS = [name for name, method in registry.METHODS.items() if method.reduces_tokens]
# the methods with no parameters of their own (they declare no modules to hold any)
TRAINING_FREE = [name for name in REDUCERS if not registry.METHODS[name].modules]
# method name -> why it composes with LoRA alone, not with the adapter
NO_ADAPTER = {"dyt": "DyT brings its own adapter and refuses a second"}
# method name -> the ViT variants it refuses, with the reason
REFUSED_VARIANTS = {"diffrate": {"avg_pool": "it ranks tokens by the class token's attention, and there is none"}}
# the trainable words of the composed parameter-efficient methods, made trained-looking
PEFT_WEIGHTS = ("lora_B", "adapter.up")


def runs_on(method: str, variant: str) -> bool:
    """Whether the file runs ``method`` on ``variant`` (conftest leaves the other pairs out)."""
    return variant not in REFUSED_VARIANTS.get(method, {})


@functools.lru_cache(maxsize=None)
def _built_vit(variant: str, seed: int) -> nn.Module:
    return make_vit(variant, seed)


def vit(variant: str, seed: int = 0) -> nn.Module:
    """A fresh ``make_vit(variant, seed)``, copied from one built once (timm's initialisation is most
    of the time a test here would take)."""
    return copy.deepcopy(_built_vit(variant, seed))


def images(batch: int = 2, seed: int = 0) -> torch.Tensor:
    """A batch of random 32 px images."""
    return torch.randn(batch, 3, 32, 32, generator=torch.Generator().manual_seed(seed))


def with_peft(method: str, model: nn.Module, first: bool) -> nn.Module:
    """``model`` with LoRA (rank 2) and, where ``method`` takes it, the adapter (width 2): both added
    before ``method`` (``first``) or after it, in the order LoRA, adapter."""
    def peft(model: nn.Module) -> nn.Module:
        model = tieta.add_lora(model, rank=2)
        return model if method in NO_ADAPTER else tieta.add_adapter(model, dim=2)

    return attach(method, peft(model)) if first else peft(attach(method, model))


@pytest.mark.parametrize("method", REDUCERS)
@pytest.mark.parametrize("vit_variant", ["registers", "avg_pool"])
@torch.no_grad()
def test_forward_is_forward_head_of_forward_features(method, vit_variant):
    model = attach(method, vit(vit_variant))
    x = images()
    torch.testing.assert_close(model.forward_head(model.forward_features(x)), model(x), rtol=0, atol=0)


@pytest.mark.parametrize("method", REDUCERS)
@pytest.mark.parametrize("vit_variant", ["registers"])  # prefix tokens, and LayerScale beside the adapter
def test_composes_with_lora_and_adapter_in_either_order_and_trains(method, vit_variant):
    before = randomise_parameters(with_peft(method, vit(vit_variant), first=True), PEFT_WEIGHTS)
    after = with_peft(method, vit(vit_variant), first=False)
    after.load_state_dict(before.state_dict())  # strict: the same keys in either order
    x = images()
    with torch.no_grad():
        torch.testing.assert_close(after.eval()(x), before(x), rtol=0, atol=0)
    tieta.freeze_backbone(before).train()
    before(x).sum().backward()
    lora = [p.grad for name, p in before.named_parameters() if "lora_B" in name]
    assert lora and all(grad is not None and grad.abs().sum() > 0 for grad in lora)
    if acting_weights(method):  # its own parameters train too: all of those in the first block holding any
        own = {name: p.grad for name, p in before.named_parameters() if registry.parameter_group(name) == method}
        first = min(int(name.split(".")[1]) for name in own)
        grads = {name: grad for name, grad in own.items() if name.startswith(f"blocks.{first}.")}
        assert all(grad is not None and grad.abs().sum() > 0 for grad in grads.values()), sorted(grads)


@pytest.mark.parametrize("method", REDUCERS)
@pytest.mark.parametrize("vit_variant", ["registers"])  # prefix tokens, and LoRA's keys beside the method's
@torch.no_grad()
def test_deepcopy_and_state_dict_round_trip(method, vit_variant):
    model = randomise_parameters(tieta.add_lora(attach(method, vit(vit_variant)), rank=2), ("lora_B",))
    x = images()
    expected = model(x)
    torch.testing.assert_close(copy.deepcopy(model)(x), expected, rtol=0, atol=0)
    rebuilt = tieta.add_lora(attach(method, vit(vit_variant, seed=1), seed=1), rank=2).eval()  # other weights
    rebuilt.load_state_dict(model.state_dict())  # strict: the same keys
    torch.testing.assert_close(rebuilt(x), expected, rtol=0, atol=0)
    added = set(model.state_dict()) - set(_built_vit(vit_variant, 0).state_dict())
    own = {method, "lora", "adapter"} if method in NO_ADAPTER else {method, "lora"}  # (DyT's adapter: the adapter's)
    assert {registry.parameter_group(key) for key in added} <= own, sorted(added)


@pytest.mark.parametrize("method", TRAINING_FREE)
@pytest.mark.parametrize("vit_variant", ["layerscale"])
@torch.no_grad()
def test_a_training_free_method_adds_no_parameters_and_trains_as_it_evaluates(method, vit_variant):
    plain = _built_vit(vit_variant, 0)
    model = attach(method, vit(vit_variant))
    assert [name for name, _ in model.named_parameters()] == [name for name, _ in plain.named_parameters()]
    assert sum(p.numel() for p in model.parameters()) == sum(p.numel() for p in plain.parameters())
    x = images()
    evaluated = model.eval()(x)
    torch.testing.assert_close(model.train()(x), evaluated)


def test_the_cases_cover_the_registry():
    """Every token reducer is here, the training-free ones among them, and the exceptions name
    registered methods."""
    assert set(REDUCERS) >= {"tome", "pyra", "dyt", "tofu", "pitome", "dtem", "atc", "evit", "mctf"}
    assert set(TRAINING_FREE) >= {"tome", "evit", "tofu", "pitome", "mctf", "atc"}
    assert set(NO_ADAPTER) | set(REFUSED_VARIANTS) <= set(REDUCERS)
