"""Patched models survive copying, pickling and state-dict transfer, with every method and combination.

Pinned here, on the small random ViTs of ``tests/conftest.py``:

- ``copy.deepcopy`` gives the same outputs (also right after a training pass, as timm's model does),
  and the copy is independent: changing its schedule, its parameters or running it does not touch
  the original (its per-pass states included);
- ``torch.save`` / ``torch.load(weights_only=False)`` gives the same outputs in the same process
  and in a fresh Python process that imports nothing but torch (one subprocess loads every model);
- ``load_state_dict(strict=True)`` into a model built the same way with other random weights gives
  the same outputs; a method without weights (ToMe) leaves timm's state-dict keys exactly as they were.
"""

from __future__ import annotations

import copy
import io
import subprocess
import sys
import textwrap
from typing import Callable

import pytest
import torch
from torch import nn

import tieta
from tests.conftest import VIT_VARIANTS, make_vit, randomise_parameters
from tests.registry_cases import acting_weights, attach, names_besides

MERGE_SCHEDULE = [3, 2, 1]
METHOD_WEIGHTS = ("lora_B", "adapter", "dispatcher", "pyra.token_weight")


def randomise(model: nn.Module, seed: int = 0) -> nn.Module:
    """Trained-looking method weights (see randomise_parameters); eval mode."""
    return randomise_parameters(model, METHOD_WEIGHTS, seed)


# method name -> attach it (or them, in this order) to a small ViT
METHODS: dict[str, Callable[[nn.Module], nn.Module]] = {
    "tome": lambda m: tieta.add_tome(m, r=MERGE_SCHEDULE),
    "pyra": lambda m: tieta.add_pyra(m, r=MERGE_SCHEDULE),
    "dyt_mlp": lambda m: tieta.add_dyt(m, variant="mlp", adapter_dim=4),
    "dyt_attn": lambda m: tieta.add_dyt(m, variant="attn", adapter_dim=4),
    "lora": lambda m: tieta.add_lora(m, rank=2),
    "adapter": lambda m: tieta.add_adapter(m, dim=2),
    "pyra+lora": lambda m: tieta.add_lora(tieta.add_pyra(m, r=MERGE_SCHEDULE), rank=2),
    "dyt+tome": lambda m: tieta.add_tome(tieta.add_dyt(m, variant="mlp", adapter_dim=4), r=MERGE_SCHEDULE),
}
MERGING = ("tome", "pyra", "pyra+lora", "dyt+tome")
# every other registered method, by its registry entry (tests/registry_cases.py), on the small
# ViT with registers only (the hand-written cases cover the other variants), to keep the file fast
COVERED_BY_HAND = {"tome", "pyra", "dyt", "lora", "adapter"}
EXCLUDED: dict[str, str] = {}  # method name -> why it is not among these cases
FROM_REGISTRY = names_besides(COVERED_BY_HAND, EXCLUDED)
REGISTRY_VARIANTS = ("registers",)
for _name in FROM_REGISTRY:
    METHODS[_name] = lambda m, name=_name: attach(name, m)


def runs_on(method: str, variant: str) -> bool:
    """Whether the file runs ``method`` on ``variant`` (conftest leaves the other pairs out)."""
    return method not in FROM_REGISTRY or variant in REGISTRY_VARIANTS

def build(method: str, variant: str, seed: int = 0) -> nn.Module:
    """A small ``variant`` ViT with ``method`` attached and acting, backbone and method weights from ``seed``."""
    if method in FROM_REGISTRY:
        if variant not in REGISTRY_VARIANTS:
            pytest.skip(f"{method} runs on the {', '.join(REGISTRY_VARIANTS)} ViT only")
        return randomise_parameters(METHODS[method](make_vit(variant, seed=seed)), acting_weights(method), seed)
    return randomise(METHODS[method](make_vit(variant, seed=seed)), seed=seed)


def images(batch: int, seed: int) -> torch.Tensor:
    """A batch of random 32 px images."""
    return torch.randn(batch, 3, 32, 32, generator=torch.Generator().manual_seed(seed))


@torch.no_grad()
def outputs(model: nn.Module) -> tuple[torch.Tensor, torch.Tensor]:
    """The model's logits on a batch of 2 and its features on a batch of 1."""
    return model(images(2, seed=0)), model.forward_features(images(1, seed=1))


def assert_same_outputs(got: nn.Module, expected: tuple[torch.Tensor, torch.Tensor]) -> None:
    """``got`` computes ``expected`` (as :func:`outputs` gives them)."""
    for actual, wanted in zip(outputs(got), expected):
        torch.testing.assert_close(actual, wanted, rtol=0, atol=1e-6)


@pytest.fixture(params=list(METHODS))
def method(request) -> str:
    return request.param


@pytest.fixture(params=["registers", "avg_pool"])
def some_variant(request) -> str:
    """Two variants for the independence checks: many prefix tokens, and size-weighted average pooling."""
    return request.param


def test_deepcopy_computes_the_same(vit_variant, method):
    model = build(method, vit_variant)
    assert_same_outputs(copy.deepcopy(model), outputs(model))


def test_deepcopy_after_a_training_pass_computes_the_same(some_variant, method):
    model = build(method, some_variant).train()
    model(images(2, seed=4)).sum().backward()  # per-pass states now hold tensors of the autograd graph
    model.eval()
    twin = copy.deepcopy(model)  # as an EMA copy or "keep the best model" does during training
    assert_same_outputs(twin, outputs(model))


def test_changing_a_deepcopy_parameter_leaves_the_original(some_variant, method):
    model = build(method, some_variant)
    expected = outputs(model)
    twin = copy.deepcopy(model)
    with torch.no_grad():
        twin.blocks[0].attn.qkv.weight.add_(1.0)
        for name, param in twin.named_parameters():
            if any(word in name for word in METHOD_WEIGHTS + (acting_weights(method) if method in FROM_REGISTRY else ())):
                param.add_(1.0)
    assert not torch.allclose(outputs(twin)[0], expected[0])
    assert_same_outputs(model, expected)


@pytest.mark.parametrize("method", MERGING)
def test_changing_a_deepcopy_schedule_leaves_the_original(some_variant, method):
    model = build(method, some_variant)
    expected = outputs(model)
    twin = copy.deepcopy(model)
    twin.token_schedule[0] = 1
    twin.blocks[0].reduce.r = 1
    assert outputs(twin)[1].shape[1] == outputs(model)[1].shape[1] + 2
    assert model.token_schedule == MERGE_SCHEDULE
    assert model.blocks[0].reduce.r == MERGE_SCHEDULE[0]
    assert_same_outputs(model, expected)


def test_deepcopy_has_its_own_pass_states(some_variant, method):
    model = build(method, some_variant)
    twin = copy.deepcopy(model)
    for name in ("token_state", "dispatch_state"):
        state = getattr(model, name, None)
        if state is None:
            continue
        twin_state = getattr(twin, name)
        assert twin_state is not state
        assert any(s is twin_state for s in twin.tieta_pass_states)
        assert not any(s is state for s in twin.tieta_pass_states)
        assert all(getattr(block, name) is twin_state for block in twin.blocks)


@torch.no_grad()
def test_running_a_deepcopy_between_features_and_head_leaves_the_original(some_variant, method):
    model = build(method, some_variant)
    x = images(2, seed=0)
    expected = model(x)
    twin = copy.deepcopy(model)
    features = model.forward_features(x)
    twin(images(2, seed=5))  # same batch size, other images: other token sizes and masks
    torch.testing.assert_close(model.forward_head(features), expected)


def test_torch_save_and_load_in_the_same_process(vit_variant, method):
    model = build(method, vit_variant)
    expected = outputs(model)
    buffer = io.BytesIO()
    torch.save(model, buffer)
    buffer.seek(0)
    loaded = torch.load(buffer, weights_only=False)
    assert type(loaded) is type(model)
    assert_same_outputs(loaded, expected)


FRESH_PROCESS = textwrap.dedent("""
    import sys
    import torch
    models = torch.load(sys.argv[1], weights_only=False)
    x = torch.load(sys.argv[2])
    with torch.no_grad():
        outputs = {name: (model(x), model.forward_features(x[:1])) for name, model in models.items()}
    torch.save(outputs, sys.argv[3])
""")


@pytest.fixture(scope="module")
def fresh_process_outputs(tmp_path_factory) -> dict[str, tuple]:
    """Save every (variant, method) model in one file, load and run them all in one fresh Python
    process that imports only torch; "variant/method" -> (outputs here, outputs there)."""
    root = tmp_path_factory.mktemp("fresh-process")
    x = images(2, seed=3)
    models = {f"{variant}/{method}": build(method, variant) for variant in VIT_VARIANTS for method in METHODS
              if method not in FROM_REGISTRY or variant in REGISTRY_VARIANTS}
    with torch.no_grad():
        expected = {name: (model(x), model.forward_features(x[:1])) for name, model in models.items()}
    torch.save(models, root / "models.pt")
    torch.save(x, root / "input.pt")
    done = subprocess.run([sys.executable, "-c", FRESH_PROCESS, "models.pt", "input.pt", "outputs.pt"],
                          capture_output=True, text=True, cwd=root, timeout=120)
    assert done.returncode == 0, done.stderr[-3000:]
    got = torch.load(root / "outputs.pt")
    return {name: (expected[name], got[name]) for name in models}


def test_torch_load_in_a_fresh_process_computes_the_same(fresh_process_outputs, vit_variant, method):
    if method in FROM_REGISTRY and vit_variant not in REGISTRY_VARIANTS:
        pytest.skip(f"{method} runs on the {', '.join(REGISTRY_VARIANTS)} ViT only")
    expected, got = fresh_process_outputs[f"{vit_variant}/{method}"]
    for actual, wanted in zip(got, expected):
        torch.testing.assert_close(actual, wanted, rtol=0, atol=1e-6)


def test_state_dict_loads_into_a_model_built_the_same_way(vit_variant, method):
    source = build(method, vit_variant, seed=0)
    target = build(method, vit_variant, seed=1)
    expected = outputs(source)
    assert not torch.allclose(outputs(target)[0], expected[0])
    target.load_state_dict(source.state_dict(), strict=True)
    assert_same_outputs(target, expected)


def test_tome_keeps_timm_state_dict_keys(vit_variant):
    timm_keys = list(make_vit(vit_variant).state_dict())
    model = tieta.add_tome(make_vit(vit_variant), r=MERGE_SCHEDULE)
    assert list(model.state_dict()) == timm_keys


def test_pyra_adds_only_its_own_state_dict_keys(vit_variant):
    timm_keys = list(make_vit(vit_variant).state_dict())
    added = set(tieta.add_pyra(make_vit(vit_variant), r=MERGE_SCHEDULE).state_dict()) - set(timm_keys)
    assert added and all(key.split(".")[2] == "pyra" for key in added)
