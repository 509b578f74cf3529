"""Every timm entry point of a patched ViT is right, whichever method is attached and in whatever
order and repetition the entry points are called.

Pinned here, on the small random ViTs of ``tests/conftest.py`` in evaluation under no_grad:

- ``model(x)`` is ``forward_head(forward_features(x))``, and a sequence of mixed entry points with
  different batch sizes gives what a fresh model gives (no stale token sizes, masks or decisions);
- DyT records exactly one mask per dispatcher per pass;
- ``forward_intermediates(..., output_fmt="NLC")`` returns the tokens as they are after merging,
  its final features are ``forward_features``; NCHW gives the full patch grid once tokens are merged
  and, without merging, equals timm's own; ``get_intermediate_layers`` works on a merging model.
"""

from __future__ import annotations

from typing import Callable

import pytest
import torch
from torch import nn

import tieta
from tests.conftest import make_vit, randomise_parameters
from tests.registry_cases import attach, names_besides
from tieta.methods import registry

MERGE_SCHEDULE = [3, 2, 1]
PATCH_TOKENS = 16  # 32 px images, 8 px patches
DEPTH = 3


# method name -> attach it (with acting weights) to a small ViT
METHODS: dict[str, Callable[[nn.Module], nn.Module]] = {
    "tome": lambda m: tieta.add_tome(m, r=MERGE_SCHEDULE).eval(),
    "pyra": lambda m: randomise_parameters(tieta.add_pyra(m, r=MERGE_SCHEDULE), ("pyra.token_weight",)),
    "dyt_mlp": lambda m: randomise_parameters(tieta.add_dyt(m, variant="mlp", adapter_dim=4), ("adapter", "dispatcher")),
    "dyt_attn": lambda m: randomise_parameters(tieta.add_dyt(m, variant="attn", adapter_dim=4), ("adapter", "dispatcher")),
    "lora": lambda m: randomise_parameters(tieta.add_lora(m, rank=2), ("lora_B",)),
    "adapter": lambda m: randomise_parameters(tieta.add_adapter(m, dim=2), ("adapter.up",)),
}
MERGING = ("tome", "pyra")
DYT = ("dyt_mlp", "dyt_attn")
# every other registered method, by its registry entry (tests/registry_cases.py); its patch tokens
# after each block are counted on the blocks' outputs
COVERED_BY_HAND = {"tome", "pyra", "dyt", "lora", "adapter"}
EXCLUDED: dict[str, str] = {}  # method name -> why it is not among these cases
FROM_REGISTRY = names_besides(COVERED_BY_HAND, EXCLUDED)
for _name in FROM_REGISTRY:
    METHODS[_name] = lambda m, name=_name: attach(name, m)
# they run on the plain small ViT only, to keep the file fast (the hand-written cases cover the variants)
REGISTRY_VARIANTS = ("plain",)
REDUCING_FROM_REGISTRY = tuple(name for name in FROM_REGISTRY if registry.METHODS[name].reduces_tokens)


def runs_on(method: str, variant: str) -> bool:
    """Whether the file runs ``method`` on ``variant`` (conftest leaves the other pairs out)."""
    return method not in FROM_REGISTRY or variant in REGISTRY_VARIANTS

def build(method: str, variant: str) -> nn.Module:
    """A fresh small ``variant`` ViT with ``method`` attached, in eval mode (deterministic)."""
    if method in FROM_REGISTRY and variant not in REGISTRY_VARIANTS:
        pytest.skip(f"{method} runs on the {', '.join(REGISTRY_VARIANTS)} ViT only")
    return METHODS[method](make_vit(variant))


def images(batch: int, seed: int) -> torch.Tensor:
    """A batch of random 32 px images."""
    return torch.randn(batch, 3, 32, 32, generator=torch.Generator().manual_seed(seed))


@torch.no_grad()
def counted_patch_tokens(method: str, variant: str) -> list[int]:
    """Tokens leaving each block of a fresh model in one forward pass, less its prefix tokens."""
    model, counts = build(method, variant), []
    for block in model.blocks:
        block.register_forward_hook(lambda m, args, out: counts.append(out.shape[1] - model.num_prefix_tokens))
    model(images(2, seed=0))
    return counts


def patch_tokens_after_each_block(method: str, variant: str = "plain") -> list[int]:
    """Patch tokens leaving each block: 16 minus the tokens merged so far (prefix tokens are never merged)."""
    if method in FROM_REGISTRY:
        return counted_patch_tokens(method, variant)
    if method not in MERGING:
        return [PATCH_TOKENS] * DEPTH
    counts, left = [], PATCH_TOKENS
    for r in MERGE_SCHEDULE:
        left -= r
        counts.append(left)
    return counts


@pytest.fixture(params=list(METHODS))
def method(request) -> str:
    return request.param


@torch.no_grad()
def test_forward_is_forward_head_of_forward_features(vit_variant, method):
    model = build(method, vit_variant)
    x = images(2, seed=0)
    logits = model(x)
    torch.testing.assert_close(model.forward_head(model.forward_features(x)), logits)


@torch.no_grad()
def test_mixed_entry_points_and_batch_sizes_give_what_a_fresh_model_gives(vit_variant, method):
    x, x2 = images(2, seed=0), images(3, seed=1)
    fresh = build(method, vit_variant)
    expected_logits, expected_features2 = fresh(x), build(method, vit_variant).forward_features(x2)

    model = build(method, vit_variant)
    first = model(x)
    head_of_features = model.forward_head(model.forward_features(x))
    second = model(x)
    final, _ = model.forward_intermediates(x, output_fmt="NLC")
    features2 = model.forward_features(x2)
    (early,) = model.forward_intermediates(x2, indices=[0], stop_early=True, output_fmt="NLC", intermediates_only=True)
    third = model(x)

    torch.testing.assert_close(first, expected_logits)
    for logits in (head_of_features, second, third):
        torch.testing.assert_close(logits, first)
    torch.testing.assert_close(final, fresh.forward_features(x))
    torch.testing.assert_close(features2, expected_features2)
    assert early.shape == (3, patch_tokens_after_each_block(method, vit_variant)[0], model.embed_dim)


@torch.no_grad()
def test_repeating_an_entry_point_is_bit_identical(vit_variant, method):
    model = build(method, vit_variant)
    x = images(2, seed=0)
    assert torch.equal(model(x), model(x))
    assert torch.equal(model.forward_features(x), model.forward_features(x))


@pytest.mark.parametrize("method", DYT)
@torch.no_grad()
def test_dyt_keeps_one_mask_per_dispatcher_per_pass(vit_variant, method):
    model = build(method, vit_variant)
    x = images(2, seed=0)
    for entry_point in (model.forward_features, model.forward_features, model,
                        lambda x: model.forward_intermediates(x, output_fmt="NLC"),
                        lambda x: model.get_intermediate_layers(x, n=1)):
        entry_point(x)
        masks = model.dispatch_state.masks
        assert len(masks) == DEPTH
        assert all(mask.shape == (2, PATCH_TOKENS) for mask in masks)


@torch.no_grad()
def test_nlc_intermediates_hold_the_tokens_after_merging(vit_variant, method):
    model = build(method, vit_variant)
    x = images(2, seed=0)
    final, intermediates = model.forward_intermediates(x, output_fmt="NLC", return_prefix_tokens=True)
    prefix = model.num_prefix_tokens
    if prefix:  # timm pairs each intermediate with its prefix tokens, and returns bare tensors without any
        assert all(tokens.shape == (2, prefix, model.embed_dim) for _, tokens in intermediates)
        intermediates = [patches for patches, _ in intermediates]
    assert [patches.shape[1] for patches in intermediates] == patch_tokens_after_each_block(method, vit_variant)
    assert final.shape[1] == prefix + patch_tokens_after_each_block(method, vit_variant)[-1]
    torch.testing.assert_close(final, model.forward_features(x))


@pytest.mark.parametrize("method", MERGING + REDUCING_FROM_REGISTRY)
@torch.no_grad()
def test_nchw_intermediates_after_merging_are_the_full_grid(vit_variant, method):
    """Once refused, NCHW now puts merged and pruned tokens back on the patch grid
    (tieta.methods.restore; its values are pinned in test_dense_restore.py)."""
    model = build(method, vit_variant)
    final, intermediates = model.forward_intermediates(images(2, seed=0))
    assert [grid.shape for grid in intermediates] == [(2, model.embed_dim, 4, 4)] * DEPTH
    assert final.shape == (2, model.num_prefix_tokens + PATCH_TOKENS, model.embed_dim)


@torch.no_grad()
def test_nchw_intermediates_without_merging_equal_timm(vit_variant):
    timm_model = make_vit(vit_variant)
    model = tieta.add_lora(make_vit(vit_variant), rank=2).eval()  # fresh LoRA: the same function as timm's
    x = images(2, seed=0)
    expected_final, expected = timm_model.forward_intermediates(x)
    final, intermediates = model.forward_intermediates(x)
    torch.testing.assert_close(final, expected_final, rtol=0, atol=0)
    assert len(intermediates) == len(expected)
    for got, want in zip(intermediates, expected):
        assert got.shape == want.shape == (2, model.embed_dim, 4, 4)
        torch.testing.assert_close(got, want, rtol=0, atol=0)


@pytest.mark.parametrize("method", [name for name in METHODS if name not in MERGING + REDUCING_FROM_REGISTRY])
@torch.no_grad()
def test_nchw_intermediates_are_the_nlc_grid_without_merging(vit_variant, method):
    model = build(method, vit_variant)
    x = images(2, seed=0)
    _, nchw = model.forward_intermediates(x)
    _, nlc = model.forward_intermediates(x, output_fmt="NLC")
    for grid, tokens in zip(nchw, nlc):
        torch.testing.assert_close(grid, tokens.transpose(1, 2).reshape(grid.shape))


@torch.no_grad()
def test_get_intermediate_layers_gives_the_last_block_tokens(vit_variant, method):
    model = build(method, vit_variant)
    x = images(2, seed=0)
    (last,) = model.get_intermediate_layers(x, n=1)
    _, intermediates = model.forward_intermediates(x, output_fmt="NLC")
    assert last.shape == (2, patch_tokens_after_each_block(method, vit_variant)[-1], model.embed_dim)
    torch.testing.assert_close(last, intermediates[-1])


def test_average_pool_head_refuses_features_of_another_pass():
    """Size-weighted pooling belongs to the pass that made the features: another pass's features
    are refused with one sentence instead of being pooled with the wrong sizes."""
    model = tieta.add_tome(make_vit("avg_pool"), r=[3, 2, 1])
    x, y = torch.randn(2, 3, 32, 32), torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        features = model.forward_features(x)
        expected = model.forward_head(features)
        model.forward_features(y)
        with pytest.raises(tieta.TietaError, match="forward_head"):
            model.forward_head(features)
        final, _ = model.forward_intermediates(x, output_fmt="NLC")
        torch.testing.assert_close(model.forward_head(final), expected)
