"""PiToMe's energy-score matching against a literal transcription of the reference code
(hchautran/PiToMe, ``algo/pitome/merge.py``: ``pitome_vision``, ``pitome``, ``pitome_bsm`` and
``merge_wavg``)."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from tieta.ops.merging import Matching, merge_wavg
from tieta.ops.pitome import bipartite_blocks, default_margins, merge_count, pitome_matching


def reference_pitome_vision(metric, ratio, margin, class_token, use_bsm_pitome, alpha=1.0):
    """``pitome_vision`` as written there; returns its merge function (None: do nothing)."""
    if class_token:
        metric = metric[:, 1:, :]
    B, T, C = metric.shape
    if ratio < 1.0:
        r = math.floor(T - T * ratio)
    else:
        return None
    metric = F.normalize(metric, p=2, dim=-1)
    sim = metric @ metric.transpose(-1, -2)
    energy_score = F.elu((sim - margin), alpha=alpha).mean(dim=-1)
    indices = torch.argsort(energy_score, descending=True)
    if use_bsm_pitome:
        return reference_pitome_bsm(metric, class_token, indices, sim, r)
    return reference_pitome(metric, class_token, indices, sim, r)


def reference_pitome(metric, class_token, indices, scores, r):
    B, T, T = scores.shape
    merge_idx = indices[..., :2 * r]
    protected_idx = indices[..., 2 * r:]
    a_idx, b_idx = merge_idx[..., ::2], merge_idx[..., 1::2]
    scores = scores.gather(dim=-1, index=b_idx.unsqueeze(-2).expand(B, T, r))
    scores = scores.gather(dim=-2, index=a_idx.unsqueeze(-1).expand(B, r, r))
    _, dst_idx = scores.max(dim=-1)

    def merge(x, mode="mean"):
        if class_token:
            x_cls = x[:, 0, :].unsqueeze(1)
            x = x[:, 1:, :]
        B, T, C = x.shape
        batch_idx = torch.arange(B).unsqueeze_(1)
        protected = x[batch_idx, protected_idx, :]
        src, dst = x[batch_idx, a_idx, :], x[batch_idx, b_idx, :]
        if mode != "prune":
            dst = dst.scatter_reduce(-2, dst_idx.unsqueeze(2).expand(B, r, C), src, reduce=mode)
        if class_token:
            return torch.cat([x_cls, protected, dst], dim=1)
        return torch.cat([protected, dst], dim=1)

    return merge


def reference_pitome_bsm(metric, class_token, indices, scores, r):
    B, T, _ = scores.shape
    a_idx, b_idx = indices[..., ::2], indices[..., 1::2]
    batch_idx = torch.arange(B).unsqueeze_(1)
    scores = scores.gather(dim=-1, index=b_idx.unsqueeze(-2).expand(B, T, b_idx.shape[-1]))
    scores = scores.gather(dim=-2, index=a_idx.unsqueeze(-1).expand(B, a_idx.shape[-1], b_idx.shape[-1]))
    node_max, node_idx = scores.max(dim=-1)
    edge_idx = node_max.argsort(dim=-1, descending=True)[..., None]
    unm_idx = edge_idx[..., r:, :]
    src_idx = edge_idx[..., :r, :]
    dst_idx = node_idx[..., None].gather(dim=-2, index=src_idx)

    def merge(x, mode="mean"):
        if class_token:
            x_cls = x[:, 0, :].unsqueeze(1)
            x = x[:, 1:, :]
        src, dst = x[batch_idx, a_idx, :], x[batch_idx, b_idx, :]
        n, t1, c = src.shape
        unm = src.gather(dim=-2, index=unm_idx.expand(n, t1 - r, c))
        if mode != "prune":
            src = src.gather(dim=-2, index=src_idx.expand(n, r, c))
            dst = dst.scatter_reduce(-2, dst_idx.expand(n, r, c), src, reduce=mode)
        if class_token:
            return torch.cat([x_cls, unm, dst], dim=1)
        return torch.cat([unm, dst], dim=1)

    return merge


def reference_merge_wavg(merge, x, size=None):
    if size is None:
        size = torch.ones_like(x[..., 0, None])
    x = merge(x * size, mode="sum")
    size = merge(size, mode="sum")
    return x / size, size


# (tokens including the class token, ratio, margin)
CASES = [(17, 0.9125, 0.75), (17, 0.7, 0.5), (26, 0.5, 0.2), (33, 0.6, 0.0), (12, 0.85, 0.4)]


@pytest.mark.parametrize("n,ratio,margin", CASES)
@pytest.mark.parametrize("bipartite", [True, False])
@pytest.mark.parametrize("class_token", [True, False])
def test_matches_the_reference(n, ratio, margin, bipartite, class_token):
    torch.manual_seed(n)
    x, keys = torch.randn(3, n, 12), torch.randn(3, 4, n, 6)
    size = torch.randint(1, 4, (3, n, 1)).float()
    merge = reference_pitome_vision(keys.mean(dim=1), ratio, margin, class_token, bipartite)
    expected_x, expected_size = reference_merge_wavg(merge, x, size)
    matching = Matching(*pitome_matching(keys.sum(dim=1), ratio, margin, int(class_token), bipartite))
    got_x, got_size = merge_wavg(matching, x, size)
    torch.testing.assert_close(got_x, expected_x, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(got_size, expected_size, rtol=0, atol=0)


def test_sizes_account_for_every_token_and_prefix_tokens_stay_in_front():
    torch.manual_seed(0)
    x, keys = torch.randn(2, 21, 8), torch.randn(2, 21, 8)
    for bipartite in (True, False):
        matching = Matching(*pitome_matching(keys, 0.6, 0.3, num_prefix=5, bipartite=bipartite))
        merged, size = merge_wavg(matching, x)
        assert matching.r == merge_count(16, 0.6) == 6 and merged.shape == (2, 15, 8)
        assert torch.equal(merged[:, :5], x[:, :5]) and size.sum(dim=1).eq(21).all()


def test_schedules_are_the_references():
    assert merge_count(196, 0.9125) == 17 and merge_count(179, 0.9125) == 15
    assert bipartite_blocks(12) == [True] * 6 + [False] * 6 and bipartite_blocks(3) == [True, True, False]
    assert default_margins(12)[0] == 0.75 and default_margins(12)[6] == pytest.approx(0.375)
