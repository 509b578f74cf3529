"""DiffRate's pure parts against slow, literal transcriptions of docs/baselines.md §4."""

import pytest
import torch

from tieta.ops.diffrate import (
    RateLogits,
    ceil_ste,
    merge_training,
    min_ste,
    prune_merge,
    prune_merge_source,
    search_flops,
    sort_by_importance,
)
from tieta.ops.diffrate_rates import PUBLISHED_RATES

VIT_B = dict(depth=12, width=768, mlp_hidden=3072, patches=196, num_prefix=1)
VIT_S = dict(depth=12, width=384, mlp_hidden=1536, patches=196, num_prefix=1)
VIT_L = dict(depth=24, width=1024, mlp_hidden=4096, patches=196, num_prefix=1)
VIT_T = dict(depth=12, width=192, mlp_hidden=768, patches=196, num_prefix=1)
CONFIGS = {"vit_t": VIT_T, "vit_s": VIT_S, "vit_b": VIT_B, "vit_l": VIT_L}


def gmacs(config, kept_prune, kept_merge, classes=1000):
    """§1.1 count: blocks + patch embedding (P + 1)·D·768 + head D·classes, in GMACs."""
    blocks = search_flops(**config, kept_prune=kept_prune, kept_merge=kept_merge)
    tokens = config["patches"] + config["num_prefix"]
    return float(blocks + tokens * config["width"] * 768 + config["width"] * classes) / 1e9


def reference_prune_merge(x, size, kept_prune, kept_merge, num_prefix, clamp=False):
    """§4.4 for one image, token by token. x (N, C), size (N,).

    With clamp=True, the sizes follow the training rule of §4.5 and the sources stay in the output.
    Returns (x', size').
    """
    x, size = x[:kept_prune], size[:kept_prune]
    if kept_merge >= x.shape[0]:
        return x, size
    metric = x / x.norm(dim=-1, keepdim=True)
    members = {j: [x[j]] for j in range(kept_merge)}
    sizes = {j: size[j].clamp(min=1) if clamp else size[j] for j in range(kept_merge)}
    src_sizes = []
    for i in range(kept_merge, x.shape[0]):
        similarity, j = max((float(metric[i] @ metric[j]), j) for j in range(num_prefix, kept_merge))
        members[j].append(x[i])
        added = similarity * size[i]
        added = added.clamp(min=1) if clamp else added
        sizes[j] = sizes[j] + added
        src_sizes.append(added)
    out_x = torch.stack([torch.stack(members[j]).mean(dim=0) for j in range(kept_merge)])
    out_size = torch.stack([sizes[j] for j in range(kept_merge)])
    if clamp:
        out_x = torch.cat([out_x, x[kept_merge:]])
        out_size = torch.cat([out_size, torch.stack(src_sizes)])
    return out_x, out_size


def random_tokens(batch=3, tokens=20, channels=8, seed=0):
    generator = torch.Generator().manual_seed(seed)
    x = torch.randn(batch, tokens, channels, generator=generator)
    size = 1 + 3 * torch.rand(batch, tokens, 1, generator=generator)
    return x, size


# --- straight-through helpers ---------------------------------------------------------------------


def test_ceil_ste_rounds_up_and_passes_gradient():
    x = torch.tensor([0.2, 1.0, 2.7], requires_grad=True)
    y = ceil_ste(x)
    assert y.tolist() == [1.0, 1.0, 3.0]
    (y * torch.tensor([1.0, 2.0, 3.0])).sum().backward()
    assert x.grad.tolist() == [1.0, 2.0, 3.0]


def test_min_ste_sends_gradient_to_both():
    a = torch.tensor(5.0, requires_grad=True)
    b = torch.tensor(3.0, requires_grad=True)
    y = min_ste(a, b)
    assert y.item() == 3.0
    (2 * y).backward()
    assert float(a.grad) == 2.0 and float(b.grad) == 2.0


# --- sorting --------------------------------------------------------------------------------------


@pytest.mark.parametrize("num_prefix", [1, 2])
def test_sort_keeps_prefix_in_front_and_orders_the_rest(num_prefix):
    x, size = random_tokens(tokens=12)
    scores = torch.rand(3, 12 - num_prefix, generator=torch.Generator().manual_seed(1))
    sorted_x, sorted_size, order = sort_by_importance(x, size, scores, num_prefix)
    assert order[:, :num_prefix].tolist() == [list(range(num_prefix))] * 3
    for b in range(3):
        ranked = order[b, num_prefix:] - num_prefix
        assert sorted(ranked.tolist()) == list(range(12 - num_prefix))
        assert torch.all(scores[b, ranked][:-1] >= scores[b, ranked][1:])
        assert torch.equal(sorted_x[b], x[b, order[b]])
        assert torch.equal(sorted_size[b], size[b, order[b]])


def test_sort_rejects_scores_of_the_wrong_length():
    x, size = random_tokens(tokens=6)
    with pytest.raises(ValueError):
        sort_by_importance(x, size, torch.rand(3, 6), num_prefix=1)


# --- evaluation path ------------------------------------------------------------------------------


@pytest.mark.parametrize("num_prefix", [1, 2])
@pytest.mark.parametrize("kept_prune, kept_merge", [(20, 12), (15, 9), (14, 14), (11, 30), (25, 6)])
def test_prune_merge_matches_the_slow_transcription(num_prefix, kept_prune, kept_merge):
    x, size = random_tokens()
    out_x, out_size = prune_merge(x, size, kept_prune, kept_merge, num_prefix)
    kept = min(20, kept_prune, kept_merge)
    assert out_x.shape == (3, kept, 8) and out_size.shape == (3, kept, 1)
    for b in range(3):
        want_x, want_size = reference_prune_merge(x[b], size[b, :, 0], kept_prune, kept_merge, num_prefix)
        torch.testing.assert_close(out_x[b], want_x)
        torch.testing.assert_close(out_size[b, :, 0], want_size)
        # prefix tokens receive nothing
        assert torch.equal(out_x[b, :num_prefix], x[b, :num_prefix])
        assert torch.equal(out_size[b, :num_prefix], size[b, :num_prefix])


def test_prune_merge_sizes_are_similarity_scaled_and_features_unweighted():
    # one prefix token, two kept tokens, one source identical in direction to kept token 2
    x = torch.tensor([[[1.0, 0.0, 0.0], [0.0, 1.0, 0.0], [0.0, 0.0, 1.0], [0.0, 0.6, 0.8]]])
    size = torch.tensor([[[1.0], [2.0], [5.0], [4.0]]])
    out_x, out_size = prune_merge(x, size, kept_prune=4, kept_merge=3, num_prefix=1)
    torch.testing.assert_close(out_x[0, 2], torch.tensor([0.0, 0.3, 0.9]))  # (x_2 + x_3) / 2
    torch.testing.assert_close(out_size[0, :, 0], torch.tensor([1.0, 2.0, 5.0 + 0.8 * 4.0]))


def test_prune_merge_with_everything_kept_changes_nothing():
    x, size = random_tokens()
    out_x, out_size = prune_merge(x, size, kept_prune=20, kept_merge=20, num_prefix=1)
    assert torch.equal(out_x, x) and torch.equal(out_size, size)
    out_x, out_size = prune_merge(x, size, kept_prune=197, kept_merge=197, num_prefix=2)
    assert torch.equal(out_x, x) and torch.equal(out_size, size)


def test_prune_merge_refuses_to_touch_prefix_tokens():
    x, size = random_tokens()
    with pytest.raises(ValueError):
        prune_merge(x, size, kept_prune=1, kept_merge=1, num_prefix=2)
    with pytest.raises(ValueError):
        prune_merge(x, size, kept_prune=10, kept_merge=2, num_prefix=2)


@pytest.mark.parametrize("kept_prune,kept_merge", [(20, 20), (14, 20), (20, 9), (15, 6)])
def test_prune_merge_source_holds_what_each_token_was_merged_from(kept_prune, kept_merge):
    x, _ = random_tokens()
    tokens = x.shape[1]
    source = torch.eye(tokens)[None].expand(3, -1, -1)
    out = prune_merge_source(source, x, kept_prune, kept_merge, 1)
    kept = min(tokens, kept_prune, kept_merge)
    assert out.shape == (3, kept, tokens)
    for b in range(3):
        # slow: every token after kept_merge (among the first kept_prune) joins its most similar kept one
        want = [{i} for i in range(kept)]
        metric = x[b] / x[b].norm(dim=-1, keepdim=True)
        for j in range(kept_merge, min(tokens, kept_prune)):
            similarity = [float(metric[j] @ metric[i]) if i >= 1 else -float("inf") for i in range(kept_merge)]
            want[similarity.index(max(similarity))].add(j)
        assert [set(torch.nonzero(row).flatten().tolist()) for row in out[b]] == want
    # the pruned tokens are held by no token
    assert not out[:, :, min(kept_prune, tokens):].any()


# --- search-time merge ----------------------------------------------------------------------------


@pytest.mark.parametrize("num_prefix", [1, 2])
def test_merge_training_matches_the_slow_transcription(num_prefix):
    x, size = random_tokens()
    size = size * 0.8  # some scaled sources fall below 1 and get clamped
    active, kept_merge = 16, 7
    out_x, out_size = merge_training(x, size, active, kept_merge, num_prefix)
    assert out_x.shape == x.shape and out_size.shape == size.shape
    for b in range(3):
        want_x, want_size = reference_prune_merge(x[b], size[b, :, 0], active, kept_merge, num_prefix, clamp=True)
        torch.testing.assert_close(out_x[b, :active], want_x)
        torch.testing.assert_close(out_size[b, :active, 0], want_size)
    assert torch.equal(out_x[:, active:], x[:, active:])
    assert torch.equal(out_size[:, active:], size[:, active:])
    # at evaluation the same destinations receive the same features
    eval_x, _ = prune_merge(x, size, active, kept_merge, num_prefix)
    torch.testing.assert_close(out_x[:, :kept_merge], eval_x)


def test_merge_training_is_a_no_op_when_nothing_is_merged():
    x, size = random_tokens()
    out_x, out_size = merge_training(x, size, active=12, kept_merge=12, num_prefix=1)
    assert out_x is x and out_size is size


# --- rate logits ----------------------------------------------------------------------------------


def test_rate_logits_at_init_keep_101_tokens_with_a_straight_through_gradient():
    rate = RateLogits(196, granularity=4, num_prefix=1)
    assert rate.candidates.shape == (49,) and rate.candidates[0] == 196 and rate.candidates[-1] == 4
    assert rate.logits.shape == (49,) and not rate.candidates.requires_grad
    kept = rate.expected_kept()
    assert kept.item() == 101.0 and rate.kept_number() == 101
    kept.backward()
    # d(sum c_i p_i)/d theta_j = p_j (c_j - sum c_i p_i), p uniform
    torch.testing.assert_close(rate.logits.grad, (rate.candidates - 100.0) / 49)


def test_rate_logits_expected_kept_and_gradient_for_random_logits():
    torch.manual_seed(0)
    rate = RateLogits(196, granularity=4, num_prefix=2)
    with torch.no_grad():
        rate.logits.normal_()
    p = rate.logits.detach().softmax(-1)
    mean = float(rate.candidates @ p)
    kept = rate.expected_kept()
    assert kept.item() == float(torch.ceil(torch.tensor(mean))) + 2
    assert rate.kept_number() == int(kept.item())
    kept.backward()
    torch.testing.assert_close(rate.logits.grad, p * (rate.candidates - mean))


def test_fixed_rate_logits_keep_everything():
    rate = RateLogits(196, granularity=4, fixed=True, num_prefix=1)
    assert rate.candidates.tolist() == [196.0] and rate.logits.shape == (1,)
    assert rate.kept_number() == 197
    assert sum(p.numel() for p in rate.parameters()) == 1


def slow_keep_probability(rate, length):
    """q_t = Σ_{i: c_i + num_prefix > t} p_i, position by position (§4.5)."""
    p = rate.logits.softmax(-1)
    return torch.stack([
        sum(p[i] for i in range(len(rate.candidates)) if rate.candidates[i] + rate.num_prefix > t)
        for t in range(length)
    ])


@pytest.mark.parametrize("num_prefix", [1, 2])
def test_keep_mask_is_hard_forward_and_soft_backward(num_prefix):
    torch.manual_seed(1)
    rate = RateLogits(50, granularity=4, num_prefix=num_prefix)
    with torch.no_grad():
        rate.logits.normal_()
    kept = rate.expected_kept()
    length = 45
    mask = rate.keep_mask(kept, length)
    assert mask.shape == (length,)
    cut = int(kept.item())
    assert 0 < cut < length
    assert torch.all(mask[:cut] == 1) and torch.all(mask[cut:] == 0)
    weights = torch.randn(length)
    (weights * mask).sum().backward()
    grad = rate.logits.grad.clone()
    rate.logits.grad = None
    (weights * slow_keep_probability(rate, length)).sum().backward()
    torch.testing.assert_close(grad, rate.logits.grad)


def test_keep_mask_with_count_above_length_keeps_all():
    rate = RateLogits(50, granularity=4)
    mask = rate.keep_mask(60, 30)
    assert torch.all(mask == 1)


# --- FLOPs ----------------------------------------------------------------------------------------


def test_search_flops_without_reduction_is_the_plain_count():
    full = [197] * 12
    assert round(gmacs(VIT_B, full, full), 2) == 17.56
    assert round(gmacs(VIT_S, full, full), 2) == 4.60


@pytest.mark.parametrize(
    "key, config, expected",
    [
        ("vit_b_deit_8.7", VIT_B, 8.731),
        ("vit_b_deit_10.0", VIT_B, 9.986),
        ("vit_b_deit_11.5", VIT_B, 11.517),
        ("vit_b_deit_12.5", VIT_B, 12.523),
        ("vit_s_deit_2.3", VIT_S, 2.327),
        ("vit_s_deit_2.9", VIT_S, 2.905),
        ("vit_b_mae_8.7", VIT_B, 8.711),
        ("vit_b_mae_11.5", VIT_B, 11.517),
        ("vit_l_mae_42.3", VIT_L, 42.290),
    ],
)
def test_published_schedules_reproduce_the_published_flops(key, config, expected):
    kept_prune, kept_merge = PUBLISHED_RATES[key]
    assert round(gmacs(config, kept_prune, kept_merge), 3) == expected


@pytest.mark.parametrize("key", sorted(PUBLISHED_RATES))
def test_every_published_schedule_lands_near_its_target(key):
    config = CONFIGS[key[:5]]
    target = float(key.rsplit("_", 1)[1])
    kept_prune, kept_merge = PUBLISHED_RATES[key]
    assert len(kept_prune) == len(kept_merge) == config["depth"]
    assert kept_prune[0] == kept_merge[0] == 197  # the first block never compresses
    assert abs(gmacs(config, kept_prune, kept_merge) - target) < 0.06


def test_published_schedules_give_the_documented_mlp_tokens():
    documented = {
        "vit_b_deit_8.7": [197, 178, 162, 141, 115, 96, 78, 60, 47, 21, 13, 3],
        "vit_b_deit_11.5": [197, 197, 192, 178, 158, 145, 127, 111, 94, 50, 35, 3],
        "vit_s_deit_2.3": [197, 180, 156, 127, 109, 98, 80, 66, 52, 37, 31, 3],
    }
    for key, tokens in documented.items():
        kept_prune, kept_merge = PUBLISHED_RATES[key]
        assert [min(p, m) for p, m in zip(kept_prune, kept_merge)] == tokens


def test_search_flops_gradient_is_the_mlp_and_next_attention():
    width, hidden = VIT_B["width"], VIT_B["mlp_hidden"]
    kept_prune, kept_merge = PUBLISHED_RATES["vit_b_deit_11.5"]
    prune = [torch.tensor(float(k), requires_grad=True) for k in kept_prune]
    merge = [torch.tensor(float(k), requires_grad=True) for k in kept_merge]
    search_flops(**VIT_B, kept_prune=prune, kept_merge=merge).backward()
    for block in range(12):
        tokens = min(kept_prune[block], kept_merge[block])
        expected = 2 * width * hidden + (4 * width**2 + 4 * tokens * width if block < 11 else 0)
        # the straight-through minimum credits both counts, whichever is smaller
        assert float(prune[block].grad) == expected
        assert float(merge[block].grad) == expected


def test_search_flops_gradient_equals_the_central_difference():
    # block 5 of ViT-B 11.5: merge 145 < prune 154, and block 6 keeps at most 139, so moving the
    # merge count by ±1 changes block 5's MLP and block 6's attention only
    width = VIT_B["width"]
    kept_prune, kept_merge = map(list, PUBLISHED_RATES["vit_b_deit_11.5"])
    assert kept_merge[5] == 145 and kept_prune[5] > 146 and max(kept_prune[6], kept_merge[6]) < 144

    def flops_with(merge_5):
        merge = kept_merge[:5] + [merge_5] + kept_merge[6:]
        return float(search_flops(**VIT_B, kept_prune=kept_prune, kept_merge=merge))

    central = (flops_with(146) - flops_with(144)) / 2
    assert central == 12 * width**2 + 4 * 145 * width


def test_flops_loss_reaches_the_rate_logits():
    rates = [RateLogits(196, 4, fixed=block == 0) for block in range(12)]
    kept = [rate.expected_kept() for rate in rates]
    flops = search_flops(**VIT_B, kept_prune=kept, kept_merge=kept)
    loss = 5 * (flops / 1e9 - 8.77) ** 2
    loss.backward()
    assert float(rates[0].logits.grad.abs().sum()) == 0.0
    for rate in rates[1:]:
        assert float(rate.logits.grad.abs().sum()) > 0.0
        assert rate.logits.grad.dtype == torch.float32
