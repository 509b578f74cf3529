import pytest
import torch

import tieta
from tieta.methods.pyra import PyraModulation
from tieta.methods.tome import bipartite_soft_matching, merge_source, merge_wavg
from tests.conftest import make_vit


def reference_merge(x, keys, size, r, num_prefix, pyra=None):
    """A direct, slow transcription of docs/methods.md for one image.

    Args: x (N, C), keys (N, C'), size (N,). Returns (x', size') in the order
    [prefix tokens, unmerged A in original order, B tokens].
    """
    n = x.shape[0]
    metric = keys / keys.norm(dim=-1, keepdim=True)
    set_a, set_b = list(range(0, n, 2)), list(range(1, n, 2))
    best = {}
    for i in set_a:
        if i < num_prefix:
            continue
        candidates = [(float(metric[i] @ metric[j]), j) for j in set_b if j >= num_prefix]
        best[i] = max(candidates)
    r = min(r, (n - num_prefix) // 2)
    ranked = sorted(best, key=lambda i: best[i][0], reverse=True)
    merged = ranked[:r]  # best match first
    weighted = {i: x[i] * size[i] for i in range(n)}
    src = torch.stack([weighted[i] for i in merged]) if merged else None
    if pyra is not None and merged:
        dst = torch.stack([weighted[best[i][1]] for i in merged])
        src = pyra(src[None], dst[None])[0]
    totals, sizes = {j: weighted[j].clone() for j in set_b}, {j: size[j].clone() for j in set_b}
    for k, i in enumerate(merged):
        j = best[i][1]
        totals[j] = totals[j] + src[k]
        sizes[j] = sizes[j] + size[i]
    order = list(range(num_prefix)) + [i for i in set_a if i >= num_prefix and i not in merged] + \
        [j for j in set_b if j >= num_prefix]
    value = lambda i: (totals[i], sizes[i]) if i in totals else (weighted[i], size[i])
    out_x = torch.stack([value(i)[0] / value(i)[1] for i in order])
    out_size = torch.stack([value(i)[1] for i in order])
    return out_x, out_size


def spec_case(n: int, r: int, with_pyra: bool, heads: int):
    """Random inputs for one merge: x (3, n, 12), keys (3, heads, n, 6), size (3, n, 1), and a PYRA
    module with weights away from its identity initialisation (or None)."""
    torch.manual_seed(n + r)
    x, keys = torch.randn(3, n, 12), torch.randn(3, heads, n, 6)
    size = torch.randint(1, 4, (3, n, 1)).float()
    pyra = None
    if with_pyra:
        pyra = PyraModulation(r, 12)
        with torch.no_grad():
            pyra.token_weight.normal_()
            pyra.norm.weight.normal_()
    return x, keys, size, pyra


# (tokens, r, prefix tokens): odd and even counts, several prefixes, and an r that must be clipped
SPEC_CASES = [(17, 4, 1), (18, 8, 1), (20, 5, 2), (21, 3, 5), (16, 8, 0), (9, 10, 1)]


@pytest.mark.parametrize("n,r,num_prefix", SPEC_CASES)
@pytest.mark.parametrize("with_pyra", [False, True])
def test_merge_follows_the_spec_token_for_token(n, r, num_prefix, with_pyra):
    x, keys, size, pyra = spec_case(n, r, with_pyra, heads=1)
    keys = keys[:, 0]
    batch = x.shape[0]
    matching = bipartite_soft_matching(keys, r, num_prefix)
    merged, merged_size = merge_wavg(matching, x, size, pyra)
    for image in range(batch):
        expected_x, expected_size = reference_merge(x[image], keys[image], size[image, :, 0], r, num_prefix, pyra)
        torch.testing.assert_close(merged[image], expected_x)
        torch.testing.assert_close(merged_size[image, :, 0], expected_size)


def test_sizes_and_sources_account_for_every_input_token():
    torch.manual_seed(0)
    x, keys = torch.randn(2, 33, 8), torch.randn(2, 33, 4)
    size, source = None, None
    for r in (8, 6, 4, 2):
        matching = bipartite_soft_matching(keys, r, 1)
        source = merge_source(matching, source, x.shape[1])
        x, size = merge_wavg(matching, x, size)
        keys = torch.randn(2, x.shape[1], 4)
        assert torch.all(size.sum(dim=1) == 33)
        torch.testing.assert_close(source.sum(dim=-1, keepdim=True), size)
        assert torch.all(source.sum(dim=1) == 1)  # each input token lives in exactly one token
    assert source[:, 0, 0].eq(1).all() and size[:, 0, 0].eq(1).all()  # the class token is alone, first


def test_r_zero_equals_unpatched_timm(vit_variant):
    model = make_vit(vit_variant)
    x = torch.randn(2, 3, 32, 32)
    expected = model(x)
    tieta.add_tome(model, r=0)
    torch.testing.assert_close(model(x), expected, rtol=0, atol=0)


@pytest.mark.parametrize("schedule", [2, [3, 2, 1], (2, -0.5)])
def test_pyra_at_initialisation_equals_tome(vit_variant, schedule):
    x = torch.randn(2, 3, 32, 32)
    tome = tieta.add_tome(make_vit(vit_variant), r=schedule)
    pyra = tieta.add_pyra(make_vit(vit_variant), r=schedule)
    assert any(block.pyra is not None for block in pyra.blocks)
    torch.testing.assert_close(pyra(x), tome(x), rtol=0, atol=0)


def test_merging_changes_the_output_and_keeps_prefix_tokens(vit_variant):
    model = make_vit(vit_variant)
    x = torch.randn(2, 3, 32, 32)
    plain_features = model.forward_features(x)
    tieta.add_tome(model, r=[3, 2, 1])
    features = model.forward_features(x)
    assert features.shape[1] == plain_features.shape[1] - 6
    size = model.token_state.size
    assert torch.all(size.sum(dim=1) == plain_features.shape[1])
    prefix = model.num_prefix_tokens
    assert torch.all(size[:, :prefix] == 1)
    # the first block sees the same tokens, so prefix tokens agree until merging starts; afterwards
    # they still sit in front: the class (and distillation) token remain readable by timm's heads
    assert model(x).shape == (2, 5)


def test_average_pool_is_weighted_by_size():
    model = tieta.add_tome(make_vit("avg_pool"), r=[4, 2, 2])
    x = torch.randn(2, 3, 32, 32)
    features = model.forward_features(x)
    size = model.token_state.size
    pooled = (features * size).sum(1) / size.sum(1)
    expected = model.head(model.fc_norm(pooled))
    torch.testing.assert_close(model.forward_head(features), expected)


def test_proportional_attention_matters_and_can_be_switched_off():
    x = torch.randn(2, 3, 32, 32)
    on = tieta.add_tome(make_vit("plain"), r=3)(x)
    off = tieta.add_tome(make_vit("plain"), r=3, prop_attn=False)(x)
    assert not torch.allclose(on, off)


def test_bf16_autocast_runs_with_proportional_attention():
    model = tieta.add_tome(make_vit("plain"), r=3)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = model(torch.randn(2, 3, 32, 32))
    assert torch.isfinite(out.float()).all()
