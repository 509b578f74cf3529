"""Dense outputs of merged and pruned models (``tieta.methods.restore``): forward_intermediates in NCHW
puts every token-reduction method's tokens back on the full patch grid.

Pinned here, on the small random ViTs of ``tests/conftest.py`` (32 px, patch 8: a 4 x 4 grid):

- ToMe / PYRA: the restored grids equal a slow transcription of ToMe's own ``unmerge`` (its
  ``tome/merge.py``), composed from each block back to the input;
- a method that keeps every token gives exactly timm's own forward_intermediates;
- pruning methods: a dropped position holds the value its token had at the step that dropped it,
  found by a hook-based slow check that follows each token by its value;
- DyT's real skipping gives the masked form's grids;
- every registered token-reduction method gives (B, C, H, W) grids on every small ViT variant;
- nothing is recorded outside such a call (FLOPs of the plain forward unchanged), and a reduction
  that does not report where its tokens go is refused with one sentence.
"""

from __future__ import annotations

import pytest
import torch
from torch import nn

import tieta
import tieta.methods.tome as tome_module
from tests.conftest import make_vit, randomise_parameters
from tests.registry_cases import attach
from tieta.measure.flops import count_flops
from tieta.methods import registry
from tieta.methods.blocks import token_state_of

GRID = 4  # 32 px images, 8 px patches


def images(batch: int = 2, seed: int = 0) -> torch.Tensor:
    return torch.randn(batch, 3, 32, 32, generator=torch.Generator().manual_seed(seed))


def flat(grid: torch.Tensor) -> torch.Tensor:
    """(B, C, H, W) -> (B, H * W, C)."""
    return grid.flatten(2).transpose(1, 2)


def tome_unmerge(matching, x: torch.Tensor, tokens: int) -> torch.Tensor:
    """ToMe's ``unmerge`` (facebookresearch/ToMe, tome/merge.py), transcribed for tieta's Matching rows
    and written slowly, image by image: the kept tokens go back to their rows, each merged-away
    source takes its destination's value.

    Args: x: (B, N - r, C) tokens after the merge; tokens: N. Returns: (B, N, C).
    """
    batch, kept, channels = x.shape
    out = torch.zeros(batch, tokens, channels, dtype=x.dtype)
    kept_rows = matching.kept_rows.view(batch, kept)
    sources = matching.source_rows.view(batch, -1)
    destinations = matching.destination_rows.view(batch, -1)
    for image in range(batch):
        for place in range(kept):  # out.scatter_(index=unm_idx and the dst rows, src=unm and dst)
            out[image, kept_rows[image, place] - image * tokens] = x[image, place]
        for source, destination in zip(sources[image], destinations[image]):  # src = dst.gather(dst_idx)
            out[image, source - image * tokens] = x[image, destination - image * kept]
    return out


@pytest.mark.parametrize("variant", ["plain", "registers", "distilled"])
@pytest.mark.parametrize("method", ["tome", "pyra"])
@torch.no_grad()
def test_merged_grids_equal_tomes_unmerge_composed_over_blocks(monkeypatch, method, variant):
    model = getattr(tieta, f"add_{method}")(make_vit(variant), r=[3, 2, 1])
    model = randomise_parameters(model, ("pyra.token_weight",))
    matchings, outputs = [], []

    original = tome_module.bipartite_soft_matching

    def recording(*args, **kwargs):
        matchings.append(original(*args, **kwargs))
        return matchings[-1]

    monkeypatch.setattr(tome_module, "bipartite_soft_matching", recording)
    for block in model.blocks:
        block.register_forward_hook(lambda module, inputs, out: outputs.append(out))
    final, grids = model.forward_intermediates(images())

    prefix = model.num_prefix_tokens
    counts = [prefix + GRID * GRID]
    for matching in matchings:
        counts.append(counts[-1] - matching.r)
    assert len(matchings) == len(outputs) == 3
    for index, grid in enumerate(grids):
        x = outputs[index]
        for block in reversed(range(index + 1)):  # back to the input, one merge at a time
            x = tome_unmerge(matchings[block], x, counts[block])
        torch.testing.assert_close(flat(grid), x[:, prefix:], rtol=0, atol=0)
    x = model.norm(outputs[-1])
    for block in reversed(range(3)):
        x = tome_unmerge(matchings[block], x, counts[block])
    torch.testing.assert_close(final, x, rtol=0, atol=0)


# keep-all settings of methods that reduce tokens: the restore runs and must change nothing
KEEP_ALL = {
    "evit": lambda m: tieta.add_evit(m, keep_rate=1.0),
    "dynamicvit": lambda m: tieta.add_dynamicvit(m, ratios=(1.0,), locations=(1,)),
}


@pytest.mark.parametrize("norm", [False, True])
@pytest.mark.parametrize("variant", ["plain", "registers", "distilled", "avg_pool"])
@pytest.mark.parametrize("method", list(KEEP_ALL))
@torch.no_grad()
def test_keeping_every_token_gives_timms_own_intermediates(method, variant, norm):
    timm_model = make_vit(variant)
    model = KEEP_ALL[method](make_vit(variant)).eval()
    assert token_state_of(model) is not None and model.tieta_state.reduction is not None  # the restore path runs
    x = images()
    expected_final, expected = timm_model.forward_intermediates(x, norm=norm)
    final, grids = model.forward_intermediates(x, norm=norm)
    # EViT skips a step that keeps everything: bit for bit; DynamicViT still gathers the tokens it
    # keeps (all, in order), and attention on the gathered copy may round differently
    exact = dict(rtol=0, atol=0) if method == "evit" else {}
    torch.testing.assert_close(final, expected_final, **exact)
    assert len(grids) == len(expected)
    for got, want in zip(grids, expected):
        torch.testing.assert_close(got, want, **exact)


def pruned_counts(model: nn.Module) -> list[int]:
    """DiffRate's kept numbers per block that prune 4, then 3 more tokens (its merges left out)."""
    tokens = model.patch_embed.num_patches + model.num_prefix_tokens
    return [tokens, tokens - 4, tokens - 7]


# pruning methods: settings whose steps only gather tokens (and append a fused one), so a kept token's
# value passes through its step unchanged and a slow check can follow it by value
PRUNING = {
    "evit": lambda m: tieta.add_evit(m, keep_rate=0.5),
    "evit_unfused": lambda m: tieta.add_evit(m, keep_rate=0.5, fuse=False),
    "dynamicvit": lambda m: attach("dynamicvit", m),
    "diffrate": lambda m: tieta.add_diffrate(m, kept_prune=pruned_counts(m), kept_merge=pruned_counts(m)),
    "spvit": lambda m: attach("spvit", m),
    "tofu_prune": lambda m: tieta.add_tofu(m, r=[3, 2, 0]),
}


def slow_pruned_grid(steps: list[tuple[torch.Tensor, torch.Tensor]], outputs: list[torch.Tensor], prefix: int,
                     block: int) -> torch.Tensor:
    """The grid after ``block``, following each position's token by value through the steps.

    Args: steps: (block index, tokens entering the step, tokens it returned) per reduction step;
        outputs: each block's output. Returns: (B, P, C).
    """
    batch, _, channels = outputs[0].shape
    grid = torch.zeros(batch, GRID * GRID, channels)
    for image in range(batch):
        for position in range(GRID * GRID):
            place, dropped = prefix + position, None
            for index, entering, returned in steps:
                if index > block:
                    break
                token = entering[image, place]
                matches = (returned[image] == token).all(dim=-1).nonzero().flatten()
                if len(matches) == 0:
                    dropped = token
                    break
                place = int(matches[0])
            grid[image, position] = dropped if dropped is not None else outputs[block][image, place]
    return grid


@pytest.mark.parametrize("variant", ["plain", "registers"])
@pytest.mark.parametrize("method", list(PRUNING))
@torch.no_grad()
def test_a_pruned_position_keeps_its_value_from_the_step_that_dropped_it(method, variant):
    model = randomise_parameters(PRUNING[method](make_vit(variant)), ())
    steps, outputs = [], []
    for index, block in enumerate(model.blocks):
        for slot in (block.select, block.reduce):
            slot.register_forward_hook(lambda module, inputs, out, index=index: steps.append((index, inputs[0], out)))
        block.register_forward_hook(lambda module, inputs, out: outputs.append(out))
    _, grids = model.forward_intermediates(images())
    prefix = model.num_prefix_tokens
    for index, grid in enumerate(grids):
        expected = slow_pruned_grid(steps, outputs, prefix, index)
        torch.testing.assert_close(flat(grid), expected, rtol=0, atol=0)
    assert outputs[-1].shape[1] < prefix + GRID * GRID  # tokens were dropped


@pytest.mark.parametrize("variant", ["plain", "registers"])
@pytest.mark.parametrize("dyt_variant", ["mlp", "attn", "layer"])
@torch.no_grad()
def test_dyt_real_skipping_gives_the_masked_grids(dyt_variant, variant):
    model = randomise_parameters(tieta.add_dyt(make_vit(variant), variant=dyt_variant, adapter_dim=4),
                                 ("adapter", "dispatcher"))
    x = images()
    final, grids = model.forward_intermediates(x, norm=True)
    assert model.dispatch_state.real_skip
    model.dispatch_state.real_skip = False
    masked_final, masked = model.forward_intermediates(x, norm=True)
    torch.testing.assert_close(final, masked_final)
    for real, form in zip(grids, masked):
        assert real.shape == (2, model.embed_dim, GRID, GRID)
        torch.testing.assert_close(real, form)


REDUCING = [name for name in registry.names() if registry.METHODS[name].reduces_tokens]


# the variants that change the prefix tokens or the head (LayerScale and q/k norm act inside the blocks,
# which tests/methods/test_entry_points.py runs every method on)
PREFIX_VARIANTS = ["plain", "registers", "distilled", "avg_pool"]


@pytest.mark.parametrize("variant", PREFIX_VARIANTS)
@pytest.mark.parametrize("method", REDUCING)
@torch.no_grad()
def test_every_reducing_method_gives_full_grids(method, variant):
    try:
        model = attach(method, make_vit(variant))
    except tieta.TietaError as refused:  # e.g. DiffRate's class-token ranking on a model without one
        pytest.skip(str(refused))
    final, grids = model.forward_intermediates(images(), indices=[0, 2])
    assert [tuple(grid.shape) for grid in grids] == [(2, model.embed_dim, GRID, GRID)] * 2
    assert final.shape == (2, model.num_prefix_tokens + GRID * GRID, model.embed_dim)
    (only,) = model.forward_intermediates(images(), indices=[1], intermediates_only=True, stop_early=True)
    assert only.shape == (2, model.embed_dim, GRID, GRID)
    result = model.forward_intermediates(images(), indices=1, output_dict=True, return_prefix_tokens=True)
    assert result["image_intermediates"][0].shape == (2, model.embed_dim, GRID, GRID)


@torch.no_grad()
def test_nothing_is_recorded_outside_a_dense_call():
    model = tieta.add_tome(make_vit("plain"), r=[3, 2, 1])
    x = images()
    before = count_flops(model, x)
    logits = model(x)
    model.forward_intermediates(x)
    assert token_state_of(model).dense is None
    assert count_flops(model, x) == before
    torch.testing.assert_close(model(x), logits, rtol=0, atol=0)


class Unreported(nn.Module):
    """A reduce step that drops the last token without saying so."""

    def forward(self, x: torch.Tensor, block: nn.Module) -> torch.Tensor:
        return x[:, :-1]


@torch.no_grad()
def test_a_reduction_that_does_not_report_is_refused_in_one_sentence():
    model = tieta.add_tome(make_vit("plain"), r=[3, 0, 0])
    model.blocks[2].reduce = Unreported()
    with pytest.raises(tieta.TietaError, match="output_fmt='NLC'"):
        model.forward_intermediates(images())
    assert token_state_of(model).dense is None
    model.forward_intermediates(images(), output_fmt="NLC")  # the NLC tokens stay available


@pytest.mark.parametrize("method", ["tome", "pitome", "dtem", "mctf", "fpet"])
@torch.no_grad()
def test_a_merged_position_takes_the_value_of_the_token_its_source_trace_puts_it_in(method):
    """Each method's own source trace (``TokenState.trace_source``: which input tokens each token
    holds) is the slow check: a position in a token's trace gets that token's value."""
    model = attach(method, make_vit("plain")) if method != "tome" else tieta.add_tome(make_vit("plain"), r=[3, 2, 1])
    state = token_state_of(model)
    state.trace_source = True
    finals = []
    model.norm.register_forward_hook(lambda module, inputs, out: finals.append(out))
    final, _ = model.forward_intermediates(images())
    tokens = finals[0]  # timm's final norm, on the tokens as the pass left them (the restore norms after it)
    prefix = model.num_prefix_tokens
    source = state.source[:, :, prefix:]  # (B, N', P): input patch p is held by token j
    held = source.abs().sum(dim=1) > 0  # FPET's tokens merged nowhere are held by none: dropped
    owner = source.abs().argmax(dim=1)  # (B, P)
    expected = tokens.gather(1, owner[..., None].expand(-1, -1, tokens.shape[-1]))
    assert held.sum() > 0 and tokens.shape[1] < prefix + GRID * GRID  # tokens were merged
    torch.testing.assert_close(final[:, prefix:][held], expected[held], rtol=0, atol=0)


@pytest.mark.parametrize("variant", ["eva02", "rope_vit"])
@pytest.mark.parametrize("method", ["tome", "evit", "dynamicvit"])
@torch.no_grad()
def test_eva_models_give_full_grids_too(method, variant):
    model = attach(method, make_vit(variant)) if method != "tome" else tieta.add_tome(make_vit(variant), r=[3, 2, 1])
    final, grids = model.forward_intermediates(images())
    grid = model.patch_embed.grid_size
    assert [tuple(g.shape) for g in grids] == [(2, model.embed_dim, *grid)] * 3
    assert final.shape == (2, model.num_prefix_tokens + grid[0] * grid[1], model.embed_dim)
    _, tokens = model.forward_intermediates(images(), output_fmt="NLC")
    assert tokens[-1].shape[1] < grid[0] * grid[1]  # the tokens were reduced


@torch.no_grad()
def test_spvit_argmax_padding_stands_for_no_position(monkeypatch):
    """SPViT's argmax decisions pad each image's kept tokens to the batch's largest count with
    tokens the image dropped: a batch's grids are each image's own grids (at batch size 1, no padding)."""
    import tieta.methods.spvit as spvit_module

    threshold = []

    def uneven_keep(score, patches, valid=None):
        # the random selector's logits favour one side for every token: keep the tokens above the
        # batch's median margin instead (fixed at the first call), so the images keep different counts
        margin = score[:, :patches, 0] - score[:, :patches, 1]
        threshold.append(threshold[0] if threshold else margin.median())
        keep = margin > threshold[0]
        return keep if valid is None else keep & valid

    monkeypatch.setattr(spvit_module, "argmax_keep", uneven_keep)
    model = tieta.add_spvit(make_vit("plain"), keep_rates=(0.5,), locations=(1,), decision="argmax")
    model = randomise_parameters(model, ("selector",))
    x = images(3, seed=1)
    _, grids = model.forward_intermediates(x)
    assert not bool(model.spvit_state.valid.all())  # the batch was padded
    for image in range(3):
        _, alone = model.forward_intermediates(x[image:image + 1])
        for batch_grid, own in zip(grids, alone):
            torch.testing.assert_close(batch_grid[image:image + 1], own, rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("method", ["tome", "evit", "dynamicvit", "spvit"])
def test_dense_grids_train_a_dense_head(method):
    """In training mode the grids are complete and pass the gradient back to the backbone (a
    segmentation head trains through them); DynamicViT and SPViT mask in training, tokens stay."""
    model = attach(method, make_vit("plain")) if method != "tome" else tieta.add_tome(make_vit("plain"), r=[3, 2, 1])
    model.train()
    _, grids = model.forward_intermediates(images(), indices=[1, 2])
    assert [tuple(grid.shape) for grid in grids] == [(2, model.embed_dim, GRID, GRID)] * 2
    sum(grid.square().mean() for grid in grids).backward()
    assert model.patch_embed.proj.weight.grad.abs().sum() > 0


def test_dtem_dense_outputs_in_training_are_refused_in_one_sentence():
    model = attach("dtem", make_vit("plain")).train()
    with pytest.raises(tieta.TietaError, match="evaluation mode"):
        model.forward_intermediates(images())
    assert token_state_of(model).dense is None
    model.forward_intermediates(images(), output_fmt="NLC")  # training itself goes on
