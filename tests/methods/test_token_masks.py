"""The token decisions ``tieta show-tokens`` draws for the methods that prune: one (B, P) mask per
decision over the patch grid, counted as the method counts its tokens, nested, and the same as a
slow recomputation that follows each image's patches through the method's own kept indices (caught
where the method's module calls its tensor function)."""

from __future__ import annotations

import pytest
import torch

import tieta
import tieta.methods.diffrate_step as diffrate_step
import tieta.methods.dynamicvit as dynamicvit
import tieta.methods.evit as evit
import tieta.methods.spvit as spvit
import tieta.methods.tofu as tofu
from tieta.errors import TietaError
from tieta.methods import registry
from tieta.methods.diffrate import mlp_token_counts
from tieta.methods.state import pass_state_named
from tieta.ops.evit import keep_count, kept_order
from tests.conftest import make_vit, randomise_parameters
from tests.registry_cases import diffrate_counts

PRUNING = ["evit", "dynamicvit", "spvit", "diffrate", "tofu"]
PATCHES = 16  # the small ViTs: 32 px, patch 8


def images(batch: int = 3) -> torch.Tensor:
    return torch.randn(batch, 3, 32, 32, generator=torch.Generator().manual_seed(0))


def follow(current: list[list], kept: torch.Tensor, extra: int = 0) -> list[list]:
    """Each image's tokens (patch ids, None for a fused or package token) after keeping ``kept`` (B, k)
    indices among them, then ``extra`` new tokens that stand for no patch."""
    return [[tokens[i] for i in row.tolist()] + [None] * extra for tokens, row in zip(current, kept)]


def slow_masks(stages: list[list[list]]) -> list[torch.Tensor]:
    """(B, P) masks from each stage's per-image token lists."""
    masks = []
    for stage in stages:
        mask = torch.zeros(len(stage), PATCHES, dtype=torch.bool)
        for image, tokens in enumerate(stage):
            mask[image, [patch for patch in tokens if patch is not None]] = True
        masks.append(mask)
    return masks


def catch(monkeypatch, module, name: str, seen: list, pick):
    """Record ``pick(args, result)`` whenever ``module`` calls its function ``name``."""
    original = getattr(module, name)

    def watched(*args, **kwargs):
        result = original(*args, **kwargs)
        seen.append(pick(args, result))
        return result

    monkeypatch.setattr(module, name, watched)


def evit_case(model, monkeypatch, seen):
    tieta.add_evit(model, keep_rate=0.5, locations=[0, 1, 2])  # 16 -> 8 (+1 fused) -> 5 (+1) -> 3 (+1)
    # the kept indices as evit_reduce takes them: the top keep_count of the scores, best first
    catch(monkeypatch, evit, "evit_reduce", seen,
          lambda args, out: kept_order(args[1], keep_count(args[1].shape[1], args[2])))
    counts = evit.token_counts(model)
    return lambda current, index: follow(current, seen[index], extra=1), [counts[i] for i in (0, 1, 2)]


def dynamicvit_case(model, monkeypatch, seen):
    tieta.add_dynamicvit(model, ratios=(0.7, 0.5), locations=(1, 2))
    randomise_parameters(model, ("predictor",))
    catch(monkeypatch, dynamicvit, "top_keep", seen, lambda args, out: out)
    counts = dynamicvit.token_counts(model)
    return lambda current, index: follow(current, seen[index]), [counts[1], counts[2]]


def spvit_case(model, monkeypatch, seen, decision="top_k"):
    tieta.add_spvit(model, keep_rates=(0.7, 0.4), locations=(1, 2), decision=decision)
    randomise_parameters(model, ("selector",))
    if decision == "top_k":
        catch(monkeypatch, spvit, "top_keep", seen, lambda args, out: out)
    else:  # argmax: each image's kept tokens, the padding left out
        catch(monkeypatch, spvit, "pack_kept", seen, lambda args, out: [row[valid] for row, valid in zip(*out)])

    def step(current, index):
        packages = [[token for token in tokens if token is None] for tokens in current]
        kept = follow(current, seen[index])
        return [tokens + earlier + [None] for tokens, earlier in zip(kept, packages)]

    counts = spvit.token_counts(model)
    return step, ([counts[1], counts[2]] if decision == "top_k" else None)


def tofu_case(model, monkeypatch, seen):
    tieta.add_tofu(model, r=[3, 2, 2])  # blocks 0 and 1 prune, block 2 fuses (depth 3)
    prefix = model.num_prefix_tokens

    def pick(args, matching):
        batch, tokens = args[0].shape[:2]
        kept = matching.kept_rows.view(batch, -1) - torch.arange(batch)[:, None] * tokens
        return kept[:, prefix:] - prefix

    catch(monkeypatch, tofu, "bipartite_soft_matching", seen, pick)
    counts = tofu.describe_tofu(model)["token_counts"]
    return lambda current, index: follow(current, seen[index]), counts[1:]


CASES = {"evit": evit_case, "dynamicvit": dynamicvit_case, "spvit": spvit_case, "tofu": tofu_case}


def test_every_pruning_method_declares_its_masks_and_a_caption_note():
    drawn = [method.name for method in registry.METHODS.values() if method.token_masks is not None]
    assert set(PRUNING) < set(drawn)
    for name in PRUNING:
        assert registry.METHODS[name].picture_note is not None
    # ToFu prunes in its early blocks, so no merge groups cover the image: show-tokens draws it, not
    # show-merges; ATC's clusters are not traced to their patches, so neither picture draws them
    assert not registry.METHODS["tofu"].shows_merges
    assert not registry.METHODS["atc"].shows_merges and registry.METHODS["atc"].token_masks is None
    # where a merge greys a patch as a pruning does, the caption says so
    assert "a merged patch stays with the token it joined" in registry.METHODS["diffrate"].picture_note(None)
    assert "fused away" in registry.METHODS["tofu"].picture_note(None)


@pytest.mark.parametrize("variant", ["plain", "registers"])
@pytest.mark.parametrize("name", list(CASES))
def test_masks_follow_the_methods_own_kept_indices(monkeypatch, name, variant):
    model, seen = make_vit(variant), []
    step, counts = CASES[name](model, monkeypatch, seen)
    method, x = registry.METHODS[name], images()
    with torch.no_grad():
        expected = model(x)
    seen.clear()
    masks = method.token_masks(model, x)
    prefix = model.num_prefix_tokens
    stages, current = [], [list(range(PATCHES)) for _ in range(x.shape[0])]
    for index in range(len(masks)):
        current = step(current, index)
        stages.append(current)
    for mask, stage, count in zip(masks, stages, counts):
        assert mask.shape == (x.shape[0], PATCHES) and mask.dtype == torch.bool
        assert len(stage[0]) + prefix == count  # the slow tokens are the method's token count
        fused = torch.tensor([sum(token is None for token in tokens) for tokens in stage])
        assert torch.equal(mask.sum(dim=1), count - prefix - fused)
    assert [torch.equal(mask, slow) for mask, slow in zip(masks, slow_masks(stages))] == [True] * len(masks)
    for earlier, later in zip(masks, masks[1:]):
        assert not (later & ~earlier).any()  # a patch dropped stays dropped
    with torch.no_grad():
        torch.testing.assert_close(model(x), expected, rtol=0, atol=0)  # nothing the model computes changed
    assert not pass_state_named(model, "token_state").rope_follows


def test_spvit_argmax_masks_leave_the_padding_out(monkeypatch):
    model, seen = make_vit("plain"), []
    step, _ = spvit_case(model, monkeypatch, seen, decision="argmax")
    masks = registry.METHODS["spvit"].token_masks(model, images())
    stages, current = [], [list(range(PATCHES)) for _ in range(3)]
    for index in range(len(masks)):
        current = step(current, index)
        stages.append(current)
    assert [torch.equal(mask, slow) for mask, slow in zip(masks, slow_masks(stages))] == [True, True]


def test_masks_are_evaluation_decisions_and_leave_the_mode_as_it_was():
    model = tieta.add_dynamicvit(make_vit("plain"), ratios=(0.7, 0.5), locations=(1, 2)).train()
    masks = registry.METHODS["dynamicvit"].token_masks(model, images())
    assert [int(mask.sum(dim=1)[0]) for mask in masks] == [11, 8]  # int(16 * 0.7), int(16 * 0.5): top-k kept
    assert model.training


def test_evit_masks_on_a_model_with_rope():
    model = tieta.add_evit(make_vit("rope_vit"), keep_rate=0.5, locations=[0, 1, 2])
    masks = registry.METHODS["evit"].token_masks(model, images(2))
    assert [mask.shape for mask in masks] == [(2, PATCHES)] * 3
    assert [int(mask.sum(dim=1).max()) for mask in masks][0] == 8
    assert pass_state_named(model, "token_state").rope_follows  # its own bookkeeping stays on


@pytest.mark.parametrize("variant", ["plain", "registers"])
def test_diffrate_masks_hold_the_merged_patches_and_drop_the_pruned(monkeypatch, variant):
    model = make_vit(variant)
    tieta.add_diffrate(model, **diffrate_counts(model))  # blocks 1 and 2 prune and merge
    prefix, x = model.num_prefix_tokens, images()
    sorts, gathers = [], []  # each block's sort order and what prune_merge is given
    catch(monkeypatch, diffrate_step, "sort_by_importance", sorts, lambda args, out: out[2])
    catch(monkeypatch, diffrate_step, "prune_merge", gathers, lambda args, out: (args[0], args[2], args[3]))
    with torch.no_grad():
        expected = model(x)
    sorts.clear(), gathers.clear()
    masks = registry.METHODS["diffrate"].token_masks(model, x)
    # slow: each image's tokens as the sets of patches they hold, through every block's sort, prune and merge
    held = [[set() for _ in range(prefix)] + [{patch} for patch in range(PATCHES)] for _ in range(x.shape[0])]
    stages = []
    for order, (sorted_x, kept_prune, kept_merge) in zip(sorts, gathers):
        for image in range(x.shape[0]):
            tokens = [held[image][i] for i in order[image].tolist()][:kept_prune]
            if kept_merge < len(tokens):
                unit = torch.nn.functional.normalize(sorted_x[image, :kept_prune], dim=-1)
                for source in range(kept_merge, len(tokens)):
                    similarity = unit[:kept_merge] @ unit[source]
                    similarity[:prefix] = -float("inf")  # never into a prefix token
                    tokens[int(similarity.argmax())] = tokens[int(similarity.argmax())] | tokens[source]
                tokens = tokens[:kept_merge]
            held[image] = tokens
        stages.append([list(tokens) for tokens in held])
    counts = mlp_token_counts(model)
    deciding = [index for index in range(len(counts)) if counts[index] < ([PATCHES + prefix] + counts)[index]]
    assert deciding == [1, 2] and len(masks) == 2
    for mask, index in zip(masks, deciding):
        slow = torch.zeros(x.shape[0], PATCHES, dtype=torch.bool)
        for image, tokens in enumerate(stages[index]):
            assert len(tokens) == counts[index]  # the method's token count, prefix included
            slow[image, sorted(set().union(*tokens))] = True
        assert torch.equal(mask, slow)
    assert (masks[1].sum(dim=1) > counts[2] - prefix).all()  # merged patches are held: more than the tokens
    assert not (masks[1] & ~masks[0]).any()
    with torch.no_grad():
        torch.testing.assert_close(model(x), expected, rtol=0, atol=0)
    assert not pass_state_named(model, "token_state").trace_source


def test_merge_groups_refuse_a_model_that_prunes_patches():
    from tieta.report.visualize import merge_groups

    model = make_vit("plain")
    tieta.add_diffrate(model, **diffrate_counts(model))
    with pytest.raises(TietaError, match="prunes some patches"):
        merge_groups(model, images())
