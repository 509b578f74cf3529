"""MCTF's tensor operations against a literal transcription of the reference (``mlvlab/MCTF``,
``utils/mctf.py``: ``mctf``, ``bipartite_soft_matching`` and ``merge_wavg`` with pooling 1 and
one-step-ahead attention), which knows one protected token, the class token at index 0."""

import math

import pytest
import torch

from tieta.ops.mctf import (attention_weighted_fusion, bidirectional_matching, consistency_loss, fusion_scores,
                            merge_count, pool)


def reference_r(t, r, num_protected):
    """The reference's clamps of r in ``mctf`` (as written)."""
    if t - r < 10:
        r = t - 10
    r = min(int((t - num_protected) * r) if r < 1 else r, (t - num_protected) // 2)
    return r


def reference_matching(metric, attn, size, r, num_protected, tau_sim, tau_info, tau_size, bidirection):
    """``bipartite_soft_matching`` as written there; returns its ``merge`` closure."""
    r1, r2 = (r // 2, r - r // 2) if bidirection else (r, 0)
    metric = metric / metric.norm(dim=-1, keepdim=True)
    a, b = metric[..., ::2, :], metric[..., 1::2, :]
    if tau_sim:
        W_sim = a @ b.transpose(-1, -2)
        W_sim = ((W_sim + 1) / 2) ** (1 / tau_sim)
    else:
        W_sim = torch.ones((a.shape[0], a.shape[1], b.shape[1]))
    if tau_info > 0 and attn is not None:
        attn = 1 / attn.mean(dim=[1, 2])
        attn = attn / attn.max(1, keepdim=True)[0]
        attn_a, attn_b = attn[..., ::2, None], attn[..., 1::2, None].transpose(1, 2)
        W_info = (attn_a * attn_b) ** (1 / tau_info)
    else:
        W_info = 1
    if tau_size and size is not None:
        size = 1 / size
        size = size / size.max(1, keepdim=True)[0]
        size_a, size_b = size[..., ::2, :], size[..., 1::2, :].transpose(1, 2)
        W_size = (size_a * size_b) ** (1 / tau_size)
    else:
        W_size = 1
    scores = W_sim * W_info * W_size
    scores[..., :num_protected, :] = -math.inf
    n, t1, t2 = scores.shape
    node_max, node_idx = scores.max(dim=-1)
    edge_idx = node_max.argsort(dim=-1, descending=True)[..., None]
    unm_idx = edge_idx[..., r1:, :]
    src_idx = edge_idx[..., :r1, :]
    dst_idx = node_idx[..., None].gather(dim=-2, index=src_idx)
    unm_idx = unm_idx.sort(dim=1)[0]
    if bidirection:
        new_scores = scores.gather(dim=-2, index=unm_idx.repeat(1, 1, t2)).transpose(1, 2)
        node_max2, node_idx2 = new_scores.max(dim=-1)
        edge_max2, edge_idx2 = node_max2.sort(dim=-1, descending=True)
        edge_idx2 = edge_idx2[..., None]
        unm_idx2 = edge_idx2[..., r2:, :]
        src_idx2 = edge_idx2[..., :r2, :]
        dst_idx2 = node_idx2[..., None].gather(dim=-2, index=src_idx2)

    def dim_match(src, dim=1, dim_num=5):
        while len(src.shape) < dim_num:
            src = src.unsqueeze(dim)
        return src

    def merge(x, mode="mean"):
        src, dst = x[..., ::2, :], x[..., 1::2, :]
        b, mid, c = src.shape[0], src.shape[1:-2], src.shape[-1]
        dim_num = len(src.shape)
        unm_idx_ = dim_match(unm_idx, dim=1, dim_num=dim_num)
        src_idx_ = dim_match(src_idx, dim=1, dim_num=dim_num)
        dst_idx_ = dim_match(dst_idx, dim=1, dim_num=dim_num)
        unm = src.gather(dim=-2, index=unm_idx_.expand(b, *mid, t1 - r1, c))
        src = src.gather(dim=-2, index=src_idx_.expand(b, *mid, r1, c))
        dst = dst.scatter_reduce(-2, dst_idx_.expand(b, *mid, r1, c), src, reduce=mode)
        if bidirection:
            unm_idx2_ = dim_match(unm_idx2, dim=1, dim_num=dim_num)
            src_idx2_ = dim_match(src_idx2, dim=1, dim_num=dim_num)
            dst_idx2_ = dim_match(dst_idx2, dim=1, dim_num=dim_num)
            src2, dst2 = dst, unm
            unm2 = src2.gather(dim=-2, index=unm_idx2_.expand(b, *mid, t2 - r2, c))
            src2 = src2.gather(dim=-2, index=src_idx2_.expand(b, *mid, r2, c))
            dst2 = dst2.scatter_reduce(-2, dst_idx2_.expand(b, *mid, r2, c), src2, reduce=mode)
            return torch.cat([dst2, unm2], dim=-2)
        return torch.cat([unm, dst], dim=-2)

    return merge


def reference_merge_wavg(merge, x, size, attn):
    """``merge_wavg`` with ``pooling_type=1`` and ``one_step_ahead=1``, as written there."""
    if size is None:
        size = torch.ones_like(x[..., 0, None])
    size_max = size.amax(dim=-2, keepdim=True)
    attn_m = attn.mean(dim=[1, 2]).unsqueeze(-1)
    norm = merge(attn_m * (size / size_max), mode="sum")
    attn_n = merge(attn[..., None], mode="sum").squeeze(-1)
    attn_n = merge(attn_n * attn_m[:, None] * (size / size_max)[:, None], mode="sum").squeeze(-1)
    attn_n = attn_n / norm[:, None]
    x = merge(x * attn_m * (size / size_max), mode="sum")
    size = merge(size, mode="sum")
    x = x / norm
    return x, size, attn_n


def _inputs(batch=2, tokens=17, width=8, heads=2, sized=True, seed=0):
    generator = torch.Generator().manual_seed(seed)
    x = torch.randn(batch, tokens, width, generator=generator, dtype=torch.float64)
    attn = torch.randn(batch, heads, tokens, tokens, generator=generator, dtype=torch.float64).softmax(-1)
    size = torch.randint(1, 4, (batch, tokens, 1), generator=generator).double() if sized else None
    if size is not None:
        size[:, 0] = 1  # the class token is never fused
    return x, attn, size


@pytest.mark.parametrize("tokens", [17, 18, 21])
@pytest.mark.parametrize("r", [1, 6])
@pytest.mark.parametrize("bidirectional", [True, False])
@pytest.mark.parametrize("sized", [True, False])
def test_fusion_equals_the_reference(tokens, r, bidirectional, sized):
    x, attn, size = _inputs(tokens=tokens, sized=sized, seed=tokens * 10 + r)
    merge = reference_matching(x, attn, size, r, 1, 1, 20, 40, bidirectional)
    expected = reference_merge_wavg(merge, x, size, attn)
    scores = fusion_scores(x, attn, size, 1, 1, 20, 40)
    fusion = bidirectional_matching(scores, r, tokens, 1, bidirectional)
    got = attention_weighted_fusion(fusion, x, size, attn)
    for g, e in zip(got, expected):
        torch.testing.assert_close(g, e, rtol=1e-12, atol=1e-12)
    assert got[0].shape == (2, tokens - r, 8) and got[2].shape == (2, 2, tokens - r, tokens - r)


@pytest.mark.parametrize("taus", [(0, 20, 40), (1, 0, 40), (1, 20, 0), (2, 5, 1)])
def test_each_criterion_can_be_left_out_or_sharpened_as_the_reference(taus):
    x, attn, size = _inputs(tokens=19, seed=3)
    merge = reference_matching(x, attn, size, 6, 1, *taus, True)
    expected = reference_merge_wavg(merge, x, size, attn)
    fusion = bidirectional_matching(fusion_scores(x, attn, size, 1, *taus), 6, 19, 1)
    for g, e in zip(attention_weighted_fusion(fusion, x, size, attn), expected):
        torch.testing.assert_close(g, e, rtol=1e-12, atol=1e-12)


def test_fused_attention_rows_still_sum_to_one_and_sizes_add_up():
    x, attn, size = _inputs(tokens=21, seed=4)
    fusion = bidirectional_matching(fusion_scores(x, attn, size, 1), 8, 21, 1)
    fused, new_size, ahead = attention_weighted_fusion(fusion, x, size, attn)
    torch.testing.assert_close(ahead.sum(-1), torch.ones(2, 2, 13, dtype=torch.float64))
    torch.testing.assert_close(new_size.sum(1), size.sum(1))


def test_prefix_tokens_are_never_fused_and_stay_in_front():
    x, attn, size = _inputs(tokens=21, seed=5)
    for prefix in (2, 5):
        fusion = bidirectional_matching(fusion_scores(x, attn, size, prefix), 8, 21, prefix)
        assert fusion.group[:, :prefix].tolist() == [list(range(prefix))] * 2
        others = fusion.group[:, prefix:]
        assert bool((others >= prefix).all()) and fusion.num_out == 13
        # every output token is some group's, and no group is a prefix token's plus another
        assert all(sorted(set(row.tolist())) == list(range(prefix, 13)) for row in others)


def test_merge_count_follows_the_reference_clamps():
    for tokens in (10, 11, 17, 21, 37, 197):
        for r in (0, 0.35, 1, 7, 16, 100):
            assert merge_count(tokens, r, 1) == max(0, reference_r(tokens, r, 1)), (tokens, r)


def test_pool_sums_groups_along_any_dimension():
    x, attn, size = _inputs(tokens=9, seed=6)
    fusion = bidirectional_matching(fusion_scores(x, attn, size, 1), 4, 9, 1)
    pooled = pool(fusion, attn, dim=2)
    for image in range(2):
        for token in range(9):
            out = int(fusion.group[image, token])
            assert out < 5
        for out in range(5):
            members = [t for t in range(9) if int(fusion.group[image, t]) == out]
            torch.testing.assert_close(pooled[image, :, out], attn[image, :, members].sum(dim=1))


def test_consistency_is_the_mean_squared_distance_to_a_detached_teacher():
    teacher, student = torch.randn(3, 4, requires_grad=True), torch.randn(3, 4, requires_grad=True)
    loss = consistency_loss(teacher, student)
    torch.testing.assert_close(loss, ((teacher - student) ** 2).mean(dim=1))
    loss.sum().backward()
    assert teacher.grad is None and student.grad is not None


def test_ties_go_to_the_lower_index():
    scores = torch.ones(1, 8, 8, dtype=torch.float64)  # every pair equally good
    fusion = bidirectional_matching(scores, 4, 17, 1)
    # A tokens 2 and 4 fuse into B token 1; then B tokens 1 and 3 fuse into the first A token
    # left (6, output 1); the other A tokens keep their order, then B tokens 5, 7, ... 15
    assert fusion.group[0].tolist() == [0, 1, 1, 1, 1, 7, 1, 8, 2, 9, 3, 10, 4, 11, 5, 12, 6]
