"""DTEM's merges against a literal transcription of the reference (movinghoon/DTEM, ``dtem/dtem.py``
``DTEMBlock._select`` / ``_merge_train`` / ``_merge_eval`` and ``dtem/utils.py``'s ToMe matching),
written as there: one class token, the training merge keeping every token."""

import pytest
import torch
import torch.nn.functional as F

from tieta.ops.dtem import default_metric_dim, soft_assignment, soft_merge
from tieta.ops.merging import bipartite_soft_matching, merge_wavg
from tests.ops.reference_tome import reference_matching


# ---- the reference, transcribed ---------------------------------------------------------------

def reference_select(x, k, k2, tau1, tau2):
    """``DTEMBlock._select``: x (B, Na, Nb) scores, k rounds; returns the assignment."""
    EPSILON = torch.finfo(torch.float32).eps
    x = x.type(torch.float32)
    _idx = x.argsort(dim=-1, descending=True)[..., :k2]
    _x = x.gather(dim=-1, index=_idx)
    _x = _x / tau1
    B, N, M = _x.shape
    khot = torch.zeros_like(_x)
    for _ in range(k):
        onehot_approx = F.softmax(_x.view(B, -1) / tau2, dim=-1).view(B, N, M)
        khot += onehot_approx
        khot_mask = torch.clamp(1 - onehot_approx.sum(dim=-1, keepdim=True), min=EPSILON)
        _x = _x + torch.log(khot_mask)
    tmp = torch.clamp(khot.sum(dim=-1, keepdim=True).detach() - 1, min=0.) + 1.
    nkhot = khot / tmp
    assign = torch.zeros_like(x).scatter_reduce(-1, _idx, nkhot, reduce='sum')
    return assign


def reference_merge_train(x, size, r, n, metric, k2=3, tau1=0.1, tau2=0.1):
    """``DTEMBlock._merge_train`` in training: x (B, N, C), size (B, N); returns (x, size, n - r)."""
    metric = metric / metric.norm(dim=-1, keepdim=True)
    r = min(r, (n - 1) // 2)
    xa, xb = x[..., 1:n:2, :], x[..., 2:n:2, :]
    a, b = metric[..., 1:n:2, :], metric[..., 2:n:2, :]
    wa, wb = size[..., 1:n:2], size[..., 2:n:2]
    scores = a @ b.transpose(-1, -2)
    assign = reference_select(scores, r, k2, tau1, tau2)
    xb = wb[..., None] * xb + assign.transpose(-1, -2) @ (wa[..., None] * xa)
    wb = wb + (assign.transpose(-1, -2) @ wa[..., None])[..., 0]
    tmp = 1 - assign.sum(dim=-1)
    wa = wa * (tmp + (torch.clamp(tmp, min=0., max=1.) - tmp).detach())
    xb = xb / wb[..., None]
    w = torch.cat([wa, wb], dim=-1)
    nx = torch.cat([xa, xb], dim=1)
    nidxs = w.argsort(dim=-1, descending=True)
    w = w.gather(dim=-1, index=nidxs)
    nx = nx.gather(dim=-2, index=nidxs[..., None].expand_as(nx))
    x_output = torch.cat([x[:, :1], nx, x[:, n:]], dim=1)
    size_output = torch.cat([size[:, :1], w, size[:, n:]], dim=-1)
    return x_output, size_output, n - r


def reference_bipartite_soft_matching(metric, r, class_token=True):
    """``dtem/utils.py``'s (ToMe's) matching, with the class token only; returns merge()."""
    matching = reference_matching(metric, r, class_token)
    if matching is None:
        return lambda x, mode=None: x
    r, unm_idx, src_idx, dst_idx = matching

    def merge(x, mode="mean"):
        src, dst = x[..., ::2, :], x[..., 1::2, :]
        n, t1, c = src.shape
        unm = src.gather(dim=-2, index=unm_idx.expand(n, t1 - r, c))
        src = src.gather(dim=-2, index=src_idx.expand(n, r, c))
        dst = dst.scatter_reduce(-2, dst_idx.expand(n, r, c), src, reduce=mode)
        return torch.cat([unm, dst], dim=1)

    return merge


def reference_merge_eval(x, size, r, metric):
    """``DTEMBlock._merge_eval``: x (B, N, C), size (B, N); returns (x, size)."""
    metric = metric / metric.norm(dim=-1, keepdim=True)
    merge = reference_bipartite_soft_matching(metric, r=r, class_token=True)
    x = merge(x * size[..., None], mode='sum')
    size = merge(size[..., None], mode='sum')
    x = x / size
    return x, size[..., 0]


# ---- the tests ----------------------------------------------------------------------------------

def _inputs(seed, batch=3, tokens=17, channels=8, metric_dim=4, ones=False):
    generator = torch.Generator().manual_seed(seed)
    x = torch.randn(batch, tokens, channels, generator=generator, dtype=torch.float32)
    size = torch.ones(batch, tokens, dtype=torch.float32) if ones else \
        torch.rand(batch, tokens, generator=generator, dtype=torch.float32) * 2 + 0.1
    metric = torch.randn(batch, tokens, metric_dim, generator=generator, dtype=torch.float32)
    return x, size, metric


@pytest.mark.parametrize("r,candidates,tau", [(1, 3, 0.1), (4, 3, 0.1), (6, 2, 0.5), (3, 8, 1.0)])
def test_soft_assignment_is_the_references_select(r, candidates, tau):
    scores = torch.rand(2, 8, 7, generator=torch.Generator().manual_seed(r)) * 2 - 1
    expected = reference_select(scores, r, candidates, tau, tau * 2)
    torch.testing.assert_close(soft_assignment(scores, r, candidates, tau, tau * 2), expected)
    assert (expected.sum(dim=-1) <= 1 + 1e-6).all()


@pytest.mark.parametrize("seed,r,active,ones", [(0, 4, 17, True), (1, 4, 17, False), (2, 3, 12, False),
                                                 (3, 9, 17, False), (4, 2, 6, True), (5, 5, 16, False)])
def test_soft_merge_is_the_references_training_merge(seed, r, active, ones):
    x, size, metric = _inputs(seed, ones=ones)
    for tensor in (x, size, metric):
        tensor.requires_grad_(True)
    expected_x, expected_size, expected_active = reference_merge_train(x, size, r, active, metric)
    out_x, out_size, out_active = soft_merge(x, size[..., None], metric, r, active, 1)
    assert out_active == expected_active == active - min(r, (active - 1) // 2)
    assert out_x.shape == x.shape
    torch.testing.assert_close(out_x, expected_x)
    torch.testing.assert_close(out_size[..., 0], expected_size)
    # the gradients too: through the soft assignment into the embedding, and into tokens and sizes
    weights = torch.randn_like(out_x)
    ours = torch.autograd.grad((out_x * weights).sum() + out_size.square().sum(), (x, size, metric))
    theirs = torch.autograd.grad((expected_x * weights).sum() + expected_size.square().sum(), (x, size, metric))
    for a, b in zip(ours, theirs):  # sharp softmaxes (temperature 0.01) make large gradients: relative rounding
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-4)


def test_soft_merge_keeps_the_mass_and_the_tokens_behind_the_active_ones():
    x, size, metric = _inputs(7)
    out_x, out_size, _ = soft_merge(x, size[..., None], metric, 4, 13, 1)
    torch.testing.assert_close(out_size[:, :13, 0].sum(dim=1), size[:, :13].sum(dim=1))  # sizes move, none is lost
    torch.testing.assert_close(out_x[:, 13:], x[:, 13:], rtol=0, atol=0)
    torch.testing.assert_close(out_x[:, 0], x[:, 0], rtol=0, atol=0)
    assert (out_size[:, 1:13, 0].diff(dim=1) <= 0).all()  # ordered by size, largest first


def test_soft_merge_protects_every_prefix_token():
    x, size, metric = _inputs(8, tokens=19)
    out_x, out_size, active = soft_merge(x, size[..., None], metric, 5, 19, 3)
    assert active == 14
    torch.testing.assert_close(out_x[:, :3], x[:, :3], rtol=0, atol=0)
    torch.testing.assert_close(out_size[:, :3, 0], size[:, :3], rtol=0, atol=0)
    # with more prefix tokens the split starts after them: A = 3, 5, ..., B = 4, 6, ...
    shifted = soft_merge(x[:, 2:], size[:, 2:, None], metric[:, 2:], 5, 17, 1)
    torch.testing.assert_close(out_x[:, 2:], shifted[0])


def test_nothing_to_merge_returns_the_inputs():
    x, size, metric = _inputs(9)
    out = soft_merge(x, size[..., None], metric, 0, 17, 1)
    assert out[0] is x and out[2] == 17
    assert soft_merge(x, size[..., None], metric, 4, 2, 1)[2] == 2  # one unprotected token: no pair


@pytest.mark.parametrize("seed,r", [(0, 1), (1, 5), (2, 8), (3, 20)])
def test_evaluation_merge_is_the_references_tome_merge(seed, r):
    x, size, metric = _inputs(seed)
    expected_x, expected_size = reference_merge_eval(x, size, r, metric)
    matching = bipartite_soft_matching(metric, r, 1)
    out_x, out_size = merge_wavg(matching, x, size[..., None])
    torch.testing.assert_close(out_x, expected_x)
    torch.testing.assert_close(out_size[..., 0], expected_size)


def test_default_embedding_width_is_one_or_two_heads():
    assert default_metric_dim(768, 12) == 64  # ViT-B
    assert default_metric_dim(384, 6) == 64  # ViT-S
    assert default_metric_dim(1024, 16) == 128  # ViT-L
