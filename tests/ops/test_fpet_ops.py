"""FPET's tensor operations against a literal transcription of the reference code
(kyk120/fpet: ``fpet/merge_fpet.py`` and ``utils.QLinear``), written to be read, not to be fast."""

from __future__ import annotations

import math
from statistics import NormalDist

import pytest
import torch

from tieta.ops.fpet import (BINARY_LEVEL, binary_weight, checkerboard, diff_matching, merge_wavg,
                            reference_grid)


# --- the reference, as written there (only the unused source tracking left out) ---------------

def ref_checkerboard_split(x, protected):
    x_others = x
    if protected:
        x_cls = x_others[:, :1, :]
        x_others = x_others[:, 1:, :]
    B, N, C = x_others.shape
    if N == 196:
        width = 14
        height = int(N / width)
    else:
        width = int(math.floor(math.sqrt(N)))
        height = int(N / width)
    x_others = x_others.view(B, height, width, C)
    x_tl = x_others[..., ::2, :][:, ::2, :, :].reshape(B, -1, C)
    x_br = x_others[..., 1::2, :][:, 1::2, :, :].reshape(B, -1, C)
    x_tr = x_others[..., ::2, :][:, 1::2, :, :].reshape(B, -1, C)
    x_bl = x_others[..., 1::2, :][:, ::2, :, :].reshape(B, -1, C)
    a = torch.cat([x_tl, x_br], dim=1)
    b_tensors = [x_tr, x_bl]
    if protected:
        b_tensors = [x_cls] + b_tensors
    b = torch.cat(b_tensors, dim=1)
    return a, b


def ref_bipartite_diff_matching(metric, class_token):
    protected = 1 if class_token else 0
    metric = metric / metric.norm(dim=-1, keepdim=True)
    a, b = ref_checkerboard_split(metric, protected)
    scores = a @ b.transpose(-1, -2)
    if class_token:
        scores[..., :, 0] = -math.inf
    v, idx = torch.topk(scores, 2, dim=-1)
    mean12 = v.mean(dim=-1, keepdim=True)
    soft_matrix = torch.sigmoid(scores - mean12)
    hard_matrix = (soft_matrix > 0.5).float()
    matching_matrix = soft_matrix + (hard_matrix - soft_matrix).detach()

    def merge(x):
        x_a, x_b = ref_checkerboard_split(x, protected)
        x_merge = torch.einsum('bik, bij->bkj', matching_matrix, x_a)
        return x_b + x_merge

    return merge, matching_matrix


def ref_merge_wavg(merge, x, size=None):
    if size is None:
        size = torch.ones_like(x[..., 0, None])
    x = merge(x * size)
    size = merge(size)
    x = x / size
    return x, size


def ref_quantize_1bit():
    """utils.QLinear.quantize(bit=1), its numpy/scipy loop with the standard library's normal."""
    normal = NormalDist()
    values, ranges = [0.0, 0.0], [0.0]
    for _ in range(500):
        ranges = [(values[1] + values[0]) / 2]
        pv = [0.0, normal.cdf(ranges[0]), 1.0]
        pv = [(pv[i + 1] + pv[i]) / 2 for i in range(2)]
        values = [normal.inv_cdf(p) for p in pv]
    value = torch.tensor(values).float()
    pos = torch.tensor(ranges).float()
    delta = (value[1:] - value[:-1]) / 2

    def func(x):
        x = x.unsqueeze(dim=-1)
        x = x - pos
        x = torch.sign(x)
        x *= delta
        return x.sum(-1)

    return func


def ref_qlinear_weight(w):
    q = ref_quantize_1bit()
    mean_w = w.mean()
    std_w = w.std()
    w = (w - mean_w) / (std_w + 1e-5)
    wb = q(w).data + w - w.data
    return wb * std_w + mean_w


# --- the tests -------------------------------------------------------------------------------

def _inputs(batch, tokens, channels, seed):
    generator = torch.Generator().manual_seed(seed)
    return (torch.randn(batch, tokens, channels, generator=generator),
            torch.randn(batch, tokens, 5, generator=generator),
            torch.rand(batch, tokens, 1, generator=generator) * 3 + 1)


@pytest.mark.parametrize("grid,class_token", [(14, True), (4, True), (5, False), (7, True)])
def test_merge_matches_the_reference(grid, class_token):
    prefix = int(class_token)
    tokens = prefix + grid * grid
    metric, x, size = _inputs(3, tokens, 8, seed=grid)
    split = checkerboard(*reference_grid(grid * grid))
    ref_merge, ref_matching = ref_bipartite_diff_matching(metric.clone(), class_token)
    matching = diff_matching(metric, split, prefix)
    torch.testing.assert_close(matching, ref_matching[..., prefix:], rtol=0, atol=0)
    assert (matching.sum(-1) == 1).all()  # random scores never tie: every A token merges
    for given in (size, None):
        got, got_size = merge_wavg(matching, x, given, split, prefix)
        want, want_size = ref_merge_wavg(ref_merge, x, given)
        torch.testing.assert_close(got, want, rtol=1e-6, atol=1e-6)
        torch.testing.assert_close(got_size, want_size, rtol=1e-6, atol=1e-6)
    assert got.shape[1] == prefix + len(split.b)


def test_gradients_match_the_reference():
    """The straight-through gradient reaches the metric through the sigmoid, and the tokens."""
    metric, x, size = _inputs(2, 17, 6, seed=3)
    grads = []
    for fast in (True, False):
        m, t = metric.clone().requires_grad_(), x.clone().requires_grad_()
        if fast:
            out, new_size = merge_wavg(diff_matching(m, checkerboard(4, 4), 1), t, size, checkerboard(4, 4), 1)
        else:
            out, new_size = ref_merge_wavg(ref_bipartite_diff_matching(m, True)[0], t, size)
        weights = torch.linspace(-1, 1, out.numel()).view_as(out)
        ((out * weights).sum() + new_size.square().sum()).backward()
        grads.append((m.grad, t.grad))
    torch.testing.assert_close(grads[0], grads[1], rtol=1e-5, atol=1e-6)
    assert grads[0][0].abs().sum() > 0


def test_a_tie_between_the_two_best_merges_nowhere():
    """Where an A token's two best scores are equal no sigmoid passes 0.5: the reference drops it."""
    metric = torch.randn(1, 1 + 16, 4)
    split = checkerboard(4, 4)
    metric[0, 1 + split.b[1]] = metric[0, 1 + split.b[0]]  # two identical B tokens
    metric[0, 1 + split.a[0]] = metric[0, 1 + split.b[0]] * 2  # an A token closest to both
    matching = diff_matching(metric, split, 1)
    assert matching[0, 0].sum() == 0  # tokens tied the same way are dropped too
    assert torch.equal(matching, ref_bipartite_diff_matching(metric, True)[1][..., 1:])


def test_prefix_tokens_stay_in_front_untouched():
    metric, x, size = _inputs(2, 3 + 16, 6, seed=4)
    split = checkerboard(4, 4)
    out, new_size = merge_wavg(diff_matching(metric, split, 3), x, size, split, 3)
    torch.testing.assert_close(out[:, :3], x[:, :3])  # (x * size) / size: equal up to rounding, as in the reference
    assert torch.equal(new_size[:, :3], size[:, :3])
    assert out.shape == (2, 3 + 8, 5)
    assert torch.allclose(new_size.sum(1), size.sum(1))  # every patch is counted once


def test_checkerboard_of_an_odd_and_a_wide_grid():
    split = checkerboard(3, 4)
    assert split.a.tolist() == [0, 2, 8, 10, 5, 7]
    assert split.b.tolist() == [4, 6, 1, 3, 9, 11]
    assert reference_grid(196) == (14, 14) and reference_grid(49) == (7, 7)


def test_binary_weight_matches_qlinear():
    torch.manual_seed(0)
    for w in (torch.randn(32, 64), torch.empty(64, 32).uniform_(-0.002, 0.002)):
        w.requires_grad_()
        got = binary_weight(w)
        want = ref_qlinear_weight(w)
        torch.testing.assert_close(got, want, rtol=0, atol=0)
        (gw,) = torch.autograd.grad((got * torch.arange(w.numel()).view_as(w)).sum(), w)
        (rw,) = torch.autograd.grad((want * torch.arange(w.numel()).view_as(w)).sum(), w)
        torch.testing.assert_close(gw, rw)
    assert float(ref_quantize_1bit()(torch.tensor([1.0]))) == pytest.approx(BINARY_LEVEL, abs=1e-7)
